"""The lab's plan for an inventory (names, addresses, known_hosts): no root, no hosts."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from fabfile import lab as labmod
from fabfile.core import UserError
from fabfile.core.inventory import load, parse
from fabfile.core.tasks import PROJECT_ROOT
from fabfile.lab import plan as labplan

from tests.lab.labhost import run_inv as inv

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
    """The longest prefix (6) and network names (12) the inventory allows, 120 hosts."""
    inv = parse("""
site: {name: x, domain: x.test}
networks:
  management_a: {cidr: 10.200.0.0/24, management: true}
  management_b: {cidr: 10.200.1.0/24}
hosts:
""" + "\n".join(f"  h{i}: {{addresses: {{management_a: 10.200.0.{i + 10}, management_b: 10.200.1.{i + 10}}}}}"
                for i in range(120)) + "\nlab: {bridge_prefix: abcdef}\n", tmp_path / "x.yml")
    plan = labmod.Plan(inv, tmp_path)
    names = list(plan.bridges.values()) + list(plan.veths.values())
    assert all(len(n) <= 15 for n in names) and len(set(names)) == len(names)
    assert plan.bridges == {"management_a": "abcdef-n0", "management_b": "abcdef-n1"}


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
    assert plan.select(None) == list(LAB.hosts)  # no --hosts: every host


@pytest.mark.parametrize("spec,problem", [
    ("", "names no host"), (",", "names no host"), (" , ", "names no host"),
    ("e1server,,pxc2", "empty name between commas"), ("e1server,", "empty name between commas"),
])
def test_select_refuses_empty_host_lists(spec, problem):
    with pytest.raises(UserError, match=problem):
        labmod.Plan(LAB, Path("/nonexistent")).select(spec)


@pytest.mark.parametrize("value", ["abc", "-5", "0", "nan", "inf", "", None])
def test_timeout_must_be_a_positive_number(value):
    with pytest.raises(UserError, match="--timeout must be a .*number of seconds"):
        labmod.seconds(value)
    assert labmod.seconds("2.5") == 2.5 and labmod.seconds(180) == 180.0


@pytest.mark.parametrize("args,message", [
    (["lab.up", "--timeout", "abc"], "--timeout must be a number of seconds, not 'abc'"),
    (["lab.up", "--timeout", "-1"], "--timeout must be a positive number of seconds, not '-1'"),
    (["lab.up", "--hosts", ""], "--hosts '' names no host"),
    (["lab.up", "--hosts", ","], "--hosts ',' names no host"),
    (["lab.up", "--hosts", "e1server,nosuch"], "--hosts names unknown host(s): nosuch"),
    (["lab.power", "e1server", "sideways"], "action must be on, off or status, not 'sideways'"),
    (["lab.power", "nosuch", "status"], "unknown host nosuch"),
    (["lab.ssh", "nosuch", "-c", "true"], "unknown host nosuch"),
])
def test_bad_arguments_are_clear_errors_before_anything_happens(args, message, tmp_path):
    """As any user (no root needed to be refused): exit 1, the message, no traceback, no state."""
    env = {**os.environ, "HASTACK_LAB_STATE": str(tmp_path / "state")}
    r = inv(*args, inventory=PROJECT_ROOT / "inventory" / "lab.yml", env=env, timeout=120)
    assert r.returncode == 1 and message in r.stderr and "Traceback" not in r.stderr, (r.stdout, r.stderr)
    assert not (tmp_path / "state").exists()


def test_cached_root_name_follows_the_package_list(monkeypatch):
    before = labplan.root_name()
    monkeypatch.setattr(labplan, "DEBOOTSTRAP_ARGS", labplan.DEBOOTSTRAP_ARGS + ("--include=vim",))
    assert labplan.root_name() != before and labplan.root_name().startswith("bookworm-")


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
