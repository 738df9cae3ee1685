"""Firewall tier on real lab hosts: after `inv base.deploy`, `inv gateway.deploy`
and `inv firewall.deploy`, every host drops by default; for a sample of every
role's rules a port is open from an allowed source and closed from a host
outside its sources (real TCP connections made with nc inside the lab hosts,
against a listener on the target port); a port no role opens is closed
everywhere; the rules survive a reload by netfilter-persistent; drift is
repaired; a re-run changes nothing."""

from __future__ import annotations

import re
import shlex
import socket
import textwrap
from concurrent.futures import ThreadPoolExecutor

import pytest

from tests.lab.labhost import recap, run_inv as inv

pytestmark = pytest.mark.lab


def deploy(*tasks: str) -> None:
    for task in tasks:
        out = inv(task)
        assert out.returncode == 0, f"inv {task} failed:\n{out.stdout[-5000:]}\n{out.stderr[-3000:]}"


@pytest.fixture(scope="module")
def deployed(lab):
    deploy("base.deploy", "gateway.deploy", "firewall.deploy")
    return lab


# --- listeners and connections ------------------------------------------------

LISTENER = textwrap.dedent("""\
    import socket
    s = socket.socket()
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind(("0.0.0.0", {port}))
    s.listen(64)
    while True:
        s.accept()[0].close()
""")


def listen(lab, host: str, *ports: int) -> list[int]:
    """Something listening on each port of ``host``: the real service if it is
    there, else a throw-away python listener (a transient unit). Returns the
    ports this call started, for stop()."""
    started = []
    for port in ports:
        if lab.run(host, f"ss -Hltn 'sport = :{port}' | grep -q .").returncode == 0:
            continue
        code = shlex.quote(LISTENER.format(port=port))
        lab.run(host, f"systemd-run --quiet --collect --unit=hastack-fwtest-{port} python3 -c {code}", check=True)
        started.append(port)
    waits = " && ".join(f"ss -Hltn 'sport = :{p}' | grep -q ." for p in ports)
    lab.run(host, f"for i in $(seq 50); do {waits} && exit 0; sleep 0.1; done; exit 1", check=True)
    return started


def stop(lab, host: str, ports: list[int]) -> None:
    if ports:
        lab.run(host, "systemctl stop " + " ".join(f"hastack-fwtest-{p}" for p in ports) + " || true")


def connects(lab, src: str, address: str, port: int) -> bool:
    """A real TCP connection from inside ``src`` (nc -z, 3 s timeout)."""
    r = lab.run(src, f"nc -z -w 3 {address} {port}", timeout=30)
    return r.returncode == 0


def connects_from_machine(address: str, port: int) -> bool:
    try:
        with socket.create_connection((address, port), timeout=3):
            return True
    except OSError:
        return False


# (target host, port, allowed source, target address network of the allowed
#  source, refused source, target address network for the refused source)
# A source of "machine" connects from this machine over the management network.
# A target "@VIP" is the host holding that VIP; the network "vip" its address.
SAMPLE = [
    # ejabberd
    ("e1server", 4369, "e2server", "dmz", "gw1server", "dmz"),
    ("e1server", 4205, "e2server", "dmz", "gw1server", "dmz"),
    ("e1server", 5222, "gw1server", "dmz", None, None),
    ("e1server", 9100, "mon1server", "dmz", "e2server", "dmz"),
    ("e2server", 9102, "bk1server", "dmz", "mon1server", "dmz"),
    # PostgreSQL
    ("psql1server", 5432, "psql2server", "internal", "bk1server", "internal"),
    ("psql1server", 5432, "e1server", "internal", "r1server", "internal"),
    ("psql2server", 5432, "psql1server", "internal", "mon1server", "internal"),
    ("psql2server", 9187, "mon1server", "internal", "bk1server", "internal"),
    # gateway
    ("gw1server", 9100, "mon1server", "internal", "bk1server", "internal"),
    # backup
    # the storage daemon from the jobs' clients only (psql1server has no job);
    # the director's port is for bconsole on the host itself
    ("bk1server", 9103, "psql2server", "internal", "psql1server", "internal"),
    ("bk1server", 9101, None, None, "e2server", "internal"),
    # pgBackRest's TLS server: the WAL archive of the PostgreSQL hosts, restores onto the spare
    ("bk1server", 8432, "psql1server", "internal", "mon1server", "internal"),
    ("bk1server", 8432, "r1server", "internal", "gw1server", "internal"),
    ("psql2server", 8432, "bk1server", "internal", "psql1server", "internal"),
    # monitoring
    ("mon1server", 9102, "bk1server", "internal", "psql1server", "internal"),
    ("mon1server", 443, "machine", "mgmt", "bk1server", "internal"),  # the monitoring UIs
    # exporters: from the monitoring host only
    ("pxc2", 9104, "mon1server", "mail", "pxc1", "mail"),
    # spare: SSH, ping and its node exporter
    ("r1server", 9100, "mon1server", "internal", "bk1server", "internal"),
    ("r1server", 9102, None, None, "bk1server", "internal"),
    # webmail: 80/443 on the webmail VIP only ("@webmail": the front end holding it)
    ("@webmail", 443, "postfix01", "vip", "machine", "mgmt"),
    ("@webmail", 80, "pxc3", "vip", "pxc3", "mail"),
    # mail back ends
    ("postfix01", 25, "pxc1", "mail", "machine", "mgmt"),
    ("postfix01", 993, "ngx02", "mail", "e1server", "mgmt"),
    ("postfix01", 2224, "postfix02", "mail", "ngx01", "mail"),
    # Galera
    ("pxc1", 4567, "pxc2", "mail", "ngx01", "mail"),
    ("pxc1", 3306, "postfix01", "mail", "ngx01", "mail"),  # Roundcube goes through the DB proxy
    # SSH: from the management network only
    ("psql1server", 22, "e1server", "mgmt", "bk1server", "internal"),
    ("e1server", 22, "machine", "mgmt", "gw1server", "dmz"),
]


