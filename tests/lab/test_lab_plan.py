"""The lab's plan for an inventory (names, addresses, known_hosts): no root, no hosts."""

from __future__ import annotations

from pathlib import Path

import pytest

from fabfile import lab as labmod
from fabfile.core import UserError
from fabfile.core.inventory import load, parse
from fabfile.core.tasks import PROJECT_ROOT

LAB = load(PROJECT_ROOT / "inventory" / "lab.yml")


def test_names_fit_the_kernel_limit_and_are_unique():
    plan = labmod.Plan(LAB, Path("/nonexistent"))
    names = list(plan.bridges.values()) + list(plan.veths.values())
    assert all(len(n) <= 15 for n in names), names
    assert len(set(names)) == len(names)
    assert plan.bridges == {"mgmt": "hal-mgmt", "mail": "hal-mail", "dmz": "hal-dmz", "internal": "hal-internal"}
    assert plan.veths[("gw1server", "internal")] == "hal12-internal"
    assert plan.netns("e1server") == "hal-e1server"


def test_long_prefix_and_network_names_still_fit(tmp_path):
    inv = parse("""
site: {name: x, domain: x.test}
networks:
  management-network: {cidr: 10.200.0.0/24, management: true}
  management-network2: {cidr: 10.200.1.0/24}
hosts:
""" + "\n".join(f"  h{i}: {{addresses: {{management-network: 10.200.0.{i + 10}, management-network2: 10.200.1.{i + 10}}}}}"
                for i in range(120)) + "\nlab: {bridge_prefix: abcdef}\n", tmp_path / "x.yml")
    plan = labmod.Plan(inv, tmp_path)
    names = list(plan.bridges.values()) + list(plan.veths.values())
    assert all(len(n) <= 15 for n in names) and len(set(names)) == len(names)


def test_addresses_nics_and_proxy():
    plan = labmod.Plan(LAB, Path("/nonexistent"))
    assert str(plan.bridge_interface) == "10.200.0.1/24"
    assert plan.proxy_url == "http://10.200.0.1:3142"
    assert [(n, str(i)) for n, i in plan.nics("gw1server")] == [
        ("mgmt", "10.200.0.14/24"), ("dmz", "10.200.1.1/29"), ("internal", "10.200.1.9/29")]


def test_select_refuses_unknown_hosts():
    plan = labmod.Plan(LAB, Path("/nonexistent"))
    assert plan.select("pxc2, e1server") == ["pxc2", "e1server"]  # inventory order
    with pytest.raises(UserError, match="unknown host.*nosuch"):
        plan.select("e1server,nosuch")


def test_cached_root_name_follows_the_package_list(monkeypatch):
    before = labmod.root_name()
    monkeypatch.setattr(labmod, "DEBOOTSTRAP_ARGS", labmod.DEBOOTSTRAP_ARGS + ("--include=vim",))
    assert labmod.root_name() != before and labmod.root_name().startswith("bookworm-")


def test_known_hosts_lines_are_replaced_and_others_kept(tmp_path):
    inv = parse((PROJECT_ROOT / "inventory" / "lab.yml").read_text(), tmp_path / "lab.yml")
    plan = labmod.Plan(inv, tmp_path / "state")
    for host, key in (("e1server", "AAAAnew1"), ("e2server", "AAAAsame")):
        pub = plan.merged(host) / "etc/ssh/ssh_host_ed25519_key.pub"
        pub.parent.mkdir(parents=True)
        pub.write_text(f"ssh-ed25519 {key} root@build\n")
    inv.known_hosts_file.write_text("10.200.0.10 ssh-ed25519 AAAAold1\n10.9.9.9 ssh-ed25519 AAAAother\n"
                                    "10.200.0.10 ssh-ed25519 AAAAdup\n")
    changed = labmod.update_known_hosts(plan, ["e1server", "e2server"])
    assert changed == ["10.200.0.10", "10.200.0.11"]
    assert inv.known_hosts_file.read_text().splitlines() == [
        "10.200.0.10 ssh-ed25519 AAAAnew1", "10.9.9.9 ssh-ed25519 AAAAother", "10.200.0.11 ssh-ed25519 AAAAsame"]
    assert labmod.update_known_hosts(plan, ["e1server", "e2server"]) == []


def test_ssh_command_is_strict_and_uses_the_lab_key():
    cmd = labmod.ssh_command(LAB, "e1server")
    assert "StrictHostKeyChecking=yes" in cmd and f"UserKnownHostsFile={LAB.known_hosts_file}" in cmd
    assert cmd[cmd.index("-i") + 1] == str(LAB.key_file) and cmd[-1] == "root@10.200.0.10"
