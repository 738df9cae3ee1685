"""The core's Run on recording hosts: chains of steps side by side, a failure
in one stopping the other, per-run memo, one-host operations."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest

from fabfile.core import Result, StepFailed, UserError
from fabfile.core.inventory import load
from fabfile.core.testing import RecordingRun

LAB = load(Path(__file__).resolve().parents[2] / "inventory/lab.yml")


def test_chains_run_side_by_side_each_in_order():
    run = RecordingRun(LAB)
    both = threading.Barrier(2, timeout=5)  # each chain's first step waits for the other's: they overlap
    order: list[str] = []

    def chain(name, host):
        def go():
            run.step(f"{name}: one", [host], lambda h: (both.wait(), order.append(f"{name} 1")))
            run.step(f"{name}: two", [host], lambda h: order.append(f"{name} 2"))
        return go

    run.side_by_side({"xmpp": chain("xmpp", "e1server"), "mail": chain("mail", "pxc1")})
    assert order.index("xmpp 1") < order.index("xmpp 2") and order.index("mail 1") < order.index("mail 2")


def test_a_failure_in_one_chain_stops_the_other_before_its_next_step():
    run = RecordingRun(LAB, answers={"e1server": [(r"^false", Result(stderr="broken", exited=3))]})
    started, failed = threading.Event(), threading.Event()
    ran: list[str] = []

    def xmpp():  # fails while the mail chain is in the middle of its first step
        try:
            run.step("xmpp: one", ["e1server"], lambda h: (started.wait(5), h.sh("false")))
        finally:
            failed.set()

    def mail():
        run.step("mail: one", ["pxc1"], lambda h: (started.set(), failed.wait(5), ran.append("mail 1")))
        run.step("mail: two", ["pxc1"], lambda h: ran.append("mail 2"))

    with pytest.raises(StepFailed) as err:
        run.side_by_side({"xmpp": xmpp, "mail": mail})
    assert ran == ["mail 1"]
    text = str(err.value)
    assert text.startswith("xmpp: step 'xmpp: one' failed") and "e1server" in text and "exited 3" in text
    assert "broken" in text and "mail:" not in text


def test_one_chain_runs_inline():
    run = RecordingRun(LAB)
    ran = []
    run.side_by_side({"only": lambda: ran.append(threading.current_thread() is threading.main_thread())})
    assert ran == [True]


def test_memo_computes_once_per_run_and_host():
    run = RecordingRun(LAB)
    calls = []
    for _ in range(3):
        run.memo("k", lambda: calls.append("run") or 1)
        run.session("e1server").memo("k", lambda: calls.append("host") or 2)
    assert calls == ["run", "host"]
    assert RecordingRun(LAB).session("e1server").memo("k", lambda: 3) == 3  # another run: computed again


def test_answering_prefers_and_falls_back_and_names_every_host_tried():
    run = RecordingRun(LAB, answers={"e2server": [(r"^ready$", Result()), (r"^holds-vip$", Result())],
                                     "e1server": [(r"^ready$", Result())]})
    assert run.answering(["e1server", "e2server"], what="node", probe="ready", prefer="holds-vip").name == "e2server"
    assert run.answering(["e1server", "e2server"], what="node", probe="ready").name == "e1server"
    run = RecordingRun(LAB)
    with pytest.raises(UserError, match=r"no node answers, nothing was changed \(e1server: node does not answer"):
        run.answering(["e1server", "e2server"], what="node", probe="ready")


def test_on_one_turns_a_host_failure_into_a_named_error():
    run = RecordingRun(LAB)
    with pytest.raises(UserError, match=r"^e1server: `false` exited 1"):
        run.on_one("op", run.session("e1server"), lambda h: h.sh("false") if h.probe("x").ok else h.read("false"))



HANG_UP = """
import socket, sys, threading
from fabfile.core import UserError
from fabfile.core.inventory import load
from fabfile.core.remote import Run
server = socket.socket()
server.bind(("127.0.0.1", int(sys.argv[2])))
server.listen(4)
def hang_up():
    while True:
        conn, _ = server.accept()
        conn.close()
threading.Thread(target=hang_up, daemon=True).start()
run = Run(load(sys.argv[1]), title="t")
try:
    run.connect(["h1"])
except UserError as exc:
    print(exc)