def _check(lab, src, target, net, port, vip=None) -> bool:
    address = str(lab.inv.vips[vip].address) if net == "vip" else lab.address(target, net)
    if src == "machine":
        return connects_from_machine(address, port)
    return connects(lab, src, address, port)


def test_default_policy_is_drop_everywhere(deployed):
    results = deployed.run_all(deployed.hosts, "iptables -S INPUT | head -1; iptables -S FORWARD | head -1; ip6tables -S INPUT | head -1")
    for host, r in results.items():
        assert r.returncode == 0, f"{host}: {r.stderr}"
        assert r.stdout.split("\n")[:3] == ["-P INPUT DROP", "-P FORWARD DROP", "-P INPUT DROP"], (host, r.stdout)


def test_rules_files_and_netfilter_persistent(deployed):
    results = deployed.run_all(
        deployed.hosts,
        "head -1 /etc/iptables/rules.v4 && systemctl is-enabled netfilter-persistent "
        "&& debconf-show iptables-persistent | grep -c 'autosave_v[46]: false'",
    )
    for host, r in results.items():
        assert r.returncode == 0, f"{host}: {r.stdout} {r.stderr}"
        first, enabled, autosave = r.stdout.split("\n")[:3]
        assert "Managed by hastack" in first and enabled == "enabled" and autosave == "2", (host, r.stdout)


@pytest.mark.parametrize("target,port,good,good_net,bad,bad_net", SAMPLE,
                         ids=[f"{t}:{p}" for t, p, *_ in SAMPLE])
def test_port_open_from_allowed_and_closed_from_others(deployed, target, port, good, good_net, bad, bad_net):
    vip = None
    if target.startswith("@"):
        vip = target[1:]
        holders = deployed.vip_holders(vip)
        assert holders, f"no host holds the {vip} VIP"
        target = holders[0]
    started = listen(deployed, target, port)
    try:
        with ThreadPoolExecutor(2) as pool:
            ok = pool.submit(_check, deployed, good, target, good_net, port, vip) if good else None
            refused = pool.submit(_check, deployed, bad, target, bad_net, port, vip) if bad else None
            if ok is not None:
                assert ok.result(), f"{good} cannot reach {target}:{port} on {good_net}, but it should"
            if refused is not None:
                assert not refused.result(), f"{bad} reaches {target}:{port} on {bad_net}, but it should not"
    finally:
        stop(deployed, target, started)


def test_db_proxy_port_only_on_the_vip_and_from_its_clients(deployed):
    """mail_backend: the DB proxy port is open on the dbproxy VIP, from webmail and
    the other back ends only, and not on the node's own address. Checked on the
    back end holding the VIP (Pacemaker's proxy answers there), else on the first
    back end with the VIP added for the test."""
    inv = deployed.inv
    vip, net = str(inv.vips["dbproxy"].address), inv.vips["dbproxy"].network
    port = 3306 if inv.mail.db_proxy == "haproxy" else 6033
    backends = inv.with_role("mail_backend")
    held = deployed.vip_holders("dbproxy")
    target = held[0] if held else backends[0]
    if not held:
        deployed.run(target, f"ip addr add {vip}/32 dev {net}", check=True)
    other = next(b for b in backends if b != target)
    webmail, galera = inv.with_role("webmail")[0], inv.with_role("galera")[0]
    started = listen(deployed, target, port)
    try:
        assert connects(deployed, webmail, vip, port)
        assert connects(deployed, other, vip, port)
        assert not connects(deployed, galera, vip, port)
        assert not connects(deployed, webmail, deployed.address(target, net), port)
    finally:
        stop(deployed, target, started)
        if not held:
            deployed.run(target, f"ip addr del {vip}/32 dev {net}")


