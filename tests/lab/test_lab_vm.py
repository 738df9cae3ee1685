"""One VM host, in CI: a back end of inventory/lab-drbd.yml (kernel_modules:
[drbd]) booted alone as a qemu VM, beside whatever lab is running (its own
bridge prefix and addresses). What the VM lab rests on, in a few minutes; the
DRBD tests on two VMs are tests/vm (`./run test -m vm`).

Proven here: lab.up boots it as a VM (its qemu, the accelerator said), strict
host-key SSH works with the key recorded before the first boot, each NIC is
named after its network with its address, the second disk is there, Debian's
kernel loads DRBD 8.4, lab.status shows the kind; power off stops it at once,
power on boots it again from the same disk (same host key); lab.down removes
the VM and its taps.
"""

from __future__ import annotations

import os
import subprocess
import time

import pytest

from fabfile import lab as labmod
from fabfile.core.inventory import load
from fabfile.core.tasks import PROJECT_ROOT
from fabfile.lab import vm
from tests.lab.labhost import LabHosts

pytestmark = pytest.mark.lab

INVENTORY = PROJECT_ROOT / "inventory" / "lab-drbd.yml"
HOST = "postfix01"


@pytest.fixture(scope="module")
def one_vm(tmp_path_factory):
    if os.geteuid() != 0:
        pytest.skip("the VM lab needs root (bridges, taps, qemu)")
    # The same hosts on a bridge prefix and addresses of their own: a DRBD lab
    # someone runs from inventory/lab-drbd.yml is left alone.
    text = INVENTORY.read_text().replace("10.210.", "10.211.").replace("bridge_prefix: hdr", "bridge_prefix: hvm")
    assert "10.210." not in text and "bridge_prefix: hvm" in text
    path = tmp_path_factory.mktemp("vm") / "lab-vm.yml"
    path.write_text(text)
    lab = LabHosts(load(path, roles_file=False))
    try:
        lab.down(disks=True)
        t0 = time.monotonic()
        summary = labmod.lab_up(lab.inv, hosts=HOST, state_dir=lab.state_dir)
        print(f"\n{HOST}: VM root {'built in %.0f s, ' % summary['root_seconds'] if summary['root_seconds'] else ''}"
              f"up in {time.monotonic() - t0:.0f} s ({vm.accel(lab.plan, HOST)})")
        assert summary["started"] == [HOST]
        yield lab
    finally:
        lab.down(disks=True)


def test_the_host_is_a_vm_reached_over_strict_ssh_with_its_networks(one_vm):
    lab = one_vm
    pid = labmod.running_pid(lab.plan, HOST)
    with open(f"/proc/{pid}/cmdline", "rb") as fh:
        assert os.path.basename(fh.read().split(b"\0")[0].decode()) == "qemu-system-x86_64"
    r = lab.run(HOST, "uname -r; hostname; ip -br -4 addr; lsblk -dn -o NAME,SIZE; modprobe drbd && head -1 /proc/drbd",
                check=True)
    print(r.stdout)
    assert r.stdout.splitlines()[1] == HOST
    for net, iface in lab.plan.nics(HOST):
        assert any(line.split()[0] == net and str(iface) in line for line in r.stdout.splitlines()), (net, r.stdout)
    assert "vdb" in r.stdout and "1G" in r.stdout
    assert "version: 8.4" in r.stdout
    row = next(row for row in labmod.host_states(lab.plan) if row["host"] == HOST)
    assert row["state"] == "running" and row["kind"].startswith("VM, ") and row["memory"]


def test_power_off_is_immediate_and_power_on_boots_the_same_disk(one_vm):
    lab = one_vm
    key = lab.inv.known_hosts_file.read_text()
    t0 = time.monotonic()
    labmod.power_off(lab.plan, HOST)
    off = time.monotonic() - t0
    assert labmod.power_state(lab.plan, HOST) == "off"
    print(f"\npower off: {off:.2f} s")
    assert off < 5
    t0 = time.monotonic()
    summary = labmod.lab_up(lab.inv, hosts=HOST, state_dir=lab.state_dir)
    print(f"power on: booted again in {time.monotonic() - t0:.0f} s")
    assert summary["started"] == [HOST] and summary["new_disks"] == []
    assert lab.inv.known_hosts_file.read_text() == key
    assert lab.run(HOST, "true").returncode == 0  # strict host-key check: the same key


def test_down_removes_the_vm_and_its_taps(one_vm):
    lab = one_vm
    taps = [lab.plan.veths[(HOST, net)] for net, _ in lab.plan.nics(HOST)]
    assert all(os.path.exists(f"/sys/class/net/{t}") for t in taps)
    done = lab.down()
    assert labmod.running_pid(lab.plan, HOST) is None
    assert not any(os.path.exists(f"/sys/class/net/{t}") for t in taps), done
    assert not [p for p in subprocess.run(["pgrep", "-f", "hvm-postfix01"], capture_output=True, text=True)
                .stdout.split()]
