"""DRBD tier: the resource file for both versions, the brand-new detection and
the initial-sync guard (never a mkfs over data), and drbd-utils' own parser
on the rendered files (drbdadm for 9, drbdadm-84 for 8.4; no kernel module needed),
and the steps on recording hosts (facts in, commands out)."""

from __future__ import annotations

import hashlib
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from fabfile import drbd
from fabfile.core import HostFailed, Result, UserError, templates, topology
from fabfile.core.testing import RecordingRun
from fabfile.core.inventory import load
from fabfile.core.secrets import Secrets
from fabfile.core.tasks import PROJECT_ROOT

LAB = load(PROJECT_ROOT / "inventory/lab.yml")


def _inv(version):
    return LAB.model_copy(update={"mail": LAB.mail.model_copy(update={"storage": "drbd", "drbd_version": version})})


def _render(version, tmp_path, host="postfix01", secret=None):
    secret = secret or Secrets(tmp_path / "s.yml").get
    inv = _inv(version)
    return templates.render("drbd/etc/drbd.d/mail.res.j2", inv, host, secret, **drbd.template_vars(inv, host, secret))


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


# --- the steps on recording hosts --------------------------------------------------------

SECRET = Secrets(Path("/nonexistent/secrets.yml"), persist=False).get


def recording(version, answers):
    run = RecordingRun(_inv(version), answers={**answers, "*": [(r"^(mkdir -p |chown |mv -f |rm -f )", Result())]})
    run.secrets.get = lambda name, *a: SECRET(name)
    return run


def test_the_resource_and_mail_store_are_the_cluster_tier_s():
    assert (drbd.RESOURCE, drbd.DEVICE, drbd.MAIL_DIR) == (topology.DRBD_RESOURCE, topology.DRBD_DEVICE,
                                                          topology.MAIL_STORE)


def test_node_already_up_runs_no_command(tmp_path):
    text = _render(9, tmp_path, secret=SECRET)
    digest = hashlib.sha256(text.encode()).hexdigest()
    run = recording(9, {"postfix01": [
        (r"^dpkg-query -W -f='\$\{Package\}", Result(stdout="drbd-utils installed\n")),
        (rf"^stat -c '%U:%G:%a' {re.escape(drbd.RES_FILE)} && sha256sum",
         Result(stdout=f"root:root:600\n{digest}  {drbd.RES_FILE}\n")),
        (r"^drbdadm role mail$", Result(stdout="Secondary\n")),
        (r"^drbdadm dump-md mail", Result(stdout="Found meta data\n"))]})
    created = {}
    drbd._node(run.session("postfix01"), created)
    assert run.session("postfix01").changes == [] and created == {"postfix01": False}


def test_brand_new_node_gets_metadata_and_comes_up():
    run = recording(9, {"postfix01": [(r"^drbdadm -c \S+ dump all$", Result()),
                                      (r"^drbdadm dump-md mail", Result(stdout="No valid meta data found\n"))]})
    created = {}
    drbd._node(run.session("postfix01"), created)
    changes = [c for c in run.session("postfix01").changes if c.startswith("drbdadm")]
    assert changes == ["drbdadm create-md --force mail", "drbdadm up mail"] and created == {"postfix01": True}


def test_initial_sync_makes_the_file_system_owned_by_the_mail_user():
    run = recording(9, {})
    drbd._initial(run.session("postfix01"))
    assert run.session("postfix01").changes == [
        "drbdadm primary --force mail", "mkfs.ext4 -q -L mail /dev/drbd0",
        "id vmail >/dev/null 2>&1 || useradd --system --home-dir /var/vmail --no-create-home "
        "--shell /usr/sbin/nologin vmail",
        "mkdir -p /var/vmail && mount /dev/drbd0 /var/vmail && chown vmail:vmail /var/vmail && chmod 0770 "
        "/var/vmail && umount /var/vmail",
        "drbdadm secondary mail"]


def test_initial_sync_refuses_a_device_with_a_file_system():
    run = recording(9, {"postfix01": [(r"^blkid /dev/drbd0$", Result(stdout="TYPE=ext4\n"))]})
    with pytest.raises(HostFailed, match="already holds a file system"):
        drbd._initial(run.session("postfix01"))
    assert run.session("postfix01").changes == []