def test_a_port_no_role_opens_is_closed_everywhere(deployed):
    port = 12345
    hosts = deployed.hosts
    mgmt = deployed.inv.management_network
    with ThreadPoolExecutor(8) as pool:
        started = dict(zip(hosts, pool.map(lambda h: listen(deployed, h, port), hosts)))
    try:
        def probe(host):
            spec = deployed.inv.hosts[host]
            mine = set(spec.addresses) - {mgmt}
            neighbour = next((other for other in hosts
                              if other != host and set(deployed.inv.hosts[other].addresses) & mine), None)
            reached = [f"machine->{host}:mgmt"] if connects_from_machine(deployed.address(host), port) else []
            if neighbour:
                net = next(n for n in mine if n in deployed.inv.hosts[neighbour].addresses)
                if connects(deployed, neighbour, deployed.address(host, net), port):
                    reached.append(f"{neighbour}->{host}:{net}")
            return reached

        with ThreadPoolExecutor(8) as pool:
            reached = [r for rs in pool.map(probe, hosts) for r in rs]
        assert reached == [], f"port {port} is open: {reached}"
        # ...and every listener really was there: it answers on loopback.
        for host in hosts:
            assert connects(deployed, host, "127.0.0.1", port), host
    finally:
        with ThreadPoolExecutor(8) as pool:
            list(pool.map(lambda h: stop(deployed, h, started[h]), hosts))


def test_ping_and_ipv6_inbound(deployed):
    assert deployed.run("e2server", f"ping -c1 -W2 {deployed.address('e1server', 'dmz')}").returncode == 0
    rules = deployed.run("e1server", "ip6tables -S INPUT", check=True).stdout
    assert "--dport" not in rules and "icmpv6-type 135" in rules


def test_netfilter_persistent_restores_the_rules(deployed):
    """What happens at boot: netfilter-persistent loads rules.v4 into an empty table."""
    host = "r1server"
    before = deployed.run(host, "iptables-save -t filter | grep -v '^#'", check=True).stdout
    deployed.run(host, "iptables-restore <<'EOF'\n*filter\n:INPUT ACCEPT [0:0]\n:FORWARD ACCEPT [0:0]\n"
                       ":OUTPUT ACCEPT [0:0]\nCOMMIT\nEOF", check=True)
    assert "-P INPUT ACCEPT" in deployed.run(host, "iptables -S INPUT").stdout
    deployed.run(host, "systemctl restart netfilter-persistent", check=True)
    after = deployed.run(host, "iptables-save -t filter | grep -v '^#'", check=True).stdout
    assert _rules(after) == _rules(before)


def _rules(save: str) -> list[str]:
    return [re.sub(r"\[\d+:\d+\]", "", line) for line in save.splitlines()]


def test_drift_is_repaired_atomically(deployed):
    host = "r1server"
    deployed.run(host, "iptables -I INPUT 1 -p tcp --dport 2323 -j ACCEPT", check=True)
    out = inv("firewall.deploy", "--hosts", host)
    assert out.returncode == 0, out.stdout[-3000:]
    assert recap(out)[1] >= 1 and "load /etc/iptables/rules.v4" in out.stdout
    assert "2323" not in deployed.run(host, "iptables -S INPUT", check=True).stdout


def test_check_mode_changes_nothing(deployed):
    host = "r1server"
    deployed.run(host, "iptables -I INPUT 1 -p tcp --dport 2323 -j ACCEPT", check=True)
    try:
        out = inv("firewall.deploy", "--hosts", host, "--check")
        assert out.returncode == 0, out.stdout[-3000:]
        assert recap(out)[1] >= 1
        assert "2323" in deployed.run(host, "iptables -S INPUT", check=True).stdout
    finally:
        deployed.run(host, "iptables-restore /etc/iptables/rules.v4", check=True)


def test_rerun_changes_nothing(deployed):
    out = inv("firewall.deploy")
    assert out.returncode == 0, out.stdout[-3000:]
    ok, changed, failed = recap(out)
    assert (changed, failed) == (0, 0), out.stdout[-5000:]
    assert ok > 0
