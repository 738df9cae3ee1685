"""The lab's VM hosts, planned (no root, no qemu run): which hosts are VMs,
the accelerator choice, the image's packages, the NIC files, qemu's command."""

from __future__ import annotations

from pathlib import Path

import pytest

from fabfile import lab as labmod
from fabfile.core.inventory import load
from fabfile.core.tasks import PROJECT_ROOT
from fabfile.lab import vm

DRBD = load(PROJECT_ROOT / "inventory" / "lab-drbd.yml")
LAB = load(PROJECT_ROOT / "inventory" / "lab.yml")


def test_hosts_with_kernel_modules_are_vms_and_only_they():
    plan = labmod.Plan(DRBD, Path("/nonexistent"))
    assert vm.vm_hosts(plan, list(DRBD.hosts)) == ["postfix01", "postfix02"]
    assert vm.vm_hosts(labmod.Plan(LAB, Path("/nonexistent")), list(LAB.hosts)) == []  # CI's lab: containers


@pytest.mark.parametrize("kvm_dev, pvm, flags, usable", [
    (False, False, {"vmx"}, False),       # no /dev/kvm
    (True, True, {"vmx"}, False),         # PVM: opens, but boots only PVM-built kernels (this machine)
    (True, False, {"fpu", "sse2"}, False),  # no hardware virtualisation
    (True, False, {"svm"}, True),
    (True, False, {"vmx"}, True),
])
def test_kvm_is_tried_only_where_it_can_boot_debians_kernel(monkeypatch, kvm_dev, pvm, flags, usable):
    monkeypatch.setattr(vm.os, "access", lambda path, mode: kvm_dev if path == "/dev/kvm" else True)
    real_exists = Path.exists
    monkeypatch.setattr(vm.Path, "exists", lambda p: pvm if str(p) == "/sys/module/kvm_pvm" else real_exists(p))
    monkeypatch.setattr(vm, "cpu_flags", lambda: flags)
    ok, why = vm.kvm_usable()
    assert ok is usable and (bool(why) is not usable)


def test_image_packages_follow_the_vm_hosts_roles_and_name_the_root():
    plan = labmod.Plan(DRBD, Path("/nonexistent"))
    pkgs = vm.packages(plan, ["postfix01"])
    assert {"linux-image-amd64", "drbd-utils", "lvm2", "pacemaker", "pcs", "postfix", "iptables-persistent"} <= set(pkgs)
    assert pkgs == sorted(set(pkgs))
    assert vm.vm_root(plan, pkgs).name.startswith(plan.root.name + "-vm-")
    assert vm.vm_root(plan, pkgs) != vm.vm_root(plan, [*pkgs, "nfs-kernel-server"])


def test_each_nic_is_named_after_its_network_by_a_stable_mac():
    plan = labmod.Plan(DRBD, Path("/nonexistent"))
    files = vm.network_files(plan, "postfix01")
    assert files["etc/systemd/network/10-mgmt.link"] == (
        f"[Match]\nMACAddress={vm.mac(plan, 'postfix01', 'mgmt')}\n\n[Link]\nName=mgmt\n")
    assert "Address=10.210.11.113/24" in files["etc/systemd/network/11-mail.network"]
    macs = {vm.mac(plan, h, n) for h in DRBD.hosts for n in DRBD.hosts[h].addresses}
    assert len(macs) == sum(len(s.addresses) for s in DRBD.hosts.values())
    assert all(m.startswith("52:54:00:") for m in macs)
    assert vm.mac(plan, "postfix01", "mgmt") == vm.mac(labmod.Plan(DRBD, Path("/x")), "postfix01", "mgmt")


def test_qemu_boots_the_disks_own_kernel_with_a_tap_per_network(tmp_path):
    plan = labmod.Plan(DRBD, tmp_path)
    root = tmp_path / "roots" / "bookworm-x-vm-y"
    (root / "boot").mkdir(parents=True)
    for name in ("vmlinuz-6.1.0-57-amd64", "initrd.img-6.1.0-57-amd64"):
        (root / "boot" / name).write_text("")
    plan.host_dir("postfix01").mkdir(parents=True)
    (plan.host_dir("postfix01") / "lower").write_text(root.name + "\n")
    cmd = vm.qemu_command(plan, "postfix01", "tcg")
    joined = " ".join(cmd)
    assert cmd[0] == "qemu-system-x86_64" and "-accel tcg,tb-size=128" in joined and "-cpu host" not in joined
    assert f"-kernel {root}/boot/vmlinuz-6.1.0-57-amd64" in joined and "-m 1024" in joined
    assert f"file={plan.host_dir('postfix01')}/disk.img,format=raw" in joined
    assert f"file={plan.host_dir('postfix01')}/disk1.img,format=raw" in joined  # disks_gb: [1] -> /dev/vdb
    assert "ifname=hdr00-mgmt" in joined and "ifname=hdr00-mail" in joined
    assert f"mac={vm.mac(plan, 'postfix01', 'mail')}" in joined
    assert "-cpu host" in " ".join(vm.qemu_command(plan, "postfix01", "kvm"))
