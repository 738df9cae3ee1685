"""Firewall and gateway tiers, without hosts: the rule table, what it renders
to for every host of every shipped inventory, the SSH lock-out guard, the
gateway's routes and FORWARD chain, and the decisions the steps take."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

from fabfile import firewall, gateway
from fabfile.core import flows
from fabfile.core import UserError, templates
from fabfile.core.inventory import ROLES, load, parse
from fabfile.core.remote import Result
from fabfile.core.testing import RecordingRun, files_present
from tests.unit.shipped import INVENTORIES

ROOT = Path(__file__).resolve().parents[2]

LAB = ROOT / "inventory/lab.yml"


def secret(name):
    return "not-a-secret"


def v4(inv, host):
    return firewall.render_v4(inv, host, secret)


def lines(inv, host, chain="INPUT"):
    return [line for line in v4(inv, host).splitlines() if line.startswith(f"-A {chain} ")]


@pytest.fixture(scope="module")
def lab():
    return load(LAB)


# --- the table ----------------------------------------------------------------


def test_every_role_has_a_row_in_the_table():
    assert set(flows.TABLE) == set(ROLES)


def test_rows_name_known_roles_and_protocols():
    for role, allows in flows.TABLE.items():
        for a in allows:
            assert a.proto in {"tcp", "udp", "icmp", "vrrp"}, (role, a)
            if isinstance(a.sources, tuple):
                assert set(a.sources) <= set(ROLES), (role, a)
            else:
                assert a.sources in (flows.ANYONE, flows.MGMT, flows.LOCAL_NETS, flows.WEBMAIL_CLIENTS,
                                     flows.BACKUP_CLIENTS), (role, a)
            assert a.why and '"' not in a.why and len(a.why) < 200


@pytest.mark.parametrize("inventory", INVENTORIES, ids=lambda p: p.name)
def test_rules_render_and_keep_ssh_for_every_host(inventory):
    inv = load(inventory)
    mgmt = str(inv.networks[inv.management_network].cidr)
    for host in inv.hosts:
        text = v4(inv, host)
        firewall.check_ssh_kept(text, inv, host)
        assert ":INPUT DROP [0:0]" in text and ":FORWARD DROP [0:0]" in text
        assert f"-A INPUT -s {mgmt} -p tcp -m tcp --dport 22 " in text
        assert "-A INPUT -i lo -j ACCEPT" in text
        assert "-A INPUT -m conntrack --ctstate RELATED,ESTABLISHED -j ACCEPT" in text
        assert "-A INPUT -p icmp -m icmp --icmp-type 8 " in text
        v6 = templates.render(firewall.TEMPLATE_V6, inv, host, secret, **firewall.template_vars(inv, host, secret))
        assert ":INPUT DROP [0:0]" in v6 and "--icmpv6-type 135" in v6 and "--dport" not in v6


def test_ssh_is_only_open_to_the_management_network(lab):
    for host in lab.hosts:
        ssh = [line for line in lines(lab, host) if "--dport 22 " in line]
        assert ssh == [line for line in ssh if line.startswith("-A INPUT -s 10.200.0.0/24 ")], host
        assert len(ssh) == 1


def test_ejabberd_cluster_ports_only_from_the_other_node(lab):
    e1 = lines(lab, "e1server")
    epmd = [line for line in e1 if "--dport 4369 " in line]
    assert epmd == [line for line in epmd if line.startswith("-A INPUT -s 10.200.1.3/32 ")] and len(epmd) == 1
    window = [line for line in e1 if "--dport 4200:4210 " in line]
    assert len(window) == 1 and "-s 10.200.1.3/32" in window[0]
    assert any("-s 10.200.1.3/32 -p vrrp" in line for line in e1)
    client = [line for line in e1 if "5222,5223,5269,5280,5443,1883" in line]
    assert len(client) == 1 and " -s " not in client[0]


def test_postgres_only_from_ejabberd_and_the_other_postgres_host(lab):
    srcs = {line.split()[3] for line in lines(lab, "psql1server") if "--dport 5432 " in line}
    assert srcs == {"10.200.1.2/32", "10.200.1.3/32", "10.200.1.11/32"}
    srcs = {line.split()[3] for line in lines(lab, "psql2server") if "--dport 5432 " in line}
    assert srcs == {"10.200.1.2/32", "10.200.1.3/32", "10.200.1.10/32"}


def test_exporters_and_bacula(lab):
    for host in ("e1server", "psql1server", "psql2server", "gw1server", "bk1server"):
        assert [line.split()[3] for line in lines(lab, host) if "--dport 9100 " in line] == ["10.200.1.13/32"], host
    assert [line.split()[3] for line in lines(lab, "psql1server") if "--dport 9187 " in line] == ["10.200.1.13/32"]
    for host in ("e1server", "e2server", "psql2server", "mon1server"):
        assert [line.split()[3] for line in lines(lab, host) if "--dport 9102 " in line] == ["10.200.1.12/32"], host
    # Only the clients of the inventory's jobs (the seed's: not psql1server).
    assert not any("9102" in line for line in lines(lab, "psql1server"))
    bk = lines(lab, "bk1server")
    assert {line.split()[3] for line in bk if "--dport 9103 " in line} == {
        "10.200.1.2/32", "10.200.1.3/32", "10.200.1.11/32", "10.200.1.13/32"}
    assert not any("--dport 9101 " in line for line in bk), "bconsole runs on the director's host"
    assert not any("9102" in line for line in lines(lab, "gw1server"))


def test_mail_cluster_rules(lab):
    pf1 = lines(lab, "postfix01")
    assert any(line.startswith("-A INPUT -s 10.200.11.0/24 -p tcp -m multiport --dports 25,587,143,993 ")
               for line in pf1)
    corosync = {line.split()[3] for line in pf1 if "--dport 5404:5406 " in line}
    assert corosync == {"10.200.11.114/32", "10.200.11.115/32"}
    assert all("-p udp" in line for line in pf1 if "5404:5406" in line)
    # haproxy stands in for ProxySQL in the lab: 3306 on the dbproxy VIP only.
    proxy = [line for line in pf1 if "-d 10.200.11.116/32" in line and "--dport 8405 " not in line]
    metrics = [line.split()[3] for line in pf1 if "-d 10.200.11.116/32" in line and "--dport 8405 " in line]
    assert metrics == ["10.200.11.130/32"]  # HAProxy's Prometheus endpoint: the monitoring host only
    assert {line.split()[3] for line in proxy} == {
        "10.200.11.111/32", "10.200.11.112/32", "10.200.11.114/32", "10.200.11.115/32"}
    assert all("--dports 3306,3307 " in line for line in proxy)  # writer and reader ports
    # no DRBD in the lab (storage: none), DRBD on Vagrant
    assert not any("7788" in line for line in pf1)
    vagrant = load(ROOT / "inventory/vagrant.yml")
    assert any("--dport 7788:7799 " in line for line in lines(vagrant, "postfix01"))
    assert any("--dport 6033 " in line for line in lines(vagrant, "postfix01"))
    pxc = lines(lab, "pxc1")
    galera = {line.split()[3] for line in pxc if "3306,4444,4567,4568" in line}
    assert galera == {"10.200.11.121/32", "10.200.11.122/32"}
    # MySQL from the DB proxy hosts only: Roundcube on the front ends goes through the proxy
    mysql = {line.split()[3] for line in pxc if "--dport 3306 " in line}
    assert mysql == {"10.200.11.113/32", "10.200.11.114/32", "10.200.11.115/32"}
    ngx = lines(lab, "ngx01")
    assert any("-s 10.200.11.112/32 -p vrrp" in line for line in ngx)
    # the webmail VIP from webmail.client_networks (the mail network), and nothing else on 80/443
    web = [line for line in ngx if "80,443" in line]
    assert web and all("-s 10.200.11.0/24 -d 10.200.11.100/32 " in line for line in web), web


def test_no_whole_network_source_for_role_rows(lab):
    """Rows whose sources are roles become host addresses (/32), never networks."""
    for host in lab.hosts:
        for rule in flows.input_rules(lab, host):
            if rule.src and not rule.src.endswith("/32"):
                assert rule.src in ("10.200.0.0/24", "10.200.11.0/24"), (host, rule)


def test_only_the_gateway_has_a_forward_chain(lab):
    for host in lab.hosts:
        forward = lines(lab, host, "FORWARD")
        assert bool(forward) == (host == "gw1server"), host


# --- iptables itself (as root) ------------------------------------------------

needs_iptables = pytest.mark.skipif(
    os.geteuid() != 0 or not shutil.which("iptables-restore") or not shutil.which("unshare"),
    reason="needs root, iptables and unshare",
)


def _in_new_netns(script: str, stdin: str) -> subprocess.CompletedProcess:
    """Run ``script`` in a throw-away network namespace: the machine's own
    firewall is never touched."""
    return subprocess.run(["unshare", "--net", "sh", "-c", script], input=stdin, text=True,
                          capture_output=True, timeout=60)


@needs_iptables
@pytest.mark.parametrize("inventory", INVENTORIES, ids=lambda p: p.name)
def test_iptables_restore_accepts_and_save_matches_the_file(inventory):
    """iptables-restore --test accepts every rendered file, and after loading
    it iptables-save prints the same rules: the step's 'live table matches the
    file' check holds right after a load, so a re-run changes nothing."""
    inv = load(inventory)
    for host in inv.hosts:
        for tool, name in (("iptables", firewall.TEMPLATE_V4), ("ip6tables", firewall.TEMPLATE_V6)):
            text = templates.render(name, inv, host, secret, **firewall.template_vars(inv, host, secret))
            test = _in_new_netns(f"{tool}-restore --test", text)
            assert test.returncode == 0, f"{host} {tool}: {test.stderr}"
            loaded = _in_new_netns(f"{tool}-restore && {tool}-save -t filter", text)
            assert loaded.returncode == 0, f"{host} {tool}: {loaded.stderr}"
            assert firewall.canonical(loaded.stdout) == firewall.canonical(text), f"{host} {tool}"


