"""`inv status` and the read-only tasks, on recording hosts: a healthy lab's answers
give only green lines and exit status 0; a Galera node that is non-Primary or
unreachable, a stopped Pacemaker resource, a failing WAL archiver, a VIP on two
hosts give red lines naming them and exit status 1 while every other line still
comes; --json prints the lines as JSON; read-only tasks end without a recap."""

from __future__ import annotations

import json
import re
import time
from pathlib import Path

import pytest
from invoke import Config, Context
from invoke.exceptions import Exit

import tasks
from fabfile import cluster, ejabberd, pxc, status
from fabfile.core import Result, UserError, remote
from fabfile.core.inventory import load
from fabfile.core.sql import mysql_e
from fabfile.core.testing import RecordingRun
from fabfile.pxc.facts import STATUS_SQL

ROOT = Path(__file__).resolve().parents[2]
LAB_PATH = ROOT / "inventory/lab.yml"
LAB = load(LAB_PATH)
NOW = int(time.time())
UUID = "6b0c1c9e-0000-11ee-8000-0123456789ab"

NODE = ('<node name="{name}" id="{id}" online="{online}" standby="{standby}" standby_onfail="false" '
        'maintenance="false" pending="false" unclean="false" shutdown="false" expected_up="true" '
        'is_dc="{dc}" resources_running="{n}" type="member"/>')
RSC = ('<resource id="{id}" resource_agent="{agent}" role="{role}" active="{active}" orphaned="false" '
       'blocked="false" maintenance="false" managed="true" failed="{failed}" failure_ignored="false" '
       'nodes_running_on="{count}">{on}</resource>')


def rsc(rid, agent, node="postfix01", role="Started", failed="false"):
    on = f'<node name="{node}" id="1" cached="true"/>' if node else ""
    return RSC.format(id=rid, agent=agent, role=role, active="true" if node else "false", failed=failed,
                      count=1 if node else 0, on=on)


def crm_mon(*, standby="postfix03", stopped=(), failures=""):
    """`crm_mon -1 --output-as=xml` of the lab's cluster (Pacemaker 2.1's shape)."""
    nodes = "".join(NODE.format(name=n, id=i, online="true", standby=str(n == standby).lower(),
                                dc=str(i == 1).lower(), n=0 if n == standby else 3)
                    for i, n in enumerate(("postfix01", "postfix02", "postfix03"), 1))
    def member(rid, agent):
        return rsc(rid, agent, None, "Stopped") if rid in stopped else rsc(rid, agent)

    return f"""<pacemaker-result api-version="2.30" request="crm_mon -1 --output-as=xml">
  <summary>
    <stack type="corosync"/>
    <current_dc present="true" version="2.1.5" name="postfix01" id="1" with_quorum="true" mixed_version="false"/>
    <nodes_configured number="3"/>
    <resources_configured number="6" disabled="0" blocked="0"/>
  </summary>
  <nodes>{nodes}</nodes>
  <resources>
    {rsc("fence_lab", "stonith:fence_lab", "postfix02")}
    <group id="mail" number_resources="3" maintenance="false" managed="true" disabled="false">
      {member("virtual_ip", "ocf:heartbeat:IPaddr2")}
      {member("postfix", "systemd:postfix@-")}
      {member("dovecot", "systemd:dovecot")}
    </group>
    <group id="dbproxy" number_resources="2" maintenance="false" managed="true" disabled="false">
      {rsc("dbproxy_ip", "ocf:heartbeat:IPaddr2")}
      {rsc("haproxy", "systemd:haproxy")}
    </group>
  </resources>
  <node_history><node name="postfix01"><resource_history id="postfix" orphan="false"/></node></node_history>
  <failures>{failures}</failures>
  <status code="0" message="OK"/>
</pacemaker-result>"""


