"""Running a runbook over SSH: one `Run` per operator command, one `HostSession`
per host. Steps run on all their hosts in parallel; each host reports ok /
changed / failed per action; a failed step stops the steps after it.

Actions follow one rule: probe, compare, then act or say why nothing was done.
Probes always run (they read); actions are skipped and shown in check mode.
"""

from __future__ import annotations

import contextlib
import difflib
import hashlib
import io
import logging
import select
import socket
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Callable, Iterable

import paramiko
import six
from fabric import Connection

# patchwork 1.0.1 imports invoke.vendor.six, which invoke 2 no longer vendors.
sys.modules.setdefault("invoke.vendor.six", six)

from patchwork import files  # noqa: E402

from . import templates  # noqa: E402
from .errors import HostFailed, StepFailed, UserError  # noqa: E402
from .inventory import Inventory  # noqa: E402
from .report import Report  # noqa: E402
from .secrets import Secrets  # noqa: E402
from . import facts  # noqa: E402
from .shell import APT_LOCK_WAIT, APT_UPDATE, Result, q, retry_loop  # noqa: E402

# paramiko's transport threads log a failed handshake (a host that accepts TCP
# but never sends its SSH banner) with a traceback through Python's last-resort
# handler, straight onto the operator's terminal; the run reports that host in
# one line instead ("cannot reach every host ...").
logging.getLogger("paramiko").addHandler(logging.NullHandler())

# HostFailed, Result and APT_UPDATE live in the light modules (errors, shell) so
# that tiers use them without importing paramiko; they stay importable from here.
__all__ = ["APT_UPDATE", "HostFailed", "HostSession", "Result", "Run"]

# Hosts a step works on at once (and connects to at once). On the 2-CPU machine
# the 64-host scale lab's no-op (scripts/bench_scale.py) took 8.6 s in waves of
# 16 and 9.3 s with all 64 at once: past 16 the hosts only queue for the CPUs.
PARALLEL = 16

# While packages install under `HostSession.packages(..., no_start=True)`: no
# service starts (invoke-rc.d asks this file; 101 = action forbidden).
POLICY_RC = "/usr/sbin/policy-rc.d"
POLICY_RC_TEXT = "#!/bin/sh\n# hastack: no service starts while packages install\nexit 101\n"


def channel_run(transport: paramiko.Transport, cmd: str, *, stdin: str | None = None,
                timeout: float | None = None) -> Result:
    """``cmd`` on one channel of the host's SSH connection: ``stdin`` written in one
    go, then EOF; stdout and stderr read as they come (select on the channel) until
    the host's EOF, then the exit status. Fabric's runner does the same with three
    threads per command and 10 ms naps between polls (and invoke fed a string on
    stdin byte by byte, 10 ms each); here a command costs its round trip. After
    ``timeout`` seconds the channel is closed and the result says so (exit -1)."""
    deadline = None if timeout is None else time.monotonic() + timeout

    def left() -> float | None:
        return None if deadline is None else max(0.0, deadline - time.monotonic())

    out: list[bytes] = []
    err: list[bytes] = []
    channel = transport.open_session(timeout=30)
    try:
        channel.exec_command(cmd)
        try:
            if stdin is not None:
                channel.sendall(stdin.encode())
            channel.shutdown_write()
        except OSError:  # the command ended without reading its input: its output and status say why
            pass
        while True:
            if channel.recv_ready():
                out.append(channel.recv(65536))
            elif channel.recv_stderr_ready():
                err.append(channel.recv_stderr(65536))
            elif channel.eof_received or channel.closed:
                break
            elif left() == 0:
                break
            else:
                wait = left()
                select.select([channel], [], [], 1.0 if wait is None else min(wait, 1.0))
        if not channel.status_event.wait(left()):
            return Result(b"".join(out).decode(errors="replace"),
                          b"".join(err).decode(errors="replace") + f"CommandTimedOut: no exit after {timeout:g} s", -1)
        return Result(b"".join(out).decode(errors="replace"), b"".join(err).decode(errors="replace"),
                      channel.exit_status)
    finally:
        channel.close()