@needs_iptables
def test_iptables_restore_rejects_garbage():
    assert _in_new_netns("iptables-restore --test", "*filter\n-A INPUT -p tcp --dport x -j ACCEPT\nCOMMIT\n").returncode


def test_canonical_ignores_comments_counters_and_quoting():
    a = '# x\n*filter\n:INPUT DROP [12:345]\n-A INPUT -m comment --comment "ping" -j ACCEPT\nCOMMIT\n'
    b = "*filter\n:INPUT DROP [0:0]\n-A INPUT -m comment --comment ping -j ACCEPT\nCOMMIT\n"
    assert firewall.canonical(a) == firewall.canonical(b)
    assert firewall.canonical(a) != firewall.canonical(b.replace("ping", "pong"))


# --- the SSH lock-out guard ---------------------------------------------------



def test_guard_refuses_a_table_without_ssh(lab, monkeypatch):
    monkeypatch.setattr(flows, "EVERY_HOST", [a for a in flows.EVERY_HOST if a.proto != "tcp"])
    with pytest.raises(UserError) as err:
        firewall.check_ssh_kept(v4(lab, "psql1server"), lab, "psql1server")
    assert "psql1server" in str(err.value) and "10.200.0.0/24" in str(err.value)
    assert "policy is DROP" in str(err.value)