class Site:
    """What the lab's hosts answer when everything is healthy; a test changes an
    attribute to make one fault."""

    def __init__(self):
        self.galera = {n: ("Primary", "Synced", 3) for n in ("pxc1", "pxc2", "pxc3")}
        self.crm_mon = crm_mon()
        self.addresses = {"ngx01": ["10.200.11.111", "10.200.11.100"],
                          "postfix01": ["10.200.11.113", "10.200.11.110", "10.200.11.116"],
                          "e1server": ["10.200.1.2", "10.200.1.4"]}
        self.pg_replication = "10.200.1.11|streaming|0|0\n"
        self.archiver = f"on|42|00000001000000000000002A|{NOW - 60}|0|||{NOW}\n"
        self.receiver = "streaming|10.200.1.10|replica_psql2server|0\n"
        self.ejabberd_down: set[str] = set()
        self.cluster_list = "ejabberd@e1server\nejabberd@e2server\n"
        self.backup = f"{NOW}\n{status.BACKUP_METRIC}{{job=\"postgres\"}} {NOW - 3600}\n"
        self.alerts = '{"status":"success","data":{"alerts":[]}}'
        self.unexpected: list[tuple[str, str]] = []

    def __call__(self, h, cmd, stdin):
        r = self.answer(h.name, cmd)
        if r is None:
            self.unexpected.append((h.name, cmd))
        return r

    def answer(self, host, cmd):
        if cmd == "pidof mariadbd" and host in self.galera:
            return Result("4242\n") if self.galera[host] else Result(exited=1)
        if cmd == "cat /var/lib/mysql/grastate.dat" and host in self.galera:
            return Result(f"version: 2.1\nuuid: {UUID}\nseqno: -1\nsafe_to_bootstrap: 0\n")
        if "SHOW GLOBAL STATUS" in cmd and self.galera.get(host):
            st, state, size = self.galera[host]
            return Result(f"wsrep_cluster_status\t{st}\nwsrep_local_state_comment\t{state}\n"
                          f"wsrep_cluster_size\t{size}\nwsrep_cluster_state_uuid\t{UUID}\n"
                          f"wsrep_last_committed\t40\nwsrep_on\t1\n")
        if "information_schema.TABLES" in cmd:  # pxc.status: tables without a primary key
            return Result("")
        if cmd == status.CRM_MON:
            return Result(self.crm_mon)
        if cmd == status.IP_ADDRS:
            return Result("".join(f"2: eth0    inet {a}/24 brd 10.200.0.255 scope global eth0\\       "
                                  "valid_lft forever preferred_lft forever\n" for a in self.addresses.get(host, [])))
        if host == "psql1server":
            return {status.PG_ROLE: Result("f\n"), status.PG_REPLICATION: Result(self.pg_replication),
                    status.PG_ARCHIVER: Result(self.archiver)}.get(cmd)
        if host == "psql2server":
            return {status.PG_ROLE: Result("t\n"), status.PG_RECEIVER: Result(self.receiver)}.get(cmd)
        if cmd == ejabberd.STATUS:
            if host in self.ejabberd_down:
                return Result("Failed RPC connection to the node ejabberd@" + host + ": nodedown\n", exited=3)
            return Result(f"The node ejabberd@{host} is started. Status: started\n")
        if cmd == "ejabberdctl list_cluster":
            return Result(self.cluster_list)
        if cmd == "ejabberdctl connected_users_number":
            return Result("0\n")
        if cmd == status.BACKUP_READ and host == "bk1server":
            return Result(self.backup, exited=0)
        if cmd == status.ALERTS_READ and host == "mon1server":
            return Result(self.alerts) if self.alerts is not None else Result(exited=7)
        if cmd.startswith("ip -o -4 addr show"):  # ejabberd.cluster-status: the VIP
            return Result(exited=1)
        return None


def recording(site, **kw):
    return RecordingRun(LAB, responder=site, **kw)


def lines_of(site, **kw):
    run = recording(site, **kw)
    return run, status.gather_lines(run)


def by_object(lines, component):
    return {line.object: line for line in lines if line.component == component}


# --- inv status on recording hosts ----------------------------------------------------------


