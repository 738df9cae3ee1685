"""The lab itself (issue 3): real hosts, their names, NICs and addresses, the
isolation of the DMZ from the internal network, apt through the proxy,
idempotent lab.up, clear errors, and nothing left behind by lab.down."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

import pytest

from fabfile import lab as labmod
from fabfile.core import UserError
from fabfile.core.inventory import parse
from fabfile.lab import machines as labmachines
from fabfile.lab import system as labsystem

from tests.lab.labhost import run_inv as inv



# --- every host: name, systemd, NICs -----------------------------------------


def test_every_host_answers_ssh_with_its_name_and_a_healthy_systemd(lab):
    cmd = "hostname; systemctl is-system-running; systemctl --failed --plain --no-legend"
    results = lab.run_all(lab.hosts, cmd)
    for host, r in results.items():
        assert r.returncode in (0, 1), f"{host}: ssh failed ({r.returncode}): {r.stderr}"
        lines = r.stdout.splitlines()
        assert lines[0] == host
        assert lines[1] in ("running", "degraded"), f"{host}: systemd is {lines[1]}"
        assert lines[2:] == [], f"{host}: failed units: {lines[2:]}"


def test_every_nic_is_named_after_its_network_and_has_its_inventory_address(lab):
    results = lab.run_all(lab.hosts, "ip -j addr show")
    for host, r in results.items():
        assert r.returncode == 0, r.stderr
        links = {link["ifname"]: link for link in json.loads(r.stdout)}
        want = {net: f"{addr}/{lab.inv.networks[net].cidr.prefixlen}"
                for net, addr in lab.inv.hosts[host].addresses.items()}
        assert set(links) - {"lo"} == set(want), f"{host}: NICs {sorted(links)}"
        for net, iface in want.items():
            have = {f"{a['local']}/{a['prefixlen']}" for a in links[net]["addr_info"] if a["family"] == "inet"}
            assert iface in have, f"{host}: {net} has {have}, want {iface}"
            assert "UP" in links[net]["flags"]


def test_hosts_have_distinct_identities(lab):
    results = lab.run_all(lab.hosts, "cat /etc/machine-id; cat /etc/ssh/ssh_host_ed25519_key.pub")
    ids = {r.stdout.split("\n", 1)[0] for r in results.values()}
    keys = {r.stdout.splitlines()[1].split()[1] for r in results.values()}
    assert len(ids) == len(keys) == len(lab.hosts)


def test_known_hosts_has_one_line_per_host_and_key_file_is_private(lab):
    lines = lab.inv.known_hosts_file.read_text().splitlines()
    for host in lab.hosts:
        addr = lab.inv.management_address(host)
        assert len([ln for ln in lines if ln.split()[0] == addr]) == 1
    assert lab.inv.key_file.stat().st_mode & 0o777 == 0o600


# --- networks ----------------------------------------------------------------


def test_only_the_management_bridge_has_an_address_on_the_machine(lab):
    plan = lab.plan
    for net, bridge in plan.bridges.items():
        info = json.loads(subprocess.run(["ip", "-j", "addr", "show", "dev", bridge],
                                         capture_output=True, text=True, check=True).stdout)[0]
        inet = [f"{a['local']}/{a['prefixlen']}" for a in info["addr_info"] if a["family"] == "inet"]
        assert inet == ([str(plan.bridge_interface)] if net == plan.mgmt else []), (bridge, inet)
        # The machine has no route into the DMZ or the internal network through the lab.
        if net != plan.mgmt:
            probe = str(next(lab.inv.networks[net].cidr.hosts()))
            route = subprocess.run(["ip", "route", "get", probe], capture_output=True, text=True).stdout
            assert not any(b in route.split() for b in plan.bridges.values()), route


def test_management_network_reaches_every_host_from_a_host(lab):
    targets = " ".join(lab.inv.management_address(h) for h in lab.hosts)
    r = lab.run("mon1server", f"for a in {targets}; do ping -c1 -W2 -q $a >/dev/null || echo FAIL $a; done")
    assert r.returncode == 0 and "FAIL" not in r.stdout, r.stdout + r.stderr


def test_dmz_and_internal_are_separate_segments(lab):
    """The segments are joined only by a forwarding gateway. Hosts keep their
    disks across lab.down, so an earlier gateway deploy may have left routes and
    forwarding on: the test turns forwarding off itself and restores it after."""
    inv_ = lab.inv
    gw = inv_.with_role("gateway")[0]
    dmz_host, internal_host = "e1server", "psql1server"
    gw_dmz, gw_internal = lab.address(gw, "dmz"), lab.address(gw, "internal")
    target = lab.address(internal_host, "internal")
    internal_cidr = inv_.networks["internal"].cidr

    # Positive controls: each side reaches the gateway, the gateway reaches both sides.
    assert lab.run(dmz_host, f"ping -c1 -W2 {gw_dmz}").returncode == 0
    assert lab.run(internal_host, f"ping -c1 -W2 {gw_internal}").returncode == 0
    assert lab.run(gw, f"ping -c1 -W2 {target}").returncode == 0

    forwarding = lab.run(gw, "sysctl -n net.ipv4.ip_forward", check=True).stdout.strip()
    had_route = lab.run(dmz_host, f"ip route show {internal_cidr}", check=True).stdout.strip()
    try:
        lab.run(gw, "sysctl -q -w net.ipv4.ip_forward=0", check=True)
        # On-link from the DMZ NIC: nobody on the DMZ segment answers for an internal address.
        lab.run(dmz_host, f"ip route replace {target}/32 dev dmz", check=True)
        assert lab.run(dmz_host, f"ping -c2 -W1 -I dmz {target}").returncode != 0
        lab.run(dmz_host, f"ip route del {target}/32 dev dmz", check=True)
        # Through the gateway: nothing passes while it does not forward.
        lab.run(dmz_host, f"ip route replace {internal_cidr} via {gw_dmz} dev dmz", check=True)
        assert lab.run(dmz_host, f"ping -c2 -W1 {target}").returncode != 0
        assert lab.run(dmz_host, f"nc -z -w2 {target} 22").returncode != 0
    finally:
        lab.run(dmz_host, f"ip route del {target}/32 dev dmz 2>/dev/null; true")
        if had_route:
            lab.run(dmz_host, f"ip route replace {had_route}")
        else:
            lab.run(dmz_host, f"ip route del {internal_cidr} 2>/dev/null; true")
        lab.run(gw, f"sysctl -q -w net.ipv4.ip_forward={forwarding}")


def test_hosts_have_no_default_route_and_can_set_net_sysctls(lab):
    r = lab.run("gw1server", "ip route show default; sysctl -w net.ipv4.ip_forward=0 >/dev/null && echo ok")
    assert r.stdout.strip() == "ok", r.stdout + r.stderr


# --- packages -----------------------------------------------------------------


def test_apt_get_update_works_through_the_proxy(lab):
    r = lab.run("e2server", "apt-config dump Acquire::http::Proxy; apt-get update", timeout=300)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    assert lab.plan.proxy_url in r.stdout
    assert "deb.debian.org/debian bookworm" in r.stdout
    assert "deb.debian.org/debian-security bookworm-security" in r.stdout
    assert "Err:" not in r.stdout and not r.stderr.strip().startswith("E:")


# --- up is idempotent; restart; subsets; a purged disk gets a new key line -------


def test_second_up_changes_nothing_and_says_so(lab, capsys):
    known = lab.inv.known_hosts_file.read_text()
    summary = lab.up()
    out = capsys.readouterr().out
    assert summary["started"] == [] and len(summary["running"]) == len(lab.hosts)
    assert f"{len(lab.hosts)} hosts already running, 0 started" in out
    vms = [h for h in lab.hosts if lab.inv.hosts[h].kernel_modules]
    assert ("qemu VMs" in out) == bool(vms) and "note:" not in out
    assert lab.inv.known_hosts_file.read_text() == known


def test_cli_up_is_idempotent_too(lab):
    r = inv("lab.up")
    assert r.returncode == 0, r.stderr
    assert f"{len(lab.hosts)} hosts already running, 0 started" in r.stdout


def _stop(lab, host):
    pid = labmod.running_pid(lab.plan, host)
    assert pid
    labsystem.stop_pids([pid], grace=30)
    assert labmod.running_pid(lab.plan, host) is None


def test_stopped_host_is_restarted_with_the_same_disk_and_key(lab):
    host = "r1server"
    lab.run(host, "echo kept > /root/marker", check=True)
    line = [ln for ln in lab.inv.known_hosts_file.read_text().splitlines()
            if ln.startswith(lab.inv.management_address(host) + " ")]
    _stop(lab, host)
    summary = lab.up(hosts=host)
    assert summary["started"] == [host] and summary["new_disks"] == []
    assert len(summary["running"]) == 0  # only the chosen host was looked at
    assert lab.run(host, "cat /root/marker").stdout.strip() == "kept"
    assert line[0] in lab.inv.known_hosts_file.read_text().splitlines()


def test_purged_disk_gets_a_new_key_and_its_line_replaced(lab):
    host = "r1server"
    addr = lab.inv.management_address(host)
    old = [ln for ln in lab.inv.known_hosts_file.read_text().splitlines() if ln.startswith(addr + " ")]
    _stop(lab, host)
    merged = lab.plan.merged(host)
    subprocess.run(["umount", str(merged)], check=True)
    shutil.rmtree(lab.plan.host_dir(host))
    summary = lab.up(hosts=host)
    assert summary["new_disks"] == [host]
    new = [ln for ln in lab.inv.known_hosts_file.read_text().splitlines() if ln.startswith(addr + " ")]
    assert len(new) == 1 and new != old
    r = lab.run(host, "test -e /root/marker; echo $?; hostname")  # strict host key checking is on
    assert r.returncode == 0, r.stderr
    assert r.stdout.split() == ["1", host]


# --- status and ssh -----------------------------------------------------------------


def test_status_shows_every_host_running_with_memory(lab):
    r = inv("lab.status", env={**os.environ, "COLUMNS": "200"})
    assert r.returncode == 0, r.stderr
    for host in lab.hosts:
        row = next(ln for ln in r.stdout.splitlines() if f" {host} " in ln)
        assert "running" in row and "MiB" in row and lab.inv.management_address(host) in row
    for row in labmod.host_states(lab.plan):
        assert row["memory"] and row["memory"] > 1 << 20


def test_lab_ssh_runs_a_command_and_returns_its_exit_status(lab):
    r = inv("lab.ssh", "e1server", "-c", "hostname")
    assert r.returncode == 0 and r.stdout.strip() == "e1server", r.stderr
    assert inv("lab.ssh", "e1server", "-c", "exit 7").returncode == 7
    r = inv("lab.ssh", "nosuchhost", "-c", "true")
    assert r.returncode == 1 and "unknown host nosuchhost" in r.stderr and "Traceback" not in r.stderr


# --- clear errors ---------------------------------------------------------------------


def test_not_root_is_a_clear_error(lab):
    home = tempfile.mkdtemp(prefix="hastack-nobody-")  # a HOME the unprivileged user can enter
    os.chmod(home, 0o777)
    try:
        r = inv("lab.up", user=65534, env={**os.environ, "HOME": home})
    finally:
        shutil.rmtree(home)
    assert r.returncode == 1
    assert "needs root" in r.stderr and "Traceback" not in r.stderr


def test_missing_tool_names_the_apt_command(lab, tmp_path):
    env = {**os.environ, "PATH": str(tmp_path)}
    r = inv("lab.up", env=env)
    assert r.returncode == 1 and "Traceback" not in r.stderr
    assert "debootstrap" in r.stderr and "apt-get install" in r.stderr and "systemd-container" in r.stderr


def _other_inventory(tmp_path: Path, prefix: str, hosts: str) -> object:
    text = f"""