def test_guard_refuses_ssh_from_the_wrong_network(lab, monkeypatch):
    wrong = flows.Allow("tcp", "22", ("monitoring",), "SSH from the monitoring host")
    monkeypatch.setattr(flows, "EVERY_HOST", [flows.EVERY_HOST[0], wrong])
    with pytest.raises(UserError, match="e1server: firewall rules refused"):
        firewall.check_ssh_kept(v4(lab, "e1server"), lab, "e1server")


def test_preflight_refuses_before_any_host_is_touched(lab, monkeypatch):
    """The runbook's first step: a broken table stops the run with every
    offending host named, before a connection is opened."""
    monkeypatch.setattr(flows, "EVERY_HOST", [flows.Allow("icmp", "echo-request")])
    run = RecordingRun(lab)
    with pytest.raises(UserError) as err:
        firewall.preflight(run, ["e1server", "pxc2"])
    assert "nothing was changed" in str(err.value)
    assert "e1server:" in str(err.value) and "pxc2:" in str(err.value)
    assert run.connected == [] and run.all_commands() == []


def test_preflight_passes_the_real_table(lab):
    firewall.preflight(RecordingRun(lab), list(lab.hosts))


def _with_input(*rules, policy="DROP"):
    body = "\n".join(rules)
    return f"*filter\n:INPUT {policy} [0:0]\n:FORWARD DROP [0:0]\n:OUTPUT ACCEPT [0:0]\n{body}\nCOMMIT\n"