def test_a_healthy_site_is_all_green_one_line_per_component():
    site = Site()
    run, lines = lines_of(site)
    assert site.unexpected == []
    # postfix03 is in standby in the fixture: yellow, the only line that is not green.
    bad = [line for line in lines if line.level != status.GREEN]
    assert [(line.object, line.state, line.level) for line in bad] == [("postfix03", "standby", "yellow")]
    assert by_object(lines, "ssh") == {"16 of 16 hosts": status.Line("ssh", "16 of 16 hosts", "reachable", "",
                                                                       "green")}
    assert {o: (x.state, x.detail) for o, x in by_object(lines, "galera").items()} == {
        n: ("Primary Synced", "size 3 of 3, seqno 40") for n in ("pxc1", "pxc2", "pxc3")}
    assert by_object(lines, "postgres")["psql1server"].detail == "1 of 1 replica(s) streaming"
    assert by_object(lines, "postgres")["psql2server"].detail == (
        "streaming from 10.200.1.10, slot replica_psql2server; lag 0 bytes, 0 s (primary's view)")
    assert by_object(lines, "postgres archiver")["psql1server"].state == "archiving"
    assert set(by_object(lines, "pacemaker resource")) == {"fence_lab", "virtual_ip", "postfix", "dovecot",
                                                          "dbproxy_ip", "haproxy"}
    assert {o: x.state for o, x in by_object(lines, "vip").items()} == {
        "webmail 10.200.11.100": "held by ngx01", "mail 10.200.11.110": "held by postfix01",
        "dbproxy 10.200.11.116": "held by postfix01", "xmpp 10.200.1.4": "held by e1server"}
    assert set(by_object(lines, "ejabberd")) == {"e1server", "e2server"}
    assert by_object(lines, "backup")['bk1server {job="postgres"}'].state == "ok"
    assert by_object(lines, "alerts")["mon1server"].state == "none firing"
    # Read-only: nothing changed anywhere; each host was asked once per check it is in.
    assert all(s.changes == [] for s in run._sessions.values())
    assert run.session("psql1server").commands == [status.PG_ROLE, status.PG_ARCHIVER, status.PG_REPLICATION]
    assert run.session("e1server").commands == [ejabberd.STATUS, "ejabberdctl list_cluster", status.IP_ADDRS]
    assert run.session("gw1server").commands == [] and "gw1server" in run.connected


def test_healthy_through_the_task_prints_one_table_no_recap_and_exits_0(monkeypatch):
    site = Site()
    site.crm_mon = crm_mon(standby=None)
    runs = patch_run(monkeypatch, site)
    status.status(ctx())  # no Exit: status 0
    out = runs[0].output
    assert runs[0].report.title == "status"
    assert "Status of lab" in out and re.search(r"│ galera\s+│ pxc2\s+│ Primary Synced\s+│", out), out
    assert "0 yellow, 0 red" in out and "red line" not in out
    assert "Recap" not in out and "nothing to do" not in out and "ok, 0 changed" not in out
    assert "== " not in out  # the steps are in the log, the table is the output
    log = runs[0].report.log_path.read_text()
    assert "== status: pacemaker on postfix01, postfix02, postfix03" in log


