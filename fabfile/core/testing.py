"""Test support: a Run whose hosts record every command instead of reaching a
host over SSH. The tier code runs unchanged through the real HostSession
(probes, actions, templates, packages, services, check mode); what a host
answers comes from rules given by the test, so a tier's unit test reads as
data: facts in, commands out.

    run = RecordingRun(inv, answers={"e1server": [(r"^systemctl is-active", Result())]})
    firewall.apply_rules(run.session("e1server"))
    assert run.session("e1server").changes == [...]

A rule is (regex searched in the command, Result or callable(cmd, stdin) ->
Result); the first that matches answers; no match answers a probe with exit 1 (absent,
not installed, not running) and a change with exit 0. ``responder`` may simulate a whole shell instead.
"""

from __future__ import annotations

import io
import re
import tempfile
from pathlib import Path
from typing import Callable, Iterable

from .facts import Known
from .inventory import Inventory
from .remote import HostSession, Result, Run
from .report import Report
from .secrets import Secrets

# `HostSession.unit_state`'s probe (see RecordingHost._unit_show).
UNIT_SHOW = re.compile(r"^systemctl show -p LoadState -p UnitFileState -p ActiveState -p ConditionResult "
                       r"-p ConditionTimestampMonotonic (\S+)$")

# The moves `HostSession.put` makes around an upload succeed unless a rule says otherwise.
PUT_STEPS = re.compile(r'^(mkdir -p "\$\(dirname |chown \S+ \S+\.hastack-new |mv -f |rm -f |cp -a )')

Rule = tuple[str, "Result | Callable[[str, str | None], Result]"]
Responder = Callable[["RecordingHost", str, "str | None"], "Result | None"]


class _Conn:
    """What the recording host has instead of a Fabric connection: SFTP puts land in ``files``."""

    is_connected = True

    def __init__(self, host: "RecordingHost"):
        self.host = host

    def put(self, stream, remote):
        data = stream.read()
        text = data.decode() if isinstance(data, bytes) else data
        self.host.uploads[remote] = text
        self.host.commands.append(f"<sftp put {remote}>")
        upload = getattr(self.host.responder, "upload", None)
        if upload is not None:  # a simulated host keeps the file
            upload(self.host, remote, text)

    def close(self):
        pass


class RecordingHost(HostSession):
    """A HostSession whose commands are recorded and answered by rules."""

    def __init__(self, run: "RecordingRun", host: str, rules: Iterable[Rule] = (),
                 responder: Responder | None = None):
        super().__init__(run, host)
        self.rules = list(rules)
        self.responder = responder
        self.commands: list[str] = []  # every command, probes included, in order
        self.stdins: list[tuple[str, str]] = []  # (command, what it got on stdin)
        self.changes: list[str] = []  # the changing commands (sh), in order
        self.uploads: dict[str, str] = {}
        self._conn = _Conn(self)
        self._changing = False  # unmatched: a probe fails (absent), a change succeeds

    def open(self):
        self.run.connected.append(self.name)
        return self._conn

    def close(self) -> None:
        pass

    def answer(self, cmd: str, stdin: str | None) -> Result:
        if self.responder is not None:
            r = self.responder(self, cmd, stdin)
            if r is not None:
                return r
        m = UNIT_SHOW.match(cmd)
        if m:
            return self._unit_show(m[1])
        for pattern, result in self.rules:
            if re.search(pattern, cmd):
                return result(cmd, stdin) if callable(result) else result
        if self._changing or PUT_STEPS.search(cmd):
            return Result()
        return Result(exited=1)

    def _unit_show(self, unit: str) -> Result:
        """`HostSession.unit_state`'s one `systemctl show`, answered from what the
        rules say to the questions a test states facts with: `systemctl
        is-enabled UNIT` (its stdout), `systemctl is-active UNIT` (its exit
        status) and `systemctl show -p ConditionResult ... UNIT`."""
        enabled = self.answer(f"systemctl is-enabled {unit}", None)
        active = self.answer(f"systemctl is-active {unit}", None)
        cond = self.answer(f"systemctl show -p ConditionResult -p ConditionTimestampMonotonic {unit}", None)
        lines = [f"UnitFileState={enabled.stdout.strip() if enabled.ok or enabled.stdout.strip() else 'disabled'}",
                 f"ActiveState={'active' if active.ok else 'inactive'}"]
        lines += [line for line in cond.stdout.splitlines() if "=" in line] if cond.ok else []
        return Result(stdout="\n".join(lines) + "\n")

    def _exec(self, cmd: str, *, stdin: str | None = None, timeout: float | None = None) -> Result:
        self.commands.append(cmd)
        if stdin is not None:
            self.stdins.append((cmd, stdin))
        result = self.answer(cmd, stdin)
        self.run.report.command(self.name, cmd, result, 0.0)
        return result

    def sh(self, cmd: str, **kw) -> Result:
        if not self.run.check:
            self.changes.append(cmd)
        self._changing = True
        try:
            return super().sh(cmd, **kw)
        finally:
            self._changing = False

    # the results this host reported, by status
    def reported(self, status: str) -> list[str]:
        return [m for h, s, m in self.run.results if h == self.name and s == status]