class Run:
    """Everything one operator command needs: the inventory, the selected hosts,
    secrets, check mode, connections and the report."""

    def __init__(self, inv: Inventory, *, title: str, only: str | None = None, check: bool = False,
                 secrets: Secrets | None = None, report: Report | None = None):
        self.inv = inv
        self.check = check
        self.only = set(inv.select(only)) if only is not None else None
        self.secrets = secrets if secrets is not None else Secrets(inv.site_file("secrets.yml"), persist=not check)
        self.report = report if report is not None else Report(title + (" (check mode)" if check else ""),
                                                               mask=self.secrets.mask)
        self._sessions: dict[str, HostSession] = {}
        # The paths and units earlier runs managed on each host, read in one command per host
        # (core/facts.py); a dry run reads the list but never writes it.
        self.known = facts.Known(inv.site_file("paths.json"), persist=not check)
        # Something changed on some host in this run: what the tables read may be stale
        # anywhere (a change on one host can change another: pcs, Pacemaker, a cluster).
        self.changed_any = False
        self._memo: dict[Any, Any] = {}
        self._memo_lock = threading.RLock()  # a memoized value may ask for another
        self._sessions_lock = threading.Lock()
        self._chains = 0  # chains of steps running side by side (no spinner then)
        self._stopped = threading.Event()  # a chain failed: the others stop before their next step

    # --- host selection -----------------------------------------------------

    def hosts(self, *roles: str) -> list[str]:
        """Hosts with any of ``roles`` (every host when none), narrowed by --hosts."""
        names = self.inv.with_role(*roles) if roles else list(self.inv.hosts)
        return [n for n in names if self.only is None or n in self.only]

    def secret(self, name: str) -> str:
        return self.secrets.get(name)

    def memo(self, key, compute: Callable[[], Any]) -> Any:
        """State of this run, computed once: ``compute()`` the first time ``key`` is asked for."""
        with self._memo_lock:
            if key not in self._memo:
                self._memo[key] = compute()
            return self._memo[key]

    # --- one-host operations ------------------------------------------------

    def answering(self, hosts: Iterable[str], *, what: str, probe: str | None = None,
                  prefer: str | None = None) -> "HostSession":
        """The first host of ``hosts`` (in order) that is reachable and whose ``probe``
        succeeds; among those, the first where ``prefer`` succeeds (say, the one
        holding a VIP). A UserError names every host tried when none answers."""
        tried: list[str] = []
        fallback: HostSession | None = None
        for host in hosts:
            h = self.session(host)
            try:
                h.open()
            except UserError as exc:
                tried.append(str(exc))
                continue
            if probe is not None:
                r = h.probe(probe)
                if not r.ok:
                    last = ((r.stderr or r.stdout).strip().splitlines() or ["no answer"])[-1]
                    tried.append(f"{host}: {what} does not answer ({last})")
                    continue
            if prefer is None or h.probe(prefer).ok:
                return h
            fallback = fallback or h
        if fallback is not None:
            return fallback
        raise UserError(f"no {what} answers, nothing was changed ("
                        + "; ".join(tried or [f"no {what} among the selected hosts"]) + ")")

    def on_one(self, title: str, h: "HostSession", action: Callable[["HostSession"], Any]) -> Any:
        """An operation on one host (an ops task): reported as a step; a failure ends
        the task with the host and the reason."""
        self.report.step(title, [h.name])
        try:
            return action(h)
        except HostFailed as exc:
            self.report.result(h.name, "failed", str(exc))
            raise UserError(f"{h.name}: {exc}") from None

    # --- connections --------------------------------------------------------

    def session(self, host: str) -> HostSession:
        with self._sessions_lock:
            if host not in self._sessions:
                self._sessions[host] = HostSession(self, host)
            return self._sessions[host]

    def connect(self, hosts: Iterable[str]) -> None:
        """Open every connection first, so an unreachable host stops the run
        before any host was changed."""
        errors = list(self.unreachable(hosts).values())
        if errors:
            raise UserError("cannot reach every host, nothing was changed:\n  " + "\n  ".join(errors))

    def unreachable(self, hosts: Iterable[str]) -> dict[str, str]:
        """Connect to every host at once; {host: why} for those that cannot be
        reached (a read-only task goes on with the others)."""
        hosts = list(hosts)
        with ThreadPoolExecutor(max_workers=max(1, min(PARALLEL, len(hosts)))) as pool:
            errors = dict(zip(hosts, pool.map(self._try_connect, hosts)))
        return {host: why for host, why in errors.items() if why}

    def _try_connect(self, host: str) -> str | None:
        try:
            self.session(host).open()
        except UserError as exc:
            return str(exc)
        return None

    def adopt(self, inv: Inventory) -> None:
        """Go on with ``inv`` (the same site after a rescue recorded new roles): what
        this run computed from the old roles (template variables, ...) is forgotten;
        connections stay open."""
        with self._memo_lock, self._sessions_lock:
            self.inv = inv
            self._memo.clear()
            for name in [n for n in self._sessions if n not in inv.hosts]:  # retired: not a host any more
                self._sessions.pop(name).close()
            for session in self._sessions.values():
                session.inv = inv
                session.host = inv.hosts[session.name]
                session._memo.clear()

    def close(self) -> None:
        for session in self._sessions.values():
            session.close()
        self.known.save()
        self.report.close()

    # --- steps --------------------------------------------------------------

    def step(self, title: str, hosts: list[str], action: Callable[[HostSession], None]) -> None:
        """Run ``action`` on every host at once; raise StepFailed if any failed."""
        if self._stopped.is_set():
            raise StepFailed(f"step '{title}' not run: a step beside it failed")
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

        spinner = self.report.console.status(f"{title}…") if not self._chains else contextlib.nullcontext()
        started = time.monotonic()
        with spinner:
            with ThreadPoolExecutor(max_workers=min(PARALLEL, len(hosts))) as pool:
                list(pool.map(one, hosts))
        self.report.log(f"-- {title}: {time.monotonic() - started:.2f}s (at +{self.report.elapsed():.1f}s)")
        if failures:
            raise StepFailed(f"step '{title}' failed; later steps did not run:\n  " + "\n  ".join(failures))

    def side_by_side(self, chains: dict[str, Callable[[], None]]) -> None:
        """Run independent chains of steps (tiers on disjoint hosts) at the same
        time, each still in its own order. A failure in one stops the others
        before their next step; then the failure (every one, if several) is raised."""
        if len(chains) <= 1:
            for chain in chains.values():
                chain()
            return
        failures: list[str] = []

        def one(item: tuple[str, Callable[[], None]]) -> None:
            name, chain = item
            try:
                chain()
            except UserError as exc:
                if not self._stopped.is_set() or "a step beside it failed" not in str(exc):
                    failures.append(f"{name}: {exc}")
                self._stopped.set()

        self._chains = len(chains)
        try:
            with ThreadPoolExecutor(max_workers=len(chains)) as pool:
                list(pool.map(one, chains.items()))
        finally:
            self._chains = 0
        if failures:
            raise StepFailed("\n".join(failures))