@pytest.mark.parametrize("fault, want", [
    ("non-primary", ("galera", "pxc2", "non-Primary Initialized")),
    ("stopped", ("galera", "pxc2", "stopped")),
    ("unreachable", ("galera", "pxc2", "unreachable")),
])
def test_a_galera_node_not_primary_or_unreachable_is_red_and_exits_1(monkeypatch, fault, want):
    site = Site()
    if fault == "non-primary":
        site.galera["pxc2"] = ("non-Primary", "Initialized", 1)
    elif fault == "stopped":
        site.galera["pxc2"] = None
    runs = patch_run(monkeypatch, site, down={"pxc2"} if fault == "unreachable" else set())
    with pytest.raises(Exit) as exited:
        status.status(ctx())
    assert exited.value.code == 1
    out = runs[0].output
    component, obj, state = want
    assert re.search(rf"│ {component}\s+│ {obj}\s+│ {state}\s+│.*│ red\s+│", out), out
    assert "error: " in out and f"{component} {obj}: {state}" in out
    # The other lines still come: the other nodes, the other tiers.
    assert re.search(r"│ galera\s+│ pxc1\s+│ Primary Synced", out)
    assert re.search(r"│ postgres\s+│ psql1server\s+│ primary", out)
    assert re.search(r"│ alerts\s+│ mon1server\s+│ none firing", out)
    assert "Recap" not in out and "nothing to do" not in out
    if fault == "unreachable":
        assert re.search(r"│ ssh\s+│ pxc2\s+│ unreachable\s+│ pxc2 \(10\.200\.0\.121:22\): unreachable",
                         out), out
        assert runs[0].session("pxc2").commands == []


def test_json_lists_the_lines_on_stdout_with_the_same_exit_rule(monkeypatch, capsys):
    site = Site()
    site.crm_mon = crm_mon(standby=None)
    patch_run(monkeypatch, site)
    status.status(ctx(), json=True)
    out = capsys.readouterr()
    lines = json.loads(out.out)
    assert lines and all(set(x) == {"component", "object", "state", "detail", "level"} for x in lines)
    assert {x["level"] for x in lines} == {"green"}
    assert "error" not in out.err and "log: " in out.err  # the human part on stderr
    site.galera["pxc3"] = ("non-Primary", "Initialized", 1)
    patch_run(monkeypatch, site)
    with pytest.raises(Exit) as exited:
        status.status(ctx(), json=True)
    assert exited.value.code == 1
    out = capsys.readouterr()
    lines = json.loads(out.out)
    assert {"component": "galera", "object": "pxc3", "state": "non-Primary Initialized",
            "detail": "size 1 of 3, seqno 40", "level": "red"} in lines
    assert "error: 1 red line(s): galera pxc3: non-Primary Initialized" in out.err


def test_a_failing_tier_does_not_hide_the_others():
    site = Site()
    site.crm_mon = crm_mon(stopped=("postfix",), failures=(
        '<failure op_key="postfix_monitor_30000" node="postfix01" exitstatus="not running" exitreason="" '
        'exitcode="7" call="25" status="complete" last-rc-change="2024-05-01 10:00:00Z" task="monitor"/>'))
    site.receiver = "\n"  # the replica's WAL receiver is gone, the primary streams to nobody
    site.pg_replication = ""
    site.archiver = f"on|42|00000001000000000000002A|{NOW - 600}|3|00000001000000000000002B|{NOW - 30}|{NOW}\n"
    site.addresses["ngx02"] = ["10.200.11.112", "10.200.11.100"]
    site.ejabberd_down = {"e2server"}
    site.cluster_list = "ejabberd@e1server\n"
    site.backup = f"{NOW}\n"  # no metric: the backup tier is not deployed
    site.alerts = None  # curl gets no answer
    _, lines = lines_of(site)
    red = {(x.component, x.object): x for x in lines if x.level == status.RED}
    assert set(red) == {("pacemaker resource", "postfix"), ("pacemaker failure", "postfix_monitor_30000"),
                        ("postgres", "psql2server"), ("postgres archiver", "psql1server"),
                        ("vip", "webmail 10.200.11.100"), ("ejabberd", "e2server")}
    assert red[("pacemaker resource", "postfix")].state == "Stopped"
    assert red[("postgres", "psql2server")].detail == "WAL receiver not running"
    assert red[("postgres archiver", "psql1server")].state == "failing"
    assert red[("postgres archiver", "psql1server")].detail.startswith(
        "3 failure(s), the last 30 s ago (00000001000000000000002B); last success 10 min ago")
    assert red[("vip", "webmail 10.200.11.100")].detail == "ngx01, ngx02: split brain"
    yellow = {(x.component, x.object): x.state for x in lines if x.level == status.YELLOW}
    assert yellow[("backup", "bk1server")] == "not deployed"
    assert yellow[("alerts", "mon1server")] == "monitoring not answering"
    assert yellow[("ejabberd", "e1server")] == "running"  # its cluster lacks e2server
    assert yellow[("postgres", "psql1server")] == "primary"  # psql2server not streaming