"""


def test_a_host_that_never_sends_its_ssh_banner_is_one_line_not_a_traceback(tmp_path):
    """paramiko logs a failed handshake from its transport thread (through
    Python's last-resort handler when nothing configured logging, as under
    `inv`); the operator sees only the run's one line for that host."""
    import socket
    import subprocess
    import sys

    import yaml

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    (tmp_path / "key").write_text("")
    (tmp_path / "kh").write_text("")
    inv_file = tmp_path / "site.yml"
    inv_file.write_text(yaml.safe_dump({
        "site": {"name": "t", "domain": "t.test"},
        "ssh": {"port": port, "connect_timeout": 3, "key_file": "key", "known_hosts": "kh"},
        "networks": {"mgmt": {"cidr": "127.0.0.0/8", "management": True}},
        "hosts": {"h1": {"roles": ["spare"], "addresses": {"mgmt": "127.0.0.1"}}},
    }))
    out = subprocess.run([sys.executable, "-c", HANG_UP, str(inv_file), str(port)], capture_output=True, text=True,
                         timeout=60, cwd=Path(__file__).resolve().parents[2])
    assert "cannot reach every host" in out.stdout and "h1 (127.0.0.1:" in out.stdout, out.stdout + out.stderr
    assert "Traceback" not in out.stderr and "paramiko" not in out.stderr, out.stderr


def test_service_reads_a_units_state_in_one_probe():
    run = RecordingRun(load(Path(__file__).resolve().parents[2] / "inventory/lab.yml"), answers={"pxc1": [
        (r"^systemctl show ", Result(stdout="LoadState=loaded\nUnitFileState=enabled\nActiveState=active\n"
                                            "ConditionResult=yes\nConditionTimestampMonotonic=123\n"))]})
    h = run.session("pxc1")
    h.service("nginx")
    assert h.commands == ["systemctl show -p LoadState -p UnitFileState -p ActiveState -p ConditionResult "
                          "-p ConditionTimestampMonotonic nginx"]
    assert h.reported("ok") == ["service nginx running"]


@pytest.mark.parametrize("conditions_now, started", [(False, False), (True, True)])
def test_a_unit_skipped_for_its_conditions_is_started_only_when_they_pass_now(conditions_now, started):
    """timesyncd in a container (ConditionVirtualization=!container) is left alone
    with no start tried on every run; keepalived skipped before its config existed
    (ConditionFileNotEmpty=) is started once its conditions pass."""
    show = Result(stdout="LoadState=loaded\nUnitFileState=enabled\nActiveState=inactive\n"
                         "ConditionResult=no\nConditionTimestampMonotonic=123\n")
    run = RecordingRun(load(Path(__file__).resolve().parents[2] / "inventory/lab.yml"), answers={"pxc1": [
        (r"^systemctl show ", show),
        (r"^for u in unit1; do ", Result(f"unit1 {'pass' if conditions_now else 'fail'}\n"))]})
    h = run.session("pxc1")
    h.service("unit1")
    assert h.changes == (["systemctl start unit1"] if started else [])
    if not started:
        assert h.reported("ok") == ["service unit1 skipped by its unit conditions"]


def test_deploy_all_runs_monitoring_beside_backup_after_both_systems(monkeypatch):
    """deploy.all: the common tiers, then the two systems side by side and beside
    them the packages of the last tiers (each chain waits for the others to have
    started: they overlap; not on the hosts the mail chain keeps busy), then
    monitoring and Bacula side by side, nothing of them before the systems are done."""
    from fabfile import deploy

    both = threading.Barrier(2, timeout=5)
    three = threading.Barrier(3, timeout=5)
    log: list[str] = []
    among: list[set] = []

    class Tier:
        def __init__(self, name, meet=False, chains=False):
            self.name, self.meet, self.chains = name, meet, chains

        def converge(self, run):
            log.append(f"{self.name} start")
            if self.chains:
                three.wait()
            if self.meet:
                both.wait()
            log.append(f"{self.name} end")

        def install(self, run, hosts):
            among.append(hosts)
            log.append(f"{self.name} install")
            three.wait()

    monkeypatch.setattr(deploy, "COMMON", [Tier("common")])
    monkeypatch.setattr(deploy, "XMPP", [Tier("xmpp", chains=True)])
    monkeypatch.setattr(deploy, "MAIL", [Tier("mail", chains=True)])
    monkeypatch.setattr(deploy, "MONITORING", [Tier("monitoring", meet=True)])
    monkeypatch.setattr(deploy, "BACKUP", [Tier("backup", meet=True)])
    monkeypatch.setattr(deploy, "EARLY_PACKAGES", [Tier("packages")])
    deploy.all.body.runbook(RecordingRun(LAB))
    assert log[:2] == ["common start", "common end"]
    assert log.index("packages install") < min(log.index("xmpp end"), log.index("mail end"))
    busy = set(LAB.with_role("galera", "mail_backend"))
    assert among == [set(LAB.hosts) - busy] and busy and "ngx01" in among[0] and "mon1server" in among[0]
    systems_done = max(log.index("xmpp end"), log.index("mail end"))
    assert min(log.index("monitoring start"), log.index("backup start")) > systems_done
    assert {log.index("monitoring start"), log.index("backup start")} == {systems_done + 1, systems_done + 2}