class HostSession:
    """One host within a Run: probes, actions and files, each reported."""

    def __init__(self, run: Run, host: str):
        self.run = run
        self.name = host
        self.inv = run.inv
        self.host = run.inv.hosts[host]
        self.address = run.inv.management_address(host)
        self._conn: Connection | None = None
        self._memo: dict[Any, Any] = {}
        self._files: dict[str, facts.FileFact] | None = None  # the known paths, read at the first file operation
        self._units: dict[str, dict[str, str]] | None = None  # the known units, read at the first unit_state
        # Two chains of steps side by side may both install on this host: one apt at a time.
        self._apt = threading.Lock()

    def memo(self, key, compute: Callable[[], Any]) -> Any:
        """State of this host in this run, computed once (facts read from the host,
        per-host template variables)."""
        if key not in self._memo:
            self._memo[key] = compute()
        return self._memo[key]

    def forget(self, key) -> None:
        """Drop a memoized fact of this host (it changed): the next ``memo`` reads it again."""
        self._memo.pop(key, None)

    def tier_vars(self, fn: Callable[..., dict]) -> dict:
        """A tier's template variables for this host, ``fn(inv, host, secret)``, computed once per run."""
        return self.memo(("vars", fn.__module__, fn.__qualname__), lambda: fn(self.inv, self.name, self.run.secret))

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
            # A slow host (an emulated CPU) may take longer than paramiko's 15 s for its banner.
            connect_kwargs={"key_filename": str(key), "look_for_keys": False, "allow_agent": False,
                            "banner_timeout": max(15, ssh.connect_timeout), "auth_timeout": max(30, ssh.connect_timeout)},
        )
        # Host keys are checked against the inventory's own known_hosts only:
        # an unknown or changed key is an error, never silently accepted.
        conn.client = paramiko.SSHClient()
        self._trust_host_keys(conn.client, known_hosts, ssh.port)
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
        # Commands are small packets sent one after another (channel open, exec, EOF):
        # with Nagle's algorithm each waited for the host's delayed ACK, 40 ms a command.
        conn.client.get_transport().sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self._conn = conn
        return conn

    def _trust_host_keys(self, client: paramiko.SSHClient, known_hosts: Path, port: int) -> None:
        """This host's entries of the inventory's known_hosts, which is parsed once per
        run (each connection parsing every host's key made a run's cost grow with the
        square of the hosts)."""
        every = self.run.memo(("known_hosts", str(known_hosts)), lambda: paramiko.HostKeys(str(known_hosts)))
        mine = client.get_host_keys()
        for name in (self.address, f"[{self.address}]:{port}"):
            for keytype, key in (every.lookup(name) or {}).items():
                mine.add(name, keytype, key)

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
        if not self.run.check:
            self.run.changed_any = True
        self.run.report.result(self.name, "would change" if self.run.check else "changed", message)

    def note(self, message: str) -> None:
        self.run.report.note(f"{self.name}: {message}")

    # --- commands -----------------------------------------------------------

    def _exec(self, cmd: str, *, stdin: str | None = None, timeout: float | None = None) -> Result:
        started = time.monotonic()
        try:
            result = channel_run(self.conn.client.get_transport(), cmd, stdin=stdin, timeout=timeout)
        except Exception as exc:  # connection dropped
            result = Result("", f"{type(exc).__name__}: {exc}", -1)
        self.run.report.command(self.name, cmd, result, time.monotonic() - started)
        return result

    def probe(self, cmd: str, *, stdin: str | None = None, timeout: float | None = None) -> Result:
        """A read-only command: always runs, never counts as a change, may fail."""
        return self._exec(cmd, stdin=stdin, timeout=timeout)

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

    def in_group(self, user: str, group: str, why: str) -> bool:
        """``user`` is a member of ``group`` (the name matched whole: `ssl-cert-old`
        is not `ssl-cert`); ``why`` says what the membership is for. Returns changed
        (a running process keeps its old groups: restart it)."""
        return self.ensure(f"id -nG {q(user)} | tr ' ' '\\n' | grep -qxF {q(group)}",
                           f"usermod -a -G {q(group)} {q(user)}", f"user {user} in group {group} ({why})")

    # --- packages and services ----------------------------------------------

    def _package_table(self) -> dict[str, bool]:
        """Every package's state on the host, one `dpkg-query -W` per run (again after an install)."""
        return self.memo("packages", lambda: facts.package_states(self.probe(facts.PACKAGES_COMMAND).stdout))

    def installed(self, package: str) -> bool:
        """Whether the Debian package is installed."""
        return self._package_table().get(package, False)

    def packages(self, names: Iterable[str], *, preseed: Iterable[str] = (), no_start: bool = False) -> bool:
        """Install what is missing of ``names``. ``preseed``: debconf answers
        ("pkg question type value") given before an install. ``no_start``: no
        service may start while they install (a policy-rc.d that forbids it,
        removed afterwards; a policy-rc.d that is not ours is refused)."""
        names = sorted(set(names))
        with self._apt:
            return self._install(names, list(preseed), no_start)

    def _install(self, names: list[str], preseed: list[str], no_start: bool) -> bool:
        table = self._package_table()
        installed = {n for n in names if table.get(n)}
        missing = [n for n in names if n not in installed]
        if not missing:
            self.ok(f"packages present: {' '.join(names)}")
            return False
        if preseed:
            self.sh("debconf-set-selections", stdin="".join(line + "\n" for line in preseed),
                    message="debconf: " + "; ".join(preseed))
        guard = no_start and not self.run.check
        if guard:
            if self.probe(f"test -e {POLICY_RC}").ok and not self.probe(f"grep -q hastack {POLICY_RC}").ok:
                raise HostFailed(f"{POLICY_RC} exists and is not ours; refusing to replace it to install "
                                 + " ".join(missing))
            self.sh(f"printf %s {q(POLICY_RC_TEXT)} > {POLICY_RC} && chmod 0755 {POLICY_RC}",
                    message=f"{POLICY_RC}: no service starts during the install")
        install = ("DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends "
                   f"-o Dpkg::Options::=--force-confold {APT_LOCK_WAIT} " + " ".join(q(n) for n in missing))
        try:
            self.sh(
                f"{install} || ({APT_UPDATE} && {install})",
                message=f"install {' '.join(missing)}" + (" (no service started)" if no_start else ""),
                timeout=1800,
            )
        finally:
            if guard:
                self.sh(f"rm -f {POLICY_RC}", message=f"remove {POLICY_RC} (services may start again)")
        if not self.run.check:
            self.forget("packages")  # dependencies came with them: read the table again
        return True

    def apt_update(self) -> Result:
        """Refresh apt's package lists (after a repository was added), bounded and retried."""
        with self._apt:
            return self.sh(APT_UPDATE, message="apt-get update")

    def service(self, name: str, *, enabled: bool = True, running: bool = True,
                restart: bool = False, reload: bool = False) -> None:
        """Converge a systemd unit; ``restart``/``reload`` when its config changed.
        Its state is one probe (`systemctl show`), not one per question."""
        u = q(name)
        state = self.unit_state(name)
        is_enabled = state.get("UnitFileState") == "enabled"
        is_active = state.get("ActiveState") in ("active", "reloading")
        skipped = running and not is_active and self._skipped(name, state)
        if skipped:  # e.g. timesyncd in a container: the unit says it does not apply here
            running = False
        if enabled != is_enabled:
            self.sh(f"systemctl {'enable' if enabled else 'disable'} {u}")
        if running and not is_active:
            # a unit that failed (e.g. started by its package before its config was
            # there) may have hit its start limit: forget that first
            reset = f"systemctl reset-failed {u}; " if state.get("ActiveState") == "failed" else ""
            self.sh(f"{reset}systemctl start {u}")
        elif not running and is_active:
            self.sh(f"systemctl stop {u}")
        elif running and (restart or reload):
            self.sh(f"systemctl {'reload' if reload and not restart else 'restart'} {u}")
        elif enabled == is_enabled:
            state_word = "skipped by its unit conditions" if skipped else "running" if running else "stopped"
            self.ok(f"service {name} {state_word}")

    def nginx_site(self, name: str, template: str, vars: dict) -> bool:
        """An nginx site rendered from configs/<template> into sites-available/<name>
        and enabled, with Debian's default site disabled; after a change `nginx -t`
        checks the whole configuration. Returns whether the site file changed."""
        available, enabled = f"/etc/nginx/sites-available/{name}", f"/etc/nginx/sites-enabled/{name}"
        changed = self.template(template, available, vars)
        self.ensure(f"test \"$(readlink {q(enabled)})\" = {q(available)}", f"ln -sfn {q(available)} {q(enabled)}",
                    f"nginx site {name} enabled")
        self.ensure("! test -e /etc/nginx/sites-enabled/default", "rm -f /etc/nginx/sites-enabled/default",
                    "nginx default site disabled")
        if changed and not self.run.check:
            r = self.probe("nginx -t")
            if not r.ok:
                raise HostFailed(f"`nginx -t` refused the new site:\n{r.stderr.strip()}")
        return changed

    UNIT_PROPERTIES = ("LoadState", "UnitFileState", "ActiveState", "ConditionResult", "ConditionTimestampMonotonic")

    def unit_state(self, name: str) -> dict[str, str]:
        """A unit's properties that `service` decides on: from the table of known
        units (core/facts.py) while nothing changed in this run, else one probe."""
        self.run.known.touched_unit(self.name, name)
        if not self.run.changed_any:
            if self._units is None:
                units = self.run.known.units_of(self.name)
                self._units = {}
                if units:
                    skipped = [u for u in self.run.known.skipped_of(self.name) if u in units]
                    # their conditions are evaluated (systemd-analyze, the costly part) in
                    # the table's round trip when the first question is about one of them;
                    # a run that never asks about them does not pay for it
                    evaluate = skipped if name in skipped else []
                    r = self.probe(facts.units_command(units, self.UNIT_PROPERTIES, evaluate))
                    self._units = (facts.parse_units(units, r.stdout) if r.ok else None) or {}
            if name in self._units:
                return dict(self._units[name])
        props = " ".join(f"-p {p}" for p in self.UNIT_PROPERTIES)
        out = self.probe(f"systemctl show {props} {q(name)}").stdout
        return dict(line.split("=", 1) for line in out.splitlines() if "=" in line)

    def enabled(self, name: str) -> bool:
        """Whether the unit is enabled (UnitFileState=enabled), from ``unit_state``."""
        return self.unit_state(name).get("UnitFileState") == "enabled"

    def active(self, name: str) -> bool:
        """Whether the unit is active (or reloading), from ``unit_state``."""
        return self.unit_state(name).get("ActiveState") in ("active", "reloading")

    def _skipped(self, unit: str, state: dict[str, str]) -> bool:
        """True when systemd skipped the unit's last start for its conditions
        (ConditionResult=no) and they still fail now: a unit skipped before its
        config existed (ConditionFileNotEmpty=...) is started again, a unit that
        does not apply here (ConditionVirtualization=!container) is left alone
        without trying it on every run. `systemd-analyze condition` evaluates
        the unit's conditions without starting anything: in the table's round
        trip for a unit an earlier run found skipped, else in a probe of its own."""
        if state.get("ConditionResult") != "no" or state.get("ConditionTimestampMonotonic", "0") == "0":
            return False
        now = state.get(facts.CONDITIONS)
        if now is None:
            now = "pass" if self.probe(facts.conditions_command([unit])).stdout.split() == [unit, "pass"] else "fail"
        if now == "fail":
            self.run.known.skipped(self.name, unit)
        return now == "fail"

    # --- files --------------------------------------------------------------

    def template(self, name: str, dest: str, vars: dict | None = None, *, owner: str = "root",
                 group: str = "root", mode: str = "0644", validate: str | None = None,
                 check: Callable[[str], None] | None = None) -> bool:
        """Render configs/<name> for this host with the tier's ``vars`` and put it at
        ``dest`` (see ``put``). ``check(text)`` runs here on the rendered text
        before anything is uploaded (a UserError from it stops the host)."""
        content = templates.render(name, self.inv, self.name, self.run.secret, **(vars or {}))
        if check is not None:
            check(content)
        return self.put(content, dest, owner=owner, group=group, mode=mode, validate=validate)

    def wait_for(self, cmd: str, *, timeout: int, what: str) -> None:
        """Wait (on the host, one round trip) until ``cmd`` succeeds; a HostFailed
        saying what did not happen within ``timeout`` seconds otherwise. Nothing
        to wait for in check mode."""
        if self.run.check:
            return
        r = self._exec(retry_loop(cmd, timeout), timeout=timeout + 30)
        if not r.ok:
            raise HostFailed(f"{what}: not after {timeout} s")

    def _file_fact(self, path: str) -> facts.FileFact | None:
        """What the table of known paths (core/facts.py) says of ``path``; None when
        it does not know it, or when something changed (on any host) in this run."""
        self.run.known.touched(self.name, path)
        if self.run.changed_any:
            return None
        if self._files is None:
            paths = self.run.known.paths_of(self.name)
            self._files = {}
            if paths:
                r = self.probe(facts.read_command(paths))
                if r.ok:
                    self._files = facts.parse(paths, r.stdout)
                    self.run.known.seen(self.name, self._files)
        return self._files.get(path)

    def put(self, content: str | bytes, dest: str, *, owner: str = "root", group: str = "root",
            mode: str = "0644", validate: str | None = None) -> bool:
        """Upload ``content`` to ``dest`` only when it differs (by SHA-256), with owner,
        group and mode. ``validate`` is the service's checker: with ``{}`` it runs on the
        new file before it replaces the old one; without, it runs after the swap
        and the old file is put back if it fails. Returns whether anything changed."""
        data = content.encode() if isinstance(content, str) else content
        want_hash = hashlib.sha256(data).hexdigest()
        qd = q(dest)
        fact = self._file_fact(dest)
        if fact is None:
            state = self.probe(f"stat -c '%U:%G:%a' {qd} && sha256sum {qd}")
            fact = facts.ABSENT
            if state.ok:
                lines = state.stdout.split("\n")
                fact = facts.FileFact(True, lines[0].strip(), lines[1].split()[0])
        exists, have_meta, have_hash = fact.exists, fact.meta, fact.sha256
        want_meta = f"{owner}:{group}:{int(mode, 8):o}"
        if have_hash == want_hash and have_meta == want_meta:
            self.ok(dest)
            return False
        if have_hash == want_hash:
            self.sh(f"chown {q(owner + ':' + group)} {qd} && chmod {q(mode)} {qd}",
                    message=f"{dest}: owner/mode {want_meta}")
            return True
        old = self.probe(f"cat {qd}").stdout if exists else ""
        if self.run.check:
            self.changed(f"{dest} would be {'updated' if exists else 'created'}")
            self.run.report.diff(self.name, _diff(old, data, dest))
            return True
        tmp = f"{dest}.hastack-new"
        qt = q(tmp)
        self._exec(f"mkdir -p \"$(dirname {qd})\"")
        self.conn.put(io.BytesIO(data), tmp)
        setup = self._exec(f"chown {q(owner + ':' + group)} {qt} && chmod {q(mode)} {qt}")
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
            had_old = exists
            if had_old:
                self._exec(f"cp -a {qd} {q(backup)}")
            self._swap(tmp, dest)
            check = self._exec(validate)
            if not check.ok:
                restore = f"mv -f {q(backup)} {qd}" if had_old else f"rm -f {qd}"
                self._exec(restore)
                raise HostFailed(f"{dest}: new file rejected by `{validate}`, old file restored:\n"
                                 + (check.stderr or check.stdout).strip())
            self._exec(f"rm -f {q(backup)}")
        else:
            self._swap(tmp, dest)
        self.changed(f"{dest} {'updated' if exists else 'created'}")
        self.run.report.log(f"[{self.name}] diff:\n" + _diff(old, data, dest))
        return True

    def _swap(self, tmp: str, dest: str) -> None:
        r = self._exec(f"mv -f {q(tmp)} {q(dest)}")
        if not r.ok:
            raise HostFailed(_failure(f"mv {tmp} {dest}", r))

    # patchwork's file helpers, run through our probes/actions so that they are
    # logged, reported and respect check mode.

    def _runner(self, cmd: str, *, warn: bool = False, **_) -> Result:
        # patchwork runs its checks with warn=True and its changes without.
        return self.probe(cmd) if warn else self.sh(cmd)

    def exists(self, path: str) -> bool:
        return files.exists(self.conn, q(path), runner=self._runner)

    def directory(self, path: str, *, owner: str = "root", group: str = "root", mode: str = "0755") -> bool:
        want = f"{owner}:{group}:{int(mode, 8):o}"
        fact = self._file_fact(path)
        if fact is None:
            state = self.probe(f"stat -c '%U:%G:%a' {q(path)}")
            fact = facts.FileFact(True, state.stdout.strip()) if state.ok else facts.ABSENT
        if fact.exists and fact.meta == want:
            self.ok(f"{path}/")
            return False
        files.directory(self.conn, q(path), user=q(owner), group=q(group), mode=q(mode), runner=self._runner)
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