def test_only_the_tiers_the_inventory_has_and_the_selected_hosts():
    site = Site()
    _, lines = lines_of(site, only="psql1server,psql2server,ngx01")
    assert {x.component for x in lines} == {"ssh", "postgres", "postgres archiver", "vip"}
    assert by_object(lines, "ssh") == {"3 of 3 hosts": status.Line("ssh", "3 of 3 hosts", "reachable", "", "green")}
    # Only ngx01 of the webmail VIP's hosts was asked; the others' VIPs were not.
    assert {o: x.level for o, x in by_object(lines, "vip").items()} == {"webmail 10.200.11.100": "green"}


def test_host_output_is_data_never_a_command_or_markup(monkeypatch):
    site = Site()
    site.crm_mon = site.crm_mon.replace('id="haproxy"', 'id="[bold]x$(reboot)"')
    site.cluster_list = "ejabberd@e1server\nejabberd@e2server\n'; reboot; '\n"
    site.alerts = json.dumps({"status": "success", "data": {"alerts": [
        {"labels": {"alertname": "Disk[red]Full`id`", "severity": "critical", "instance": "pxc1"},
         "annotations": {"summary": "[link=x]$(reboot)"}, "state": "firing"}]}})
    runs = patch_run(monkeypatch, site)
    with pytest.raises(Exit):
        status.status(ctx())
    out = runs[0].output
    assert "[bold]x$(reboot)" in out and "Disk[red]Full`id`" in out and "[link=x]$(reboot)" in out
    commands = {c for _, c in runs[0].all_commands()}
    assert not any("reboot" in c or "Disk" in c for c in commands)
    assert commands == {"pidof mariadbd", "cat /var/lib/mysql/grastate.dat", mysql_e(STATUS_SQL), status.CRM_MON,
                        status.IP_ADDRS, status.PG_ROLE, status.PG_REPLICATION, status.PG_ARCHIVER,
                        status.PG_RECEIVER, ejabberd.STATUS, "ejabberdctl list_cluster", status.BACKUP_READ,
                        status.ALERTS_READ}


# --- the checks' decisions ---------------------------------------------------------------------


def test_pacemaker_quorum_offline_and_clone_instances():
    xml = crm_mon(standby=None).replace('with_quorum="true"', 'with_quorum="false"').replace(
        'name="postfix02" id="2" online="true"', 'name="postfix02" id="2" online="false"')
    xml = xml.replace("</resources>", '<clone id="DrbdData-clone" multi_state="true">'
                      + rsc("DrbdData", "ocf:linbit:drbd", "postfix01", "Promoted")
                      + rsc("DrbdData", "ocf:linbit:drbd", "postfix03", "Unpromoted")
                      + rsc("DrbdData", "ocf:linbit:drbd", None, "Stopped") + "</clone></resources>")
    local = {"postfix01": None, "postfix02": "crm_mon does not answer: not connected", "postfix03": None}
    lines = status.crm_mon_lines(xml, ["postfix01", "postfix02", "postfix03"], local, "postfix01")
    got = {(x.component, x.object, x.state): x.level for x in lines}
    assert got[("pacemaker", "cluster", "no quorum")] == "red"
    assert got[("pacemaker", "postfix02", "offline")] == "red"
    assert got[("pacemaker", "postfix01", "online")] == "green"
    # The clone's two running instances; the instance clone-max leaves stopped is not a fault.
    assert [(x.state, x.level) for x in lines if x.object == "DrbdData"] == [("Promoted", "green"),
                                                                              ("Unpromoted", "green")]
    assert status.crm_mon_lines("<oops", ["postfix01"], {}, "postfix01")[0].level == "red"


