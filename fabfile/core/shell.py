"""The one quoting path: every value that comes from the inventory, a task
argument or a host's output and goes into a shell command line passes through
``q`` (one word) or ``join`` (a whole command of words). Secrets and other
input go on standard input (``HostSession.sh(..., stdin=...)``), never on the
command line.
"""

from __future__ import annotations

import shlex
from dataclasses import dataclass

__all__ = ["APT_UPDATE", "Result", "q", "join", "retry_loop"]

# A host's own apt (apt-daily at boot, unattended-upgrades) may hold dpkg's lock
# when a deploy installs: wait for it rather than fail at once.
APT_LOCK_WAIT = "-o DPkg::Lock::Timeout=600"
# apt-get update can hang for good when a proxy or mirror drops a connection in
# the middle of a reply (all of apt's methods idle, apt waiting): each try is
# bounded and another follows. The first is short (60 s: a hung one costs little),
# the others may take 300 s (fresh package lists through a slow link took longer
# than 120 s). No translations are fetched (half of the download, never used); a
# connection silent for 30 s fails (Acquire::http::Timeout). The partial downloads
# go before another try: apt resumes them with Range requests, which apt-cacher-ng
# 3.7 failed again and again. And the first try waits 0-7.5 s, differently on each
# host: apt-cacher-ng 3.7 fails a refresh of an index file that two hosts ask for
# in the same second, and a whole site's first `apt-get update` starts at once.
APT_UPDATE = ("j=$(cksum < /etc/hostname | cut -d' ' -f1); sleep $((j % 8)).$((j / 8 % 2 * 5)); n=0; "
              "for t in 60 300 300; do n=$((n + 1)); timeout $t apt-get update -q -o Acquire::Languages=none "
              f"-o Acquire::http::Timeout=30 {APT_LOCK_WAIT} && break; [ $n = 3 ] && exit 1; "
              "rm -rf /var/lib/apt/lists/partial/*; sleep 2; done")


@dataclass
class Result:
    """What a command on a host gave: its output and exit status."""

    stdout: str = ""
    stderr: str = ""
    exited: int = 0

    @property
    def ok(self) -> bool:
        return self.exited == 0


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