class _RecordingReport(Report):
    def __init__(self, run: "RecordingRun", title: str, mask, log_dir: Path):
        self._run = run
        super().__init__(title, mask=mask, log_dir=log_dir, file=io.StringIO())

    def result(self, host: str, status: str, message: str) -> None:
        self._run.results.append((host, status, message))
        super().result(host, status, message)

    @property
    def output(self) -> str:
        return self.console.file.getvalue()


class RecordingRun(Run):
    """A Run over recording hosts: ``answers`` maps a host name to its rules
    (``"*"``: rules for every host, tried after the host's own)."""

    def __init__(self, inv: Inventory, *, answers: dict[str, list[Rule]] | None = None,
                 responder: Responder | None = None, check: bool = False, only: str | None = None,
                 secrets: dict[str, str] | Secrets | None = None, title: str = "test"):
        self.answers = answers or {}
        self.responder = responder
        self.results: list[tuple[str, str, str]] = []
        self.connected: list[str] = []
        self._tmp = tempfile.TemporaryDirectory(prefix="hastack-test-")
        if not isinstance(secrets, Secrets):
            values = dict(secrets or {})
            secrets = Secrets(Path(self._tmp.name) / "secrets.yml", persist=False)
            secrets._values.update(values)
        report = _RecordingReport(self, title, secrets.mask, Path(self._tmp.name))
        super().__init__(inv, title=title, only=only, check=check, secrets=secrets, report=report)
        # No table of known paths: every file is probed as the rules answer it (a test
        # of the table gives its own, see tests/unit/test_facts.py).
        self.known = Known(None)

    def session(self, host: str) -> RecordingHost:
        if host not in self._sessions:
            rules = [*self.answers.get(host, []), *self.answers.get("*", [])]
            self._sessions[host] = RecordingHost(self, host, rules, self.responder)
        return self._sessions[host]

    def connect(self, hosts) -> None:
        for host in hosts:
            self.session(host).open()

    @property
    def output(self) -> str:
        return self.report.output

    def all_commands(self) -> list[tuple[str, str]]:
        """(host, command) of every host, in host order."""
        return [(name, c) for name, s in self._sessions.items() for c in s.commands]


def files_present(files: dict[str, tuple[str, str | None]]) -> Rule:
    """A fact: the host holds these files (path -> ("owner:group:mode", text))
    and directories (text None), as `HostSession.put`/`directory` read them;
    every other path is absent."""
    import hashlib
    import shlex

    def answer(cmd: str, stdin: str | None) -> Result:
        path = shlex.split(cmd)[3]  # stat -c FORMAT PATH [&& sha256sum PATH]
        if path not in files:
            return Result(exited=1)
        meta, text = files[path]
        sums = f"{hashlib.sha256(text.encode()).hexdigest()}  {path}\n" if text is not None else ""
        return Result(f"{meta}\n{sums}")
    return r"^stat -c '%U:%G:%a' ", answer


def packages_present(*names: str) -> Rule:
    """A fact: these Debian packages are installed and no other, as
    `HostSession.packages`/`installed` read them (one dpkg-query for all)."""
    return r"^dpkg-query -W -f='\$\{Package\}", Result("".join(f"{n} installed\n" for n in names))