SSH_OK = "-A INPUT -s 10.200.0.0/24 -p tcp -m tcp --dport 22 -j ACCEPT"


@pytest.mark.parametrize("rules", [
    ("-A INPUT -j DROP", SSH_OK),
    ("-A INPUT -p tcp -j REJECT --reject-with tcp-reset", SSH_OK),
    ("-A INPUT -s 10.200.0.128/25 -p tcp -m multiport --dports 20:30 -j DROP", SSH_OK),
    ("-A INPUT -p tcp -m tcp --dport 22 -m conntrack --ctstate NEW -j DROP", SSH_OK),
    ("-A INPUT ! -s 10.200.0.0/25 -j DROP", SSH_OK),
    ("-A INPUT -m recent --update -j DROP", SSH_OK),
    ("-A INPUT -s 10.200.0.0/25 -p tcp -m tcp --dport 22 -j ACCEPT",),
    ("-A INPUT -i mgmt -p tcp -m tcp --dport 22 -j ACCEPT",),
    ("-A INPUT -s 10.200.0.0/24 -p udp -m udp --dport 22 -j ACCEPT",),
    ("-A INPUT -s 10.200.0.0/24 -p tcp -m tcp --dport 2222 -j ACCEPT",),
    ("-I INPUT -s 10.200.0.0/24 -p tcp -m tcp --dport 22 -j ACCEPT",),
], ids=lambda r: " | ".join(r))
def test_guard_refuses(lab, rules):
    with pytest.raises(UserError, match="gw1server: firewall rules refused"):
        firewall.check_ssh_kept(_with_input(*rules), lab, "gw1server")


@pytest.mark.parametrize("rules", [
    (SSH_OK, "-A INPUT -j DROP"),
    ("-A INPUT -i lo -j ACCEPT", "-A INPUT -m conntrack --ctstate INVALID -j DROP",
     "-A INPUT -p udp -j DROP", "-A INPUT ! -i lo -d 127.0.0.0/8 -j REJECT",
     "-A INPUT -s 10.200.1.0/24 -j DROP", "-A INPUT -p tcp -m tcp --dport 25 -j DROP", SSH_OK),
    ("-A INPUT -p tcp -m multiport --dports 22,80 -j ACCEPT",),
    ("-A INPUT -s 10.0.0.0/8 -j ACCEPT",),
    ("-A INPUT -j ACCEPT",),
], ids=lambda r: " | ".join(r))
def test_guard_accepts(lab, rules):
    firewall.check_ssh_kept(_with_input(*rules), lab, "gw1server")


def test_guard_uses_the_inventory_ssh_port(lab):
    inv = lab.model_copy(update={"ssh": lab.ssh.model_copy(update={"port": 2222})})
    with pytest.raises(UserError, match="tcp/2222"):
        firewall.check_ssh_kept(_with_input(SSH_OK), inv, "gw1server")
    assert "--dport 2222 " in v4(inv, "gw1server")
    firewall.check_ssh_kept(v4(inv, "gw1server"), inv, "gw1server")


def test_no_policy_drop_without_rules_is_fine(lab):
    firewall.check_ssh_kept(_with_input(policy="ACCEPT"), lab, "gw1server")


# --- gateway: segments, routes, FORWARD ---------------------------------------


def test_segments_and_routes_come_from_the_gateway_addresses(lab):
    assert flows.gateways(lab) == ["gw1server"]
    assert flows.segments(lab, "gw1server") == ["dmz", "internal"]
    assert flows.routes(lab, "e1server") == [flows.Route("10.200.1.8/29", "10.200.1.1", "gw1server")]
    for host in ("psql1server", "psql2server", "bk1server", "mon1server"):
        assert flows.routes(lab, host) == [flows.Route("10.200.1.0/29", "10.200.1.9", "gw1server")]
    # the spare is on both segments (it may replace an ejabberd node or a replica): no route through the gateway
    for host in ("gw1server", "ngx01", "postfix01", "pxc1", "r1server"):
        assert flows.routes(lab, host) == []


