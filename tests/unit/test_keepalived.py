"""keepalived tier without hosts: keepalived.conf for every ejabberd host of every
shipped inventory (unicast peers, VIP, password length, track script), checked
with `keepalived -t` when the machine has keepalived."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

from fabfile import keepalived
from fabfile.core import Result, templates
from fabfile.core.inventory import load
from fabfile.core.testing import RecordingRun, files_present
from tests.unit.shipped import INVENTORIES

ROOT = Path(__file__).resolve().parents[2]
LAB = ROOT / "inventory/lab.yml"
CONF = "keepalived/etc/keepalived/keepalived.conf.j2"
CHECK = "keepalived/usr/local/lib/hastack/check-ejabberd.j2"
SECRETS = {keepalived.SECRET_AUTH: "abcdefghijklmnop"}


def secret(name):
    return "abcdefghijklmnop"


def render(name, inv, host, **extra):
    return templates.render(name, inv, host, secret, **keepalived.template_vars(inv, host, secret), **extra)


@pytest.fixture(scope="module")
def lab():
    return load(LAB)


@pytest.mark.parametrize("inventory", INVENTORIES, ids=lambda p: p.name)
def test_each_node_peers_with_the_others_by_unicast(inventory):
    inv = load(inventory)
    if "xmpp" not in inv.vips:
        pytest.skip("no xmpp VIP")
    vip = inv.vips["xmpp"]
    holders = inv.with_role("ejabberd")
    for host in holders:
        text = render(CONF, inv, host)
        me = str(inv.hosts[host].addresses[vip.network])
        assert f"unicast_src_ip {me}\n" in text
        for other in holders:
            addr = str(inv.hosts[other].addresses[vip.network])
            assert (f"        {addr}\n" in text) == (other != host)
        assert f"{vip.address}/{inv.networks[vip.network].cidr.prefixlen} dev" in text
        assert "auth_pass abcdefgh\n" in text  # VRRP PASS auth: 8 characters
        assert "chk_ejabberd" in text and "nopreempt" in text


def test_priorities_descend_in_inventory_order(lab):
    assert [keepalived.priority(lab, h) for h in lab.with_role("ejabberd")] == [150, 140]


def test_router_id_is_in_range_and_stable(lab):
    rid = keepalived.router_id(lab)
    assert 1 <= rid <= 255 and rid == keepalived.router_id(lab)


def test_generated_password_is_8_characters():
    pw = keepalived.vrrp_password()
    assert len(pw) == 8 and pw.isalnum() and pw != keepalived.vrrp_password()


def test_detected_interface_replaces_the_network_name(lab):
    text = render(CONF, lab, "e1server", detected_interface="eth1")
    assert "interface eth1\n" in text and "dev eth1\n" in text and "interface dmz" not in text


def test_check_script_tests_the_unit_and_the_c2s_port(lab):
    text = render(CHECK, lab, "e1server")
    assert text.startswith("#!/bin/sh\n")
    assert "systemctl is-active --quiet ejabberd.service" in text
    assert "nc -z -w 2 10.200.1.2 5222" in text


@pytest.mark.skipif(not shutil.which("keepalived") or os.geteuid() != 0,
                    reason="needs keepalived and root (a network namespace with the host's NIC names)")
def test_keepalived_accepts_the_config(lab, tmp_path):
    """keepalived's own checker; it wants the interfaces to exist, so it runs in a
    scratch network namespace with a NIC named like the host's (dmz)."""
    # The track script as on the host, but in a scratch folder.
    script = tmp_path / "check-ejabberd"
    script.write_text("#!/bin/sh\nexit 0\n")
    script.chmod(0o755)
    tmp_path.chmod(0o755)
    conf = tmp_path / "keepalived.conf"
    conf.write_text(render(CONF, lab, "e1server")
                    .replace("/usr/local/lib/hastack/check-ejabberd", str(script)))
    check = f"ip link add dmz type veth peer name dmz-peer && ip link set dmz up && keepalived -t -f {conf}"
    out = subprocess.run(["unshare", "--net", "sh", "-c", check], capture_output=True, text=True)
    assert out.returncode == 0, out.stdout + out.stderr


# --- the runbook on the recording host -------------------------------------------------------


INTERFACE = (r"^ip -o -4 addr show to 10\.200\.1\.2/32$", Result("3: eth1    inet 10.200.1.2/24 brd 10.200.1.255\n"))
FILE_OPS = [(r"^(mkdir -p|chown|mv -f|rm -f|cp -a|sh -n|keepalived -t -f) ", Result())]


def test_a_fresh_node_gets_the_check_and_the_config_on_its_real_interface(lab):
    run = RecordingRun(lab, secrets=SECRETS, answers={"*": [INTERFACE, *FILE_OPS]})
    h = run.session("e1server")
    keepalived._keepalived(h)
    assert h.uploads[keepalived.CONFIG + ".hastack-new"] == render(CONF, lab, "e1server", detected_interface="eth1")
    assert h.uploads[keepalived.CHECK + ".hastack-new"] == render(CHECK, lab, "e1server")
    assert "keepalived -t -f /etc/keepalived/keepalived.conf.hastack-new" in h.commands
    assert h.changes[-2:] == ["systemctl enable keepalived", "systemctl start keepalived"]


def test_an_already_converged_node_changes_nothing(lab):
    listed = "".join(f"{p} installed\n" for p in keepalived.PACKAGES)
    run = RecordingRun(lab, secrets=SECRETS, answers={"*": [
        INTERFACE,
        (r"^dpkg-query", Result(listed)),
        files_present({
            "/usr/local/lib/hastack": ("root:root:755", None),
            keepalived.CHECK: ("root:root:755", render(CHECK, lab, "e1server")),
            keepalived.CONFIG: ("root:root:640", render(CONF, lab, "e1server", detected_interface="eth1")),
        }),
        (r"^systemctl is-enabled", Result("enabled\n")),
        (r"^systemctl is-active", Result("active\n")),
    ]})
    h = run.session("e1server")
    keepalived._keepalived(h)
    assert h.changes == [] and h.uploads == {}


def test_status_quotes_the_vip(lab):
    holds = (r"^ip -o -4 addr show \| grep -qw 10\.200\.1\.4$", Result())
    run = RecordingRun(lab, secrets=SECRETS, answers={"*": [holds]})
    keepalived.status.body.runbook(run)
    assert "holds the VIP 10.200.1.4" in " ".join(run.session("e1server").reported("ok"))
