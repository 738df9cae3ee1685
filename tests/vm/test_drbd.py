"""The mail store on DRBD survives failover: two mail back ends as qemu VMs
(Debian's kernel, DRBD 8.4), Pacemaker with fence_lab (power off = the VM's
qemu killed), real SMTP and IMAP clients on the mail VIP from a Galera
container on the mail network.

Proven here, in this order:
- DRBD Connected and UpToDate/UpToDate on both nodes; Pacemaker promotes DRBD,
  mounts it on /var/vmail and runs the mail group on the promoted node only;
- a second `inv deploy.mail` changes nothing (no create-md, mkfs or resync);
- standby of the active node: the group moves with the DRBD primary, and IMAP
  on the VIP shows the message delivered before (by its Message-ID);
- split brain: only the replication link cut; the primary's fence-peer
  handler forbids promoting the peer's stale disk: with the active node in
  standby no node promotes it (the group stops); link back: resync, the
  constraint is gone, the group runs again;
- fencing: corosync SIGKILLed on the active node while a client submits
  numbered messages: the survivor fences it (its VM is powered off), is
  promoted, and every message the server acknowledged (250 after DATA) is in
  the mailbox; powered on, the fenced node rejoins as Secondary and resyncs.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
import uuid
import xml.etree.ElementTree as ET
from pathlib import Path
from types import SimpleNamespace

import pytest

from fabfile import lab as labmod
from fabfile.core import topology
from fabfile.core.secrets import token
from tests.lab.labhost import recap

CLIENT = Path(__file__).parents[1] / "lab" / "mail_client.py"
RES = topology.DRBD_RESOURCE
GROUP_MEMBERS = ("DrbdFS", "virtual_ip", "postfix", "dovecot")
PROMOTED = ("Promoted", "Master")


def ok(out) -> None:
    assert out.returncode == 0, f"{out.args}\n{out.stdout[-5000:]}\n{out.stderr[-3000:]}"


@pytest.fixture(scope="module")
def m(drbd_lab, tmp_path_factory):
    lab, inv = drbd_lab, drbd_lab.inv
    vip = inv.vips["mail"]
    folder = tmp_path_factory.mktemp("drbd")
    ca = folder / "ca.crt"
    ok(lab.invoke("pki.export-ca", "--path", str(ca)))
    tag = uuid.uuid4().hex[:8]
    user, password = f"d{tag}@{inv.mail.domain}", token(16)
    ok(lab.invoke("mail.add-mailbox", user, "--password", password))
    client = next(h for h in inv.with_role("galera") if vip.network in inv.hosts[h].addresses)
    return SimpleNamespace(nodes=inv.with_role("mail_backend"), vip=str(vip.address), ca=ca, tag=tag, user=user,
                           password=password, client=client, message_id=f"<drbd-{tag}@lab.test>")


def client(lab, m, spec: dict, *, check: bool = True, timeout: float = 300):
    spec = {"host": m.vip, "ca": str(m.ca), "timeout": 30, **spec}
    out = subprocess.run(["ip", "netns", "exec", lab.plan.netns(m.client), sys.executable, str(CLIENT)],
                         input=json.dumps(spec), capture_output=True, text=True, timeout=timeout, check=False)
    if not check:
        return out
    assert out.returncode == 0, f"mail client failed:\n{out.stdout[-3000:]}\n{out.stderr[-3000:]}"
    return json.loads(out.stdout.strip().splitlines()[-1])


def fetch_by_id(lab, m, wait: float = 60) -> dict:
    return client(lab, m, {"fetch": {"user": m.user, "password": m.password, "message_id": m.message_id,
                                     "subject": "", "wait": wait}})["found"]


def drbd(lab, host) -> dict[str, str]:
    """role, cstate and dstate of the resource on `host` ("" when it does not answer)."""
    r = lab.run(host, f"drbdadm role {RES}; drbdadm cstate {RES}; drbdadm dstate {RES}", timeout=30)
    lines = (r.stdout.splitlines() + ["", "", ""])[:3]
    return dict(zip(("role", "cstate", "dstate"), (ln.strip() for ln in lines)))


def crm(lab, nodes) -> ET.Element:
    for n in nodes:
        if labmod.power_state(lab.plan, n) == "on":
            r = lab.run(n, "crm_mon -1 --output-as=xml", timeout=60)
            if r.returncode == 0:
                return ET.fromstring(r.stdout)
    raise AssertionError("no node answers crm_mon")


def placement(root: ET.Element) -> tuple[dict[str, str | None], list[str]]:
    """(started resource -> node, nodes where DrbdData is promoted)."""
    where: dict[str, str | None] = {}
    promoted = []
    for res in root.iter("resource"):
        node = res.find("node")
        if res.get("id") == "DrbdData" and res.get("role") in PROMOTED and node is not None:
            promoted.append(node.get("name"))
        ok_ = res.get("active") == "true" and res.get("failed") != "true" and res.get("role") == "Started"
        where.setdefault(res.get("id"), node.get("name") if ok_ and node is not None else None)
    return where, promoted


def group_node(lab, nodes) -> str | None:
    where, promoted = placement(crm(lab, nodes))
    places = {where.get(r) for r in GROUP_MEMBERS}
    node = places.pop() if len(places) == 1 else None
    return node if node and promoted == [node] else None


def wait_for(what: str, read, until, timeout: float, interval: float = 2.0):
    t0 = time.monotonic()
    while True:
        value = read()
        if until(value):
            return value, time.monotonic() - t0
        assert time.monotonic() - t0 < timeout, f"{what}: not after {timeout:.0f} s (last: {value})"
        time.sleep(interval)


def wait_replicated(lab, nodes, timeout: float = 300) -> dict:
    states, _ = wait_for("both DRBD disks Connected and UpToDate", lambda: {n: drbd(lab, n) for n in nodes},
                         lambda s: all(v["cstate"] == "Connected" and v["dstate"] == "UpToDate/UpToDate"
                                       for v in s.values()), timeout)
    return states


def test_replicated_and_promoted_where_the_mail_group_runs(drbd_lab, m):
    lab = drbd_lab
    states = wait_replicated(lab, m.nodes)
    active, seconds = wait_for("the mail group on the promoted node", lambda: group_node(lab, m.nodes), bool, 300)
    print(f"\nDRBD: {states}; mail group and DRBD primary on {active}")
    for n in m.nodes:
        mounted = lab.run(n, f"findmnt -n -o SOURCE {topology.MAIL_STORE}").stdout.strip()
        if n == active:
            assert states[n]["role"] == "Primary/Secondary"
            assert mounted == topology.DRBD_DEVICE, mounted
            assert lab.run(n, "systemctl is-active postfix@- dovecot").returncode == 0
        else:
            assert states[n]["role"] == "Secondary/Primary"
            assert mounted == "", f"{topology.MAIL_STORE} is mounted on {n} too: {mounted}"
            assert lab.run(n, "systemctl is-active dovecot").returncode != 0


def test_second_deploy_changes_nothing_and_resyncs_nothing(drbd_lab, m):
    lab = drbd_lab
    active = group_node(lab, m.nodes)
    fs = f"blkid -o value -s UUID {topology.DRBD_DEVICE}"
    before = lab.run(active, fs, check=True).stdout.strip()
    out = lab.invoke("deploy.mail", timeout=3600)
    ok(out)
    _, changed, failed = recap(out)
    after = lab.run(active, fs, check=True).stdout.strip()
    states = {n: drbd(lab, n) for n in m.nodes}
    oos = lab.run(active, "grep -o 'oos:[0-9]*' /proc/drbd", check=True).stdout.strip()
    print(f"\nsecond deploy.mail: {changed} changed, {failed} failed; file system {before} -> {after}; {oos}; {states}")
    assert (changed, failed) == (0, 0), out.stdout[-5000:]
    assert "drbd: existing data, no initial sync or mkfs" in out.stdout
    assert after == before and oos == "oos:0"  # not reformatted, nothing out of sync
    assert all(s["cstate"] == "Connected" and s["dstate"] == "UpToDate/UpToDate" for s in states.values())


def test_the_message_follows_the_drbd_primary_on_standby(drbd_lab, m):
    lab = drbd_lab
    r = client(lab, m, {"submit": {"from": m.user, "password": m.password, "to": m.user,
                                   "subject": f"drbd {m.tag}", "message_id": m.message_id}})
    assert r["submitted"]
    assert fetch_by_id(lab, m) == {"imap_starttls": 1, "imaps": 1}
    active = group_node(lab, m.nodes)
    ok(lab.invoke("cluster.standby", active, "--wait", "900", timeout=1000))
    try:
        other, seconds = wait_for("the group on the other node", lambda: group_node(lab, m.nodes),
                                  lambda n: n not in (None, active), 300)
        assert drbd(lab, other)["role"].startswith("Primary")
        found = fetch_by_id(lab, m)
        print(f"\nstandby of {active}: group and DRBD primary on {other} after {seconds:.0f} s; "
              f"message {m.message_id} on the VIP: {found}")
        assert found == {"imap_starttls": 1, "imaps": 1}
    finally:
        ok(lab.invoke("cluster.unstandby", active, "--wait", "900", timeout=1000))
    wait_replicated(lab, m.nodes)


CUT = ("INPUT -p tcp --dport 7789 -j DROP", "INPUT -p tcp --sport 7789 -j DROP",
       "OUTPUT -p tcp --dport 7789 -j DROP", "OUTPUT -p tcp --sport 7789 -j DROP")


def fence_constraint(lab, m) -> str:
    r = lab.run(next(n for n in m.nodes if labmod.power_state(lab.plan, n) == "on"),
                "cibadmin --query --scope constraints", timeout=60)
    return next((el.get("id") for el in ET.fromstring(r.stdout).iter("rsc_location")
                 if el.get("id", "").startswith("drbd-fence-by-handler")), "")


def test_split_brain_never_promotes_the_stale_disk(drbd_lab, m):
    lab = drbd_lab
    active = group_node(lab, m.nodes)
    other = next(n for n in m.nodes if n != active)
    cut = "; ".join(f"iptables -I {rule}" for rule in CUT)
    heal = "; ".join(f"iptables -D {rule}" for rule in CUT)
    lab.run(active, cut, timeout=30, check=True)
    try:
        states, seconds = wait_for("DRBD to see the link cut", lambda: drbd(lab, active),
                                   lambda s: s["cstate"] not in ("Connected", ""), 120)
        constraint, _ = wait_for("the fence-peer handler's constraint", lambda: fence_constraint(lab, m), bool, 120)
        print(f"\nreplication link cut on {active}: {states} after {seconds:.0f} s; the handler placed {constraint}")
        ok(lab.invoke("cluster.standby", active, "--wait", "900", timeout=1000))
        try:
            time.sleep(20)  # Pacemaker would have promoted the peer by now, were it allowed to
            peer = drbd(lab, other)
            where, promoted = placement(crm(lab, m.nodes))
            print(f"{active} in standby with the link cut: {other} is {peer}; promoted: {promoted or 'nowhere'}; "
                  f"mail group: {[where.get(r) for r in GROUP_MEMBERS]}")
            assert not peer["role"].startswith("Primary"), peer
            assert other not in promoted and where.get("DrbdFS") != other
        finally:
            ok(lab.invoke("cluster.unstandby", active, "--wait", "900", timeout=1000))
        back, seconds = wait_for("the group back on the node with the good disk", lambda: group_node(lab, m.nodes),
                                 lambda n: n == active, 300)
        print(f"{active} back: the group runs there again after {seconds:.0f} s")
    finally:
        lab.run(active, heal, timeout=30)
    wait_replicated(lab, m.nodes)
    gone, seconds = wait_for("the constraint removed after the resync", lambda: fence_constraint(lab, m),
                             lambda c: c == "", 120)
    print(f"link back: resynced, constraint removed after {seconds:.0f} s")
    assert fence_constraint(lab, m) == ""
    assert fetch_by_id(lab, m) == {"imap_starttls": 1, "imaps": 1}


def test_fenced_node_loses_no_acknowledged_message(drbd_lab, m):
    lab = drbd_lab
    active = group_node(lab, m.nodes)
    survivor = next(n for n in m.nodes if n != active)
    prefix = f"stream {m.tag}"
    spec = {"host": m.vip, "ca": str(m.ca), "timeout": 10,
            "stream": {"from": m.user, "password": m.password, "to": m.user, "prefix": prefix, "seconds": 180}}
    stream = subprocess.Popen(["ip", "netns", "exec", lab.plan.netns(m.client), sys.executable, str(CLIENT)],
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    stream.stdin.write(json.dumps(spec))
    stream.stdin.close()
    try:
        time.sleep(15)  # messages flow before the failure
        lab.run(active, "pkill -KILL corosync", timeout=15)
        _, fenced_after = wait_for(f"{active} fenced (its VM powered off)",
                                   lambda: labmod.power_state(lab.plan, active), lambda s: s == "off", 180, 1)
        node, moved_after = wait_for("the group on the survivor", lambda: group_node(lab, [survivor]),
                                     lambda n: n == survivor, 300)
        print(f"\ncorosync killed on {active}: fenced after {fenced_after:.0f} s, "
              f"group and DRBD primary on {survivor} after {moved_after:.0f} s more")
        assert drbd(lab, survivor)["role"].startswith("Primary")
        out, err = stream.communicate(timeout=400)
    finally:
        if stream.poll() is None:
            stream.kill()
    assert stream.returncode == 0, err[-3000:]
    sent = json.loads(out.strip().splitlines()[-1])
    subjects = client(lab, m, {"list": {"user": m.user, "password": m.password}})["subjects"]
    have = {int(s.rsplit(" ", 1)[1]) for s in subjects if s.startswith(prefix + " ")}
    lost = sorted(set(sent["acked"]) - have)
    print(f"writes during failover: {sent['attempts']} attempts, {len(sent['acked'])} acknowledged, "
          f"{sent['failures']} failed while the VIP moved, {len(lost)} acknowledged but lost")
    assert sent["acked"], "no message was acknowledged at all"
    assert not lost, f"acknowledged (250 after DATA) but not in the mailbox: {lost}"
    assert fetch_by_id(lab, m) == {"imap_starttls": 1, "imaps": 1}
    # Powered on, the fenced node rejoins (corosync and pacemaker start at boot) as Secondary and resyncs.
    t0 = time.monotonic()
    ok(lab.invoke("lab.power", active, "on", timeout=900))
    states = wait_replicated(lab, m.nodes, timeout=600)
    print(f"{active} powered on: rejoined and resynced after {time.monotonic() - t0:.0f} s: {states}")
    assert states[active]["role"] == "Secondary/Primary" and states[survivor]["role"] == "Primary/Secondary"