def test_a_failed_action_of_a_running_resource_is_yellow():
    failure = ('<failure op_key="virtual_ip_monitor_30000" node="postfix02" exitstatus="error" exitreason="gone" '
               'task="monitor" last-rc-change="2024-05-01 10:00:00Z"/>')
    lines = status.crm_mon_lines(crm_mon(failures=failure), ["postfix01"], {"postfix01": None}, "postfix01")
    line = next(x for x in lines if x.component == "pacemaker failure")
    assert line.level == "yellow" and "monitor on postfix02: error; gone" in line.detail


def test_postgres_role_against_the_inventory_and_lag():
    inv = LAB
    answers = {"psql1server": status.PgNode(in_recovery=True, receiver=["streaming", "10.200.1.11", "", "0"]),
               "psql2server": status.PgNode(replication=[], archiver=[])}
    lines = status.pg_lines(inv, ["psql1server", "psql2server"], answers, {})
    assert [(x.object, x.state, x.level) for x in lines] == [
        ("psql1server", "replica", "red"), ("psql2server", "primary", "red"), ("psql2server", "unknown", "red")]
    assert lines[1].detail == "the inventory says replica (two primaries?)"
    answers = {"psql1server": status.PgNode(replication=[["10.200.1.11", "streaming", "123456", "95"]],
                                            archiver=["on", "0", "", "", "0", "", "", str(NOW)]),
               "psql2server": status.PgNode(in_recovery=True, receiver=["streaming", "10.200.1.10", "s", "0"])}
    lines = status.pg_lines(inv, ["psql1server", "psql2server"], answers, {})
    assert [(x.component, x.state, x.level) for x in lines] == [
        ("postgres", "primary", "green"), ("postgres archiver", "idle", "yellow"),
        ("postgres", "replica, lagging", "yellow")]
    assert "lag 123456 bytes, 95 s" in lines[2].detail and "more than 30 s behind" in lines[2].detail
    assert status.archiver_line("p", ["off", "0", "", "", "0", "", "", "1"]).state == "off"


def test_backups_stale_and_alerts_by_severity():
    old = Result(f"{NOW}\n{status.BACKUP_METRIC} {NOW - 30 * 3600}\n")
    assert [(x.state, x.level) for x in status.backup_lines("bk1server", old, 26)] == [("stale", "red")]
    assert status.backup_lines("bk1server", Result("", "Connection reset", -1), 26)[0].level == "red"
    firing = json.dumps({"status": "success", "data": {"alerts": [
        {"labels": {"alertname": "PostgresReplicationLag", "severity": "warning"}, "state": "firing",
         "annotations": {"summary": "psql2server is 40 s behind"}},
        {"labels": {"alertname": "GaleraNotPrimary", "severity": "critical", "instance": "pxc2"}, "state": "firing"},
        {"labels": {"alertname": "Soon"}, "state": "pending"}]}})
    lines = status.alert_lines("mon1server", Result(firing))
    assert [(x.object, x.level) for x in lines] == [("PostgresReplicationLag", "yellow"),
                                                    ("GaleraNotPrimary pxc2", "red")]
    assert status.alert_lines("mon1server", Result("<html>"))[0].state == "monitoring not answering"
    assert status.alert_lines("mon1server", Result('{"status":"success","data":[]}'))[0].level == "yellow"


def test_vip_nowhere_is_red_unless_hosts_narrowed_it():
    held = {"ngx01": {"10.200.11.111"}}
    assert status.vip_line("webmail", "10.200.11.100", ["ngx01", "ngx02"], held, False).detail == \
        "not on ngx01, ngx02 (not read: ngx02)"
    assert status.vip_line("webmail", "10.200.11.100", ["ngx01"], held, True).level == "yellow"
    assert status.vip_line("webmail", "10.200.11.100", ["ngx01"], held, False).level == "red"


# --- read-only tasks ---------------------------------------------------------------------------

