"""Running a runbook over SSH: one `Run` per operator command, one `HostSession`
per host. Steps run on all their hosts in parallel; each host reports ok /
changed / failed per action; a failed step stops the steps after it.

Actions follow one rule: probe, compare, then act or say why nothing was done.
Probes always run (they read); actions are skipped and shown in check mode.
"""

from __future__ import annotations

import difflib
import hashlib
import io
import shlex
import socket
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Callable, Iterable

import paramiko
from fabric import Connection
from invoke.exceptions import UnexpectedExit
from patchwork import files

from . import templates
from .errors import StepFailed, UserError
from .inventory import Inventory
from .report import Report
from .secrets import Secrets


# apt-get update can hang for good when a proxy or mirror drops a connection in
# the middle of a reply (all of apt's methods idle, apt waiting): bound each try
# and try again, instead of hanging the whole run.
APT_UPDATE = "for try in 1 2 3; do timeout 120 apt-get update -q && break; [ $try = 3 ] && exit 1; sleep 2; done"


class HostFailed(Exception):
    """One action failed on one host; the message names the command, status and stderr."""


@dataclass
class Result:
    stdout: str = ""
    stderr: str = ""
    exited: int = 0

    @property
    def ok(self) -> bool:
        return self.exited == 0


class Run:
    """Everything one operator command needs: the inventory, the selected hosts,
    secrets, check mode, connections and the report."""

    def __init__(self, inv: Inventory, *, title: str, only: str | None = None, check: bool = False):
        self.inv = inv
        self.check = check
        self.only = _parse_hosts(only, inv) if only else None
        self.secrets = Secrets(inv.site_file("secrets.yml"), persist=not check)
        self.report = Report(title + (" (check mode)" if check else ""), mask=self.secrets.mask)
        self._sessions: dict[str, HostSession] = {}

    # --- host selection -----------------------------------------------------

    def hosts(self, *roles: str) -> list[str]:
        """Hosts with any of ``roles`` (every host when none), narrowed by --hosts."""
        names = self.inv.with_role(*roles) if roles else list(self.inv.hosts)
        return [n for n in names if self.only is None or n in self.only]

    def secret(self, name: str) -> str:
        return self.secrets.get(name)

    # --- connections --------------------------------------------------------

    def session(self, host: str) -> HostSession:
        if host not in self._sessions:
            self._sessions[host] = HostSession(self, host)
        return self._sessions[host]

    def connect(self, hosts: Iterable[str]) -> None:
        """Open every connection first, so an unreachable host stops the run
        before any host was changed."""
        hosts = list(hosts)
        with ThreadPoolExecutor(max_workers=max(1, min(16, len(hosts)))) as pool:
            errors = [e for e in pool.map(self._try_connect, hosts) if e]
        if errors:
            raise UserError("cannot reach every host, nothing was changed:\n  " + "\n  ".join(errors))

    def _try_connect(self, host: str) -> str | None:
        try:
            self.session(host).open()
        except UserError as exc:
            return str(exc)
        return None

    def close(self) -> None:
        for session in self._sessions.values():
            session.close()
        self.report.close()

    # --- steps --------------------------------------------------------------

    def step(self, title: str, hosts: list[str], action: Callable[[HostSession], None]) -> None:
        """Run ``action`` on every host at once; raise StepFailed if any failed."""
        if not hosts:
            self.report.note(f"{title}: no hosts selected, skipped")
            return
        self.report.step(title, hosts)
        self.connect(hosts)
        failures: list[str] = []

        def one(host: str) -> None:
            try:
                action(self.session(host))
            except HostFailed as exc:
                self.report.result(host, "failed", str(exc))
                failures.append(f"{host}: {exc}")
            except UserError as exc:
                self.report.result(host, "failed", str(exc))
                failures.append(f"{host}: {exc}")

        with self.report.console.status(f"{title}…"):
            with ThreadPoolExecutor(max_workers=min(16, len(hosts))) as pool:
                list(pool.map(one, hosts))
        if failures:
            raise StepFailed(f"step '{title}' failed; later steps did not run:\n  " + "\n  ".join(failures))