site: {{name: other, domain: other.test, apt_proxy: "http://10.200.60.1:3142"}}
ssh: {{key_file: {tmp_path}/id, known_hosts: {tmp_path}/known_hosts, connect_timeout: 2}}
networks:
  mgmt: {{cidr: 10.200.60.0/24, management: true}}
hosts:
{hosts}
lab: {{bridge_prefix: {prefix}}}
"""
    return parse(text, tmp_path / "other.yml")


def test_bridge_name_in_use_by_something_else_is_refused(lab, tmp_path):
    other = _other_inventory(tmp_path, "halq", "  q1: {addresses: {mgmt: 10.200.60.10}}")
    subprocess.run(["ip", "link", "add", "halq-mgmt", "type", "bridge"], check=True)
    try:
        with pytest.raises(UserError, match="bridge name halq-mgmt .* already in use"):
            labmod.lab_up(other)
    finally:
        subprocess.run(["ip", "link", "del", "halq-mgmt"], check=True)
    assert not (tmp_path / "id").exists()  # refused before anything was made


def test_host_that_does_not_boot_in_time_shows_its_console(lab, tmp_path):
    other = _other_inventory(tmp_path, "halt", "  t1: {addresses: {mgmt: 10.200.60.10}}")
    try:
        with pytest.raises(UserError, match=r"(?s)t1 did not boot within 0s.*console"):
            labmod.lab_up(other, timeout=0.2)
    finally:
        labmod.lab_down(other)
        shutil.rmtree(labmod.Plan(other).dir, ignore_errors=True)
    assert not labsystem.find("systemd-nspawn", f"--directory={labmod.Plan(other).merged('t1')}")


# --- last: lab.down leaves nothing behind ------------------------------------------


def _leftovers(plan) -> dict:
    """What of this lab is on the machine. Another lab (another bridge prefix)
    may run beside it: the pieces labs share (the nspawn tmpfs, the cgroup
    parent) count only when no other lab is up."""
    links = json.loads(subprocess.run(["ip", "-j", "-d", "link", "show"], capture_output=True, text=True).stdout)
    netns = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout.split()
    mounts = [ln.split()[4] for ln in Path("/proc/self/mountinfo").read_text().splitlines()]
    other_labs = any(m.startswith(str(plan.state_dir / "labs")) and not m.startswith(str(plan.dir) + "/")
                     for m in mounts)
    procs = [argv for _, argv in labsystem.processes()
             if os.path.basename(argv[0]) in ("systemd-nspawn", "apt-cacher-ng")
             and any(str(plan.dir) in a for a in argv)]
    cgroups = Path("/sys/fs/cgroup").glob("*/hastack-lab" + ("/" + plan.prefix + "-*" if other_labs else ""))
    return {
        "bridges": [ln["ifname"] for ln in links if ln["ifname"] in plan.bridges.values()],
        "veths": [ln["ifname"] for ln in links if ln["ifname"].startswith(plan.prefix)],
        "namespaces": [n for n in netns if n.startswith(plan.prefix + "-")],
        "mounts": [m for m in mounts if m.startswith(str(plan.dir) + "/")
                   or (m == str(labmachines.NSPAWN_TMPFS) and not other_labs
                       and (plan.state_dir / "made-nspawn-tmpfs").exists())],
        "processes": procs,
        "cgroups": [str(p) for p in cgroups],
        "iptables": [r for r in subprocess.run(["iptables-save"], capture_output=True, text=True).stdout.splitlines()
                     if plan.prefix + "-" in r or ("hastack" in r and not other_labs)],
    }


@pytest.mark.lab_teardown
def test_down_leaves_nothing_behind(lab):
    plan = lab.plan
    before = _leftovers(plan)
    assert before["bridges"] and before["namespaces"] and before["processes"]  # it was up
    lab.down()
    time.sleep(0.5)
    assert _leftovers(plan) == {k: [] for k in before}
    assert plan.root.is_dir()  # the cached root survives a plain down
    # ... and the CLI says there is nothing left to do.
    r = inv("lab.down")
    assert r.returncode == 0 and "nothing of the lab was running" in r.stdout