READ_ONLY = {"status", "pxc.status", "postgres.status", "cluster.status", "keepalived.status", "webmail.status",
             "ejabberd.cluster-status", "ejabberd.list-users", "mail.list"}


def _all_tasks(coll, prefix=""):
    for name, task in coll.tasks.items():
        yield prefix + name, task
    for name, sub in coll.collections.items():
        yield from _all_tasks(sub, f"{prefix}{name}.")


def test_status_and_listing_tasks_are_read_only_and_the_others_are_not():
    runbooks = {name: task.body.readonly for name, task in _all_tasks(tasks.ns) if hasattr(task.body, "runbook")}
    assert READ_ONLY <= {name for name, readonly in runbooks.items() if readonly}
    changing = [n for n in runbooks if n.endswith(".deploy") or n.startswith("deploy.") or n in (
        "pxc.bootstrap", "cluster.standby", "ejabberd.register-user", "mail.add-mailbox")]
    assert len(changing) > 10 and not any(runbooks[n] for n in changing)
    assert tasks.ns.tasks["status"].help["check"] != tasks.ns.collections["pxc"].tasks["deploy"].help["check"]


def test_pxc_status_prints_its_table_and_no_recap(monkeypatch):
    runs = patch_run(monkeypatch, Site())
    pxc.status(ctx())
    out = runs[0].output
    assert re.search(r"│ pxc1\s+│ alive\s+│ Primary\s+│ Synced\s+│ 3", out), out
    assert "tables without a primary key (refused by pxc_strict_mode / wsrep_mode): none" in out
    assert "Recap" not in out and "nothing to do" not in out and not re.search(r"\d+ ok, \d+ changed", out)
    assert "log: " in out


def test_a_read_only_task_that_fails_on_a_host_names_it_and_exits_1(monkeypatch):
    site = Site()
    site.ejabberd_down = {"e2server"}
    runs = patch_run(monkeypatch, site)
    with pytest.raises(Exit) as exited:
        ejabberd.cluster_status(ctx())
    assert exited.value.code == 1
    out = runs[0].output
    assert "failed e2server: ejabberd@e2server not running" in out
    assert "failed on 1 host(s): e2server" in out and "Recap" not in out


def test_a_read_only_task_stopped_by_an_error_says_why_without_a_recap(monkeypatch):
    site = Site()
    site.crm_mon = ""
    runs = patch_run(monkeypatch, site, fail=r"^crm_mon -1 >/dev/null$")
    with pytest.raises(Exit) as exited:
        cluster.status(ctx())
    assert exited.value.code == 1
    out = runs[0].output
    assert "error: no cluster node (crm_mon -1) answers" in out and "Recap" not in out and "stopped early" not in out


def test_a_deploy_still_ends_with_its_recap(monkeypatch):
    runs = patch_run(monkeypatch, Site())
    tasks.ns.collections["base"].tasks["hosts-file"](ctx(), hosts="pxc1")
    assert "Recap: base.hosts-file" in runs[0].output and re.search(r"\d+ ok, \d+ changed, 0 failed", runs[0].output)


# --- helpers -----------------------------------------------------------------------------------


def ctx() -> Context:
    return Context(Config(overrides={"inventory": str(LAB_PATH)}))


def patch_run(monkeypatch, site, *, down=(), fail=None):
    """The tasks' `Run` becomes a RecordingRun answering with ``site``; hosts in
    ``down`` cannot be reached; commands matching ``fail`` fail everywhere."""
    runs: list[RecordingRun] = []

    def make(inv, *, title, only=None, check=False):
        run = RecordingRun(inv, responder=site, title=title, only=only, check=check,
                           answers={"*": [(fail, Result(exited=1))]} if fail else None)
        for host in down:
            def unreachable(host=host):
                raise UserError(f"{host} ({inv.management_address(host)}:22): unreachable (no answer in 5s)")
            run.session(host).open = unreachable
        runs.append(run)
        return run

    monkeypatch.setattr(remote, "Run", make)
    return runs