THREE_SEGMENTS = """
site: {name: t, domain: t.test}
networks:
  m: {cidr: 10.9.0.0/24, management: true}
  a: {cidr: 10.9.1.0/24}
  b: {cidr: 10.9.2.0/24}
  c: {cidr: 10.9.3.0/24}
hosts:
  gw: {roles: [gateway], addresses: {m: 10.9.0.1, a: 10.9.1.1, b: 10.9.2.1, c: 10.9.3.1}}
  x:  {roles: [ejabberd], addresses: {m: 10.9.0.2, a: 10.9.1.2}}
  y:  {roles: [postgres_primary], addresses: {m: 10.9.0.3, b: 10.9.2.3}}
  z:  {roles: [monitoring], addresses: {m: 10.9.0.4, c: 10.9.3.4, b: 10.9.2.4}}
xmpp: {domain: x.t.test}
monitoring: {alert_email: ops@t.test}
"""


def test_routes_for_three_segments_and_a_host_on_two():
    inv = parse(THREE_SEGMENTS)
    assert flows.routes(inv, "x") == [flows.Route("10.9.2.0/24", "10.9.1.1", "gw"),
                                        flows.Route("10.9.3.0/24", "10.9.1.1", "gw")]
    # z is on b and c: only a is routed, via the gateway address on the first of them (gateway order)
    assert flows.routes(inv, "z") == [flows.Route("10.9.1.0/24", "10.9.2.1", "gw")]
    fwd = flows.forward_rules(inv, "gw")
    tcp = {(r.src, r.dst, r.ports) for r in fwd if r.proto == "tcp"}
    assert ("10.9.1.2/32", "10.9.2.3/32", "5432") in tcp
    # z shares network b with y: its scrape of y is not forwarded, of x it is
    assert ("10.9.2.4/32", "10.9.1.2/32", "9100") in tcp  # from the address its route uses
    assert not any(r.dst == "10.9.2.3/32" and r.ports == "9100" for r in fwd)
    assert len([r for r in fwd if r.proto == "icmp"]) == 6


def test_forward_chain_passes_only_the_xmpp_flows(lab):
    fwd = flows.forward_rules(lab, "gw1server")
    tcp = {(r.src, r.dst, r.ports) for r in fwd if r.proto == "tcp"}
    assert {("10.200.1.2/32", "10.200.1.10/32", "5432"), ("10.200.1.3/32", "10.200.1.10/32", "5432"),
            ("10.200.1.13/32", "10.200.1.2/32", "9100"), ("10.200.1.12/32", "10.200.1.3/32", "9102"),
            ("10.200.1.2/32", "10.200.1.12/32", "9103")} <= tcp
    # nothing from anyone, no client ports, nothing into the internal net from the DMZ but PostgreSQL and Bacula
    assert all(r.src and r.dst for r in fwd)
    assert not any("5222" in r.ports for r in fwd)
    into_internal = {r.ports for r in fwd if r.proto == "tcp" and r.src.startswith("10.200.1.") and
                     int(r.src.split(".")[3].split("/")[0]) < 8}
    assert into_internal == {"5432", "9103"}
    icmp = [(r.src, r.dst) for r in fwd if r.proto == "icmp"]
    assert icmp == [("10.200.1.0/29", "10.200.1.8/29"), ("10.200.1.8/29", "10.200.1.0/29")]
    assert flows.forward_rules(lab, "e1server") == []


def test_routes_unit_renders(lab):
    text = templates.render(gateway.UNIT_TEMPLATE, lab, "psql1server", secret,
                            **gateway.template_vars(lab, "psql1server", secret))
    assert "ExecStart=/bin/ip route replace 10.200.1.0/29 via 10.200.1.9" in text
    assert "WantedBy=multi-user.target" in text


# --- step decisions (facts in, commands out) ---------------------------------


def _step(inv, host, fn, *rules, check=False):
    run = RecordingRun(inv, answers={host: list(rules)}, check=check)
    fn(run.session(host))
    return run.session(host)


def test_load_skips_when_the_live_table_matches(lab):
    text = v4(lab, "e1server")
    saved = "# Generated by iptables-save\n" + text.replace('"ping"', "ping").replace("[0:0]", "[5:600]")
    h = _step(lab, "e1server", lambda h: firewall._load(h, "iptables", firewall.RULES_V4, text, saved))
    assert h.changes == [] and h.reported("ok")


