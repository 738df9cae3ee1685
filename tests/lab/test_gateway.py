"""Gateway tier on real lab hosts: after `inv base.deploy`, `inv firewall.deploy`
(the gateway's FORWARD chain) and `inv gateway.deploy`
the DMZ and internal hosts route to each other through gw1server (persistently,
through hastack-routes.service); an allowed flow (ejabberd -> PostgreSQL) is a
real TCP connection through the gateway, and stops when forwarding is off; a
flow the firewall table does not route is dropped by the gateway's FORWARD
chain; a re-run changes nothing."""

from __future__ import annotations

import pytest

from tests.lab.test_firewall import connects, deploy, inv, listen, recap, stop

pytestmark = pytest.mark.lab

GW = "gw1server"


@pytest.fixture(scope="module")
def routed(lab):
    deploy("base.deploy", "firewall.deploy", "gateway.deploy")
    return lab


def segment_hosts(lab):
    """(host, its segment, the other segment, the gateway's address on its segment)."""
    inv = lab.inv
    gw = inv.hosts[GW].addresses
    segs = [n for n in gw if n != inv.management_network]
    out = []
    for name, spec in inv.hosts.items():
        if name == GW or all(seg in spec.addresses for seg in segs):  # on every segment: no route needed
            continue
        for seg in segs:
            if seg in spec.addresses:
                other = next(s for s in segs if s != seg)
                out.append((name, seg, other, str(gw[seg])))
    return out


def test_every_segment_host_routes_through_the_gateway(routed):
    rows = segment_hosts(routed)
    assert {r[0] for r in rows} >= {"e1server", "e2server", "psql1server", "psql2server", "bk1server",
                                     "mon1server"}
    for host, seg, other, via in rows:
        cidr = routed.inv.networks[other].cidr
        target = str(next(iter(cidr.hosts())))
        out = routed.run(host, f"ip route get {target}", check=True).stdout
        assert f"via {via} dev {seg}" in out, (host, out)
        unit = routed.run(host, "systemctl is-enabled hastack-routes; systemctl is-active hastack-routes").stdout
        assert unit.split() == ["enabled", "active"], (host, unit)
    # hosts on no segment get no route and no unit; the spare, on both segments, reaches each directly
    assert routed.run("ngx01", "systemctl cat hastack-routes").returncode != 0
    assert routed.run("r1server", "systemctl cat hastack-routes").returncode != 0
    for seg in ("dmz", "internal"):
        target = str(next(iter(routed.inv.networks[seg].cidr.hosts())))
        assert "via" not in routed.run("r1server", f"ip route get {target}", check=True).stdout


def test_routes_come_back_from_the_unit(routed):
    """What happens at boot: the unit puts the route back."""
    route = str(routed.inv.networks["internal"].cidr)
    routed.run("e2server", f"ip route del {route}", check=True)
    assert "via" not in routed.run("e2server", f"ip route show {route}").stdout
    routed.run("e2server", "systemctl restart hastack-routes", check=True)
    assert f"via {routed.address(GW, 'dmz')}" in routed.run("e2server", f"ip route show {route}").stdout


def test_allowed_flow_crosses_the_gateway_and_stops_without_forwarding(routed):
    psql = routed.address("psql1server", "internal")
    started = listen(routed, "psql1server", 5432)
    try:
        assert routed.run("e1server", f"ping -c1 -W2 {psql}").returncode == 0
        assert connects(routed, "e1server", psql, 5432), "e1server cannot reach PostgreSQL through the gateway"
        hops = routed.run("e1server", f"ip route get {psql}", check=True).stdout
        assert f"via {routed.address(GW, 'dmz')}" in hops
        routed.run(GW, "sysctl -q -w net.ipv4.ip_forward=0", check=True)
        try:
            assert not connects(routed, "e1server", psql, 5432), "reached PostgreSQL with forwarding off"
        finally:
            routed.run(GW, "sysctl -q -w net.ipv4.ip_forward=1", check=True)
        assert connects(routed, "e1server", psql, 5432)
    finally:
        stop(routed, "psql1server", started)


def test_unlisted_flow_is_dropped_by_the_gateway(routed):
    """e1server:5222 is open to anyone on e1server itself, but the gateway does
    not forward it: reachable from the DMZ (gw1server), not from the internal net."""
    started = listen(routed, "e1server", 5222)
    try:
        e1 = routed.address("e1server", "dmz")
        assert connects(routed, GW, e1, 5222)
        assert not connects(routed, "mon1server", e1, 5222)
        assert routed.run("mon1server", f"ping -c1 -W2 {e1}").returncode == 0  # the route itself works
    finally:
        stop(routed, "e1server", started)


def test_forward_chain_on_the_gateway(routed):
    rules = routed.run(GW, "iptables -S FORWARD", check=True).stdout
    assert rules.startswith("-P FORWARD DROP")
    assert "--dport 5432" in rules and "5222" not in rules
    assert routed.run(GW, "sysctl -n net.ipv4.ip_forward", check=True).stdout.strip() == "1"


def test_rerun_changes_nothing(routed):
    out = inv("gateway.deploy")
    assert out.returncode == 0, out.stdout[-3000:]
    ok, changed, failed = recap(out)
    assert (changed, failed) == (0, 0), out.stdout[-5000:]