class HostSession:
    """One host within a Run: probes, actions and files, each reported."""

    def __init__(self, run: Run, host: str):
        self.run = run
        self.name = host
        self.inv = run.inv
        self.host = run.inv.hosts[host]
        self.address = run.inv.management_address(host)
        self._conn: Connection | None = None

    # --- connection ---------------------------------------------------------

    def open(self) -> Connection:
        if self._conn is not None and self._conn.is_connected:
            return self._conn
        ssh = self.inv.ssh
        known_hosts = self.inv.known_hosts_file
        key = self.inv.key_file
        if not known_hosts.exists():
            raise UserError(f"{known_hosts}: known_hosts file of the inventory is missing (for the lab: inv lab.up)")
        if not key.exists():
            raise UserError(f"{key}: SSH key of the inventory is missing (for the lab: inv lab.up)")
        conn = Connection(
            self.address,
            user=ssh.user,
            port=ssh.port,
            connect_timeout=ssh.connect_timeout,
            connect_kwargs={"key_filename": str(key), "look_for_keys": False, "allow_agent": False},
        )
        # Host keys are checked against the inventory's own known_hosts only:
        # an unknown or changed key is an error, never silently accepted.
        conn.client = paramiko.SSHClient()
        conn.client.load_host_keys(str(known_hosts))
        conn.client.set_missing_host_key_policy(paramiko.RejectPolicy())
        where = f"{self.name} ({self.address}:{ssh.port})"
        try:
            conn.open()
        except paramiko.BadHostKeyException:
            raise UserError(f"{where}: host key does not match {known_hosts}; refusing to connect") from None
        except paramiko.SSHException as exc:
            if "not found in known_hosts" in str(exc):
                raise UserError(f"{where}: host key is not in {known_hosts}; refusing to connect") from None
            raise UserError(f"{where}: SSH failed: {exc}") from None
        except (socket.timeout, TimeoutError):
            raise UserError(f"{where}: unreachable (no answer in {ssh.connect_timeout:g}s)") from None
        except OSError as exc:
            raise UserError(f"{where}: unreachable ({exc.strerror or exc})") from None
        self._conn = conn
        return conn

    @property
    def conn(self) -> Connection:
        return self.open()

    def close(self) -> None:
        if self._conn is not None:
            self._conn.close()

    # --- reporting ----------------------------------------------------------

    def ok(self, message: str) -> None:
        self.run.report.result(self.name, "ok", message)

    def changed(self, message: str) -> None:
        self.run.report.result(self.name, "would change" if self.run.check else "changed", message)

    def note(self, message: str) -> None:
        self.run.report.note(f"{self.name}: {message}")

    # --- commands -----------------------------------------------------------

    def _exec(self, cmd: str, *, stdin: str | None = None, timeout: float | None = None) -> Result:
        started = time.monotonic()
        try:
            r = self.conn.run(
                cmd, hide=True, warn=True, in_stream=io.StringIO(stdin) if stdin is not None else False,
                timeout=timeout,
            )
            result = Result(r.stdout, r.stderr, r.exited)
        except UnexpectedExit as exc:  # pragma: no cover - warn=True prevents it
            result = Result(exc.result.stdout, exc.result.stderr, exc.result.exited)
        except Exception as exc:  # connection dropped, timeout
            result = Result("", f"{type(exc).__name__}: {exc}", -1)
        self.run.report.command(self.name, cmd, result, time.monotonic() - started)
        return result

    def probe(self, cmd: str, *, stdin: str | None = None) -> Result:
        """A read-only command: always runs, never counts as a change, may fail."""
        return self._exec(cmd, stdin=stdin)

    def read(self, cmd: str) -> str:
        """A read-only command that must succeed; its stdout."""
        r = self._exec(cmd)
        if not r.ok:
            raise HostFailed(_failure(cmd, r))
        return r.stdout

    def sh(self, cmd: str, *, message: str | None = None, stdin: str | None = None,
           timeout: float | None = None) -> Result:
        """A command that changes the host: shown (not run) in check mode,
        reported as changed, and a failure fails the host."""
        if self.run.check:
            self.changed(f"would run: {message or cmd}")
            return Result()
        r = self._exec(cmd, stdin=stdin, timeout=timeout)
        if not r.ok:
            raise HostFailed(_failure(cmd, r))
        self.changed(message or cmd)
        return r

    def ensure(self, present: str, fix: str, message: str) -> bool:
        """Run ``fix`` unless the probe ``present`` already succeeds. Returns changed."""
        if self.probe(present).ok:
            self.ok(message)
            return False
        self.sh(fix, message=message)
        return True

    # --- packages and services ----------------------------------------------

    def packages(self, names: Iterable[str]) -> bool:
        names = sorted(set(names))
        listed = self.probe("dpkg-query -W -f='${Package} ${db:Status-Status}\\n' " + " ".join(names))
        installed = {line.split()[0] for line in listed.stdout.splitlines() if line.endswith(" installed")}
        missing = [n for n in names if n not in installed]
        if not missing:
            self.ok(f"packages present: {' '.join(names)}")
            return False
        install = ("DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends "
                   "-o Dpkg::Options::=--force-confold " + " ".join(missing))
        self.sh(
            f"{install} || ({APT_UPDATE} && {install})",
            message=f"install {' '.join(missing)}",
            timeout=1800,
        )
        return True

    def apt_update(self) -> Result:
        """Refresh apt's package lists (after a repository was added), bounded and retried."""
        return self.sh(APT_UPDATE, message="apt-get update")

    def service(self, name: str, *, enabled: bool = True, running: bool = True,
                restart: bool = False, reload: bool = False) -> None:
        """Converge a systemd unit; ``restart``/``reload`` when its config changed."""
        q = shlex.quote(name)
        is_enabled = self.probe(f"systemctl is-enabled {q}").stdout.strip() == "enabled"
        is_active = self.probe(f"systemctl is-active {q}").ok
        skipped = running and not is_active and self._still_skipped(q)
        if skipped:  # e.g. timesyncd in a container: the unit says it does not apply here
            running = False
        if enabled != is_enabled:
            self.sh(f"systemctl {'enable' if enabled else 'disable'} {q}")
        if running and not is_active:
            self.sh(f"systemctl start {q}")
        elif not running and is_active:
            self.sh(f"systemctl stop {q}")
        elif running and (restart or reload):
            self.sh(f"systemctl {'reload' if reload and not restart else 'restart'} {q}")
        elif enabled == is_enabled:
            state = "skipped by its unit conditions" if skipped else "running" if running else "stopped"
            self.ok(f"service {name} {state}")

    def _still_skipped(self, unit: str) -> bool:
        """True when systemd skips the unit for its conditions (ConditionResult=no),
        even now: a unit skipped before its config existed is tried again, since
        systemd evaluates the conditions afresh on every start."""
        def skipped() -> bool:
            props = self.probe(f"systemctl show -p ConditionResult -p ConditionTimestampMonotonic {unit}").stdout
            return "ConditionResult=no" in props and "ConditionTimestampMonotonic=0" not in props

        if not skipped():
            return False
        if self.run.check:
            return True
        self.probe(f"systemctl start {unit}")
        return not self.probe(f"systemctl is-active {unit}").ok and skipped()

    # --- files --------------------------------------------------------------

    def template(self, name: str, dest: str, *, owner: str = "root", group: str = "root",
                 mode: str = "0644", validate: str | None = None, **extra) -> bool:
        """Render configs/<name> for this host and put it at ``dest``."""
        content = templates.render(name, self.inv, self.name, self.run.secret, **extra)
        return self.put(content, dest, owner=owner, group=group, mode=mode, validate=validate)

    def put(self, content: str | bytes, dest: str, *, owner: str = "root", group: str = "root",
            mode: str = "0644", validate: str | None = None) -> bool:
        """Upload ``content`` to ``dest`` only when it differs (by SHA-256), with owner,
        group and mode. ``validate`` is the service's checker: with ``{}`` it runs on the
        new file before it replaces the old one; without, it runs after the swap
        and the old file is put back if it fails. Returns whether anything changed."""
        data = content.encode() if isinstance(content, str) else content
        want_hash = hashlib.sha256(data).hexdigest()
        q = shlex.quote(dest)
        state = self.probe(f"stat -c '%U:%G:%a' {q} && sha256sum {q}")
        have_meta, have_hash = None, None
        if state.ok:
            lines = state.stdout.split("\n")
            have_meta, have_hash = lines[0].strip(), lines[1].split()[0]
        want_meta = f"{owner}:{group}:{int(mode, 8):o}"
        if have_hash == want_hash and have_meta == want_meta:
            self.ok(dest)
            return False
        if have_hash == want_hash:
            self.sh(f"chown {owner}:{group} {q} && chmod {mode} {q}", message=f"{dest}: owner/mode {want_meta}")
            return True
        old = self.probe(f"cat {q}").stdout if state.ok else ""
        if self.run.check:
            self.changed(f"{dest} would be {'updated' if state.ok else 'created'}")
            self.run.report.diff(self.name, _diff(old, data, dest))
            return True
        tmp = f"{dest}.hastack-new"
        qt = shlex.quote(tmp)
        self._exec(f"mkdir -p $(dirname {q})")
        self.conn.put(io.BytesIO(data), tmp)
        setup = self._exec(f"chown {owner}:{group} {qt} && chmod {mode} {qt}")
        if not setup.ok:
            self._exec(f"rm -f {qt}")
            raise HostFailed(_failure(f"chown/chmod {tmp}", setup))
        if validate and "{}" in validate:
            check = self._exec(validate.replace("{}", qt))
            if not check.ok:
                self._exec(f"rm -f {qt}")
                raise HostFailed(f"{dest}: new file rejected by `{validate}`, old file kept:\n"
                                 + (check.stderr or check.stdout).strip())
            self._swap(tmp, dest)
        elif validate:
            backup = f"{dest}.hastack-old"
            had_old = state.ok
            if had_old:
                self._exec(f"cp -a {q} {shlex.quote(backup)}")
            self._swap(tmp, dest)
            check = self._exec(validate)
            if not check.ok:
                restore = f"mv -f {shlex.quote(backup)} {q}" if had_old else f"rm -f {q}"
                self._exec(restore)
                raise HostFailed(f"{dest}: new file rejected by `{validate}`, old file restored:\n"
                                 + (check.stderr or check.stdout).strip())
            self._exec(f"rm -f {shlex.quote(backup)}")
        else:
            self._swap(tmp, dest)
        self.changed(f"{dest} {'updated' if state.ok else 'created'}")
        self.run.report.log(f"[{self.name}] diff:\n" + _diff(old, data, dest))
        return True

    def _swap(self, tmp: str, dest: str) -> None:
        r = self._exec(f"mv -f {shlex.quote(tmp)} {shlex.quote(dest)}")
        if not r.ok:
            raise HostFailed(_failure(f"mv {tmp} {dest}", r))

    # patchwork's file helpers, run through our probes/actions so that they are
    # logged, reported and respect check mode.

    def _runner(self, cmd: str, *, warn: bool = False, **_) -> Result:
        # patchwork runs its checks with warn=True and its changes without.
        return self.probe(cmd) if warn else self.sh(cmd)

    def exists(self, path: str) -> bool:
        return files.exists(self.conn, shlex.quote(path), runner=self._runner)

    def directory(self, path: str, *, owner: str = "root", group: str = "root", mode: str = "0755") -> bool:
        state = self.probe(f"stat -c '%U:%G:%a' {shlex.quote(path)}")
        want = f"{owner}:{group}:{int(mode, 8):o}"
        if state.ok and state.stdout.strip() == want:
            self.ok(f"{path}/")
            return False
        files.directory(self.conn, shlex.quote(path), user=owner, group=group, mode=mode, runner=self._runner)
        return True

    def line(self, path: str, text: str) -> bool:
        """Make sure ``text`` is a whole line of ``path`` (a file we do not own
        whole); append it otherwise."""
        if self.exists(path) and files.contains(self.conn, path, text, exact=True, runner=self._runner):
            self.ok(f"{path}: has line {text!r}")
            return False
        files.append(self.conn, path, text, runner=self._runner)
        return True


def _failure(cmd: str, r: Result) -> str:
    err = (r.stderr or r.stdout).strip()
    tail = "\n".join(err.splitlines()[-15:])
    return f"`{cmd}` exited {r.exited}" + (f":\n{tail}" if tail else "")


def _diff(old: str, new: bytes, dest: str) -> str:
    try:
        new_text = new.decode()
    except UnicodeDecodeError:
        return f"(binary file {dest})"
    return "".join(difflib.unified_diff(
        old.splitlines(keepends=True), new_text.splitlines(keepends=True), f"{dest} (on host)", f"{dest} (new)"
    ))


def _parse_hosts(spec: str, inv: Inventory) -> set[str]:
    names = {h.strip() for h in spec.split(",") if h.strip()}
    unknown = sorted(names - set(inv.hosts))
    if unknown:
        raise UserError(f"{inv.path}: --hosts names unknown host(s): {', '.join(unknown)} "
                        f"(known: {', '.join(inv.hosts)})")
    return names