def test_load_restores_atomically_when_the_live_table_differs(lab):
    text = v4(lab, "e1server")
    for live in ("", None):  # an empty table, or one that could not be read
        h = _step(lab, "e1server", lambda h: firewall._load(h, "iptables", firewall.RULES_V4, text, live))
        assert h.changes == ["iptables-restore /etc/iptables/rules.v4"]
        assert not any("-F" in cmd or "flush" in cmd for cmd in h.changes)


@pytest.mark.parametrize("answer, tables", [
    (Result("v4 rules\n==hastack-ip6tables==\nv6 rules\n"), {"iptables": "v4 rules\n", "ip6tables": "v6 rules\n"}),
    (Result("v4 rules\n", exited=1), {}),  # ip6tables-save failed: both are loaded again
    (Result("", exited=127), {}),
])
def test_both_live_tables_are_read_in_one_round_trip(lab, answer, tables):
    run = RecordingRun(lab, answers={"e1server": [(r"^iptables-save -t filter && echo ", answer)]})
    h = run.session("e1server")
    assert firewall._live_tables(h) == tables
    assert h.commands == [firewall.LIVE_TABLES]


def _converged_files(inv, host, files):
    """Answers of a host where ``files`` (path -> content, mode) are in place, root:root."""
    return files_present({path: (f"root:root:{mode}", text) for path, (text, mode) in files.items()})


def test_apply_rules_on_a_converged_host_runs_no_command(lab):
    host = "e1server"
    v6 = templates.render(firewall.TEMPLATE_V6, lab, host, secret, **firewall.template_vars(lab, host, secret))
    text = v4(lab, host)
    rules = [
        files_present({firewall.RULES_V4: ("root:root:640", text), firewall.RULES_V6: ("root:root:640", v6),
                       "/etc/iptables": ("root:root:755", None)}),
        (r"^iptables-save -t filter && ", Result(stdout=f"{text}==hastack-ip6tables==\n{v6}")),
        (r"^systemctl is-enabled", Result(stdout="enabled\n")),
        (r"^systemctl is-active", Result()),
    ]
    run = RecordingRun(lab, answers={host: rules}, secrets={})
    run.secrets.get = lambda name, *a: secret(name)
    firewall.apply_rules(run.session(host))
    assert run.session(host).changes == []


def test_routes_step_adds_only_missing_routes(lab):
    unit = templates.render(gateway.UNIT_TEMPLATE, lab, "psql1server", secret,
                            **gateway.template_vars(lab, "psql1server", secret))
    converged = [
        _converged_files(lab, "psql1server", {"/etc/systemd/system/hastack-routes.service": (unit, "644")}),
        (r"^systemctl is-enabled", Result(stdout="enabled\n")), (r"^systemctl is-active", Result()),
    ]
    present = Result(stdout="10.200.1.0/29 via 10.200.1.9 dev internal \n")
    h = _step(lab, "psql1server", gateway._routes, (r"^ip -4 route show 10.200.1.0/29", present), *converged)
    assert h.changes == []
    h = _step(lab, "psql1server", gateway._routes, (r"^ip -4 route show", Result(stdout="")), *converged)
    assert h.changes == ["ip route replace 10.200.1.0/29 via 10.200.1.9"]


def test_install_preseeds_only_before_the_package_is_there(lab):
    h = _step(lab, "e1server", firewall.install, (r"^dpkg-query", Result(stdout="")))
    assert h.changes[0] == "debconf-set-selections" and h.changes[1].startswith("DEBIAN_FRONTEND=noninteractive")
    assert "iptables-persistent" in h.changes[1]
    assert "autosave_v4 boolean false" in h.stdins[0][1]
    listed = "".join(f"{p} installed\n" for p in firewall.PACKAGES)
    h = _step(lab, "e1server", firewall.install, (r"^dpkg-query", Result(stdout=listed)))
    assert h.changes == []


def test_collections_document_every_task():
    for coll in (firewall.ns, gateway.ns):
        assert coll.default == "deploy"
        for name, task in coll.tasks.items():
            assert task.__doc__ and task.__doc__.strip(), name
            for arg in task.get_arguments():
                assert arg.help, f"{coll.name}.{name} --{arg.name}"