def test_two_chains_installing_on_one_host_take_turns():
    """Monitoring and Bacula side by side share hosts: one apt at a time on each."""
    import time

    active: list[int] = []
    peak = [0]
    lock = threading.Lock()

    def answer(h, cmd, stdin):
        if "apt-get install" in cmd:
            with lock:
                active.append(1)
                peak[0] = max(peak[0], len(active))
            time.sleep(0.05)
            with lock:
                active.pop()
            return Result()
        return None

    run = RecordingRun(LAB, responder=answer)
    h = run.session("bk1server")
    threads = [threading.Thread(target=h.packages, args=([name],))
               for name in ("bacula-fd", "prometheus-node-exporter", "pgbackrest")]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert peak[0] == 1 and len([c for c in h.commands if "apt-get install" in c]) == 3


def test_the_run_log_gives_each_step_its_start_and_its_duration_on_the_runs_clock():
    """`== step on hosts (at +N s)` when a step starts, `-- step: N s (at +N s)` when it
    ends: which steps overlapped and where a long run waited, read from the log."""
    import re

    run = RecordingRun(load(Path(__file__).resolve().parents[2] / "inventory/lab.yml"))
    run.step("one: probe", ["e1server", "e2server"], lambda h: h.probe("true"))
    text = run.report.log_path.read_text()
    assert re.search(r"^== one: probe on e1server, e2server \(at \+\d+\.\ds\)$", text, re.M)
    assert re.search(r"^-- one: probe: \d+\.\d\ds \(at \+\d+\.\ds\)$", text, re.M)


def test_the_early_installs_only_install_and_only_among_the_given_hosts():
    """webmail, monitoring and backup `install(run, among)`: packages (stopped where
    the tier installs them stopped) on the selected hosts among ``among``, nothing
    configured, nothing on the other hosts."""
    from fabfile import backup, monitoring, webmail

    busy = set(LAB.with_role("galera", "mail_backend"))
    among = set(LAB.hosts) - busy
    run = RecordingRun(LAB)
    for tier in (webmail, monitoring, backup):
        tier.install(run, among)
    touched = {host for host, _ in run.all_commands()}
    assert touched and touched <= among and {"ngx01", "mon1server", "bk1server"} <= touched
    allowed = ("dpkg-query -W", "DEBIAN_FRONTEND=noninteractive apt-get install ", "debconf-set-selections",
               "test -e /usr/sbin/policy-rc.d", "rm -f /usr/sbin/policy-rc.d", "printf %s '#!/bin/sh")
    for host, cmd in run.all_commands():
        assert cmd.startswith(allowed), (host, cmd)
    # installed stopped where the tier installs them stopped (exporters, the file daemon, the director)
    assert any("policy-rc.d" in cmd for host, cmd in run.all_commands() if host == "psql1server")


def test_deploy_all_runs_the_systems_one_after_the_other_when_a_host_is_in_both(monkeypatch, tmp_path):
    """A host with a role of each system: the XMPP tiers, then the mail tiers, one
    chain; the early packages still beside it."""
    import yaml

    from fabfile import deploy
    from fabfile.core.inventory import load as load_inventory

    data = yaml.safe_load((Path(__file__).resolve().parents[2] / "inventory/lab.yml").read_text())
    data["hosts"]["pxc1"]["roles"].append("ejabberd")
    data["hosts"]["pxc1"]["addresses"]["dmz"] = "10.200.1.6"  # the xmpp VIP's network
    path = tmp_path / "lab.yml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    inv = load_inventory(path)
    log: list[str] = []
    beside = threading.Event()

    class Tier:
        def __init__(self, name):
            self.name = name

        def converge(self, run):
            log.append(self.name)
            if self.name == "xmpp2":
                assert beside.wait(5)  # the packages chain runs while the systems do

        def install(self, run, among):
            log.append("packages")
            beside.set()

    monkeypatch.setattr(deploy, "COMMON", [])
    monkeypatch.setattr(deploy, "XMPP", [Tier("xmpp1"), Tier("xmpp2")])
    monkeypatch.setattr(deploy, "MAIL", [Tier("mail1"), Tier("mail2")])
    monkeypatch.setattr(deploy, "MONITORING", [])
    monkeypatch.setattr(deploy, "BACKUP", [])
    monkeypatch.setattr(deploy, "EARLY_PACKAGES", [Tier("early")])
    run = RecordingRun(inv)
    deploy.all.body.runbook(run)
    assert [n for n in log if n != "packages"] == ["xmpp1", "xmpp2", "mail1", "mail2"] and "packages" in log
    assert any("belong to both systems" in m for m in run.report.log_path.read_text().splitlines())
