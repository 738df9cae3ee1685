"""The one quoting path: every value that comes from the inventory, a task
argument or a host's output and goes into a shell command line passes through
``q`` (one word) or ``join`` (a whole command of words). Secrets and other
input go on standard input (``HostSession.sh(..., stdin=...)``), never on the
command line.
"""

from __future__ import annotations

import shlex

__all__ = ["q", "join", "retry_loop"]


def q(value: object) -> str:
    """``value`` as one shell word, whatever characters it holds."""
    return shlex.quote(str(value))


def join(*words: object) -> str:
    """A command line of ``words``, each quoted: ``join("ejabberdctl", "register", user, domain)``."""
    return " ".join(q(w) for w in words)


def retry_loop(cmd: str, seconds: int, interval: int = 1) -> str:
    """One remote command that retries ``cmd`` (a trusted command line) every
    ``interval`` seconds until it succeeds (exit 0) or ``seconds`` have passed (exit 1)."""
    tries = max(1, int(seconds) // max(1, int(interval)))
    return f"for i in $(seq {tries}); do {cmd} && exit 0; sleep {int(interval)}; done; exit 1"
