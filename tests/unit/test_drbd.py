"""DRBD tier: the resource file for both versions, the brand-new detection and
the initial-sync guard (never a mkfs over data), and drbd-utils' own parser
on the rendered files (drbdadm for 9, drbdadm-84 for 8.4; no kernel module needed)."""

from __future__ import annotations

import shutil
import subprocess

import pytest

from fabfile import drbd
from fabfile.core import UserError, templates
from fabfile.core.inventory import load
from fabfile.core.secrets import Secrets
from fabfile.core.tasks import PROJECT_ROOT

LAB = load(PROJECT_ROOT / "inventory/lab.yml")


def _inv(version):
    return LAB.model_copy(update={"mail": LAB.mail.model_copy(update={"storage": "drbd", "drbd_version": version})})


def _render(version, tmp_path, host="postfix01"):
    return templates.render("drbd/etc/drbd.d/mail.res.j2", _inv(version), host, Secrets(tmp_path / "s.yml").get)


def test_drbd9_is_a_three_node_mesh(tmp_path):
    text = _render(9, tmp_path)
    assert text.startswith("# Managed by hastack")
    for i, (name, addr) in enumerate((("postfix01", "10.200.11.113"), ("postfix02", "10.200.11.114"),
                                      ("postfix03", "10.200.11.115"))):
        assert f"  on {name} {{\n    node-id {i};" in text and f"address {addr}:7789;" in text
    assert "connection-mesh {\n    hosts postfix01 postfix02 postfix03;" in text
    assert "quorum majority;" in text and "crm-fence-peer.9.sh" in text


def test_drbd84_is_two_nodes(tmp_path):
    text = _render(8, tmp_path)
    assert "on postfix01 {" in text and "on postfix02 {" in text and "postfix03" not in text
    assert "node-id" not in text and "connection-mesh" not in text
    assert "disk {\n    fencing resource-only;" in text


def test_drbd84_refuses_three_back_ends():
    with pytest.raises(UserError, match="DRBD 8.4.*two nodes.*drbd_version: 9"):
        drbd.check(_inv(8))
    drbd.check(_inv(9))


def test_brand_new_only_without_metadata_and_not_up():
    no_md = "No valid meta data found\n"
    assert drbd.is_new(10, no_md)
    assert not drbd.is_new(0, no_md)  # up: never create-md
    assert not drbd.is_new(10, "Found meta data: v08 ...")
    assert not drbd.is_new(10, "")  # could not tell: not new


def test_initial_sync_only_when_every_node_is_new_and_nothing_uptodate():
    assert drbd.initial_sync_wanted({"a": True, "b": True}, {"a": "Inconsistent/Inconsistent", "b": "Inconsistent"})
    assert not drbd.initial_sync_wanted({"a": True, "b": False}, {"a": "Inconsistent", "b": "Inconsistent"})
    assert not drbd.initial_sync_wanted({"a": True, "b": True}, {"a": "UpToDate/Inconsistent", "b": "Inconsistent"})
    assert not drbd.initial_sync_wanted({}, {})
    assert not drbd.initial_sync_wanted({"a": True}, {"a": ""})  # state unknown


def test_lab_has_no_storage():
    assert LAB.mail.storage == "none"


@pytest.mark.skipif(not shutil.which("drbdadm"), reason="drbd-utils is not installed here (./run test installs it)")
@pytest.mark.parametrize("version, drbdadm", [(8, "/usr/lib/drbd/drbdadm-84"), (9, "drbdadm")])
def test_resource_file_parses_with_drbdadm(version, drbdadm, tmp_path):
    res = tmp_path / "mail.res"
    res.write_text(_render(version, tmp_path))
    r = subprocess.run([drbdadm, "-c", str(res), "dump", "all"], capture_output=True, text=True)
    assert r.returncode == 0, f"DRBD {version}: {r.stderr}"
    assert "resource mail" in r.stdout and "meta-disk" in r.stdout
    if version == 9:
        assert "connection-mesh" in r.stdout and r.stdout.count("node-id") == len(LAB.with_role("mail_backend"))
