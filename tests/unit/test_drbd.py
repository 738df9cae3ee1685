"""DRBD tier: the resource file for both versions, the brand-new detection and
the initial-sync guard (never a mkfs over data), and drbd-utils' own parser
on the rendered files (drbdadm for 9, drbdadm-84 for 8.4; no kernel module needed),
and the steps on recording hosts (facts in, commands out)."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

from fabfile import drbd
from fabfile.core import HostFailed, Result, StepFailed, UserError, templates, topology
from fabfile.core.testing import RecordingRun, files_present, packages_present
from fabfile.core.inventory import DrbdBacking, load
from fabfile.core.secrets import Secrets
from fabfile.core.tasks import PROJECT_ROOT

LAB = load(PROJECT_ROOT / "inventory/lab.yml")


def _inv(version, inv=LAB, **mail):
    return inv.model_copy(update={"mail": inv.mail.model_copy(
        update={"storage": "drbd", "drbd_version": version, **mail})})


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
    assert "quorum majority;" in text


def _section(text, name):
    """The body of the resource's `name {...}` section."""
    return text.split(f"\n  {name} {{\n", 1)[1].split("\n  }", 1)[0]


def test_drbd9_fences_through_pacemaker_in_net(tmp_path):
    text = _render(9, tmp_path)
    assert "fencing resource-and-stonith;" in _section(text, "net")
    assert "\n  disk {" not in text
    handlers = _section(text, "handlers")
    assert 'fence-peer "/usr/lib/drbd/crm-fence-peer.9.sh";' in handlers
    assert 'unfence-peer "/usr/lib/drbd/crm-unfence-peer.9.sh";' in handlers
    assert "after-resync-target" not in handlers
    assert 'shared-secret "' in _section(text, "net") and "cram-hmac-alg sha256;" in text


def test_drbd84_is_two_nodes_fenced_through_pacemaker_in_disk(tmp_path):
    text = _render(8, tmp_path)
    assert "on postfix01 {" in text and "on postfix02 {" in text and "postfix03" not in text
    assert "node-id" not in text and "connection-mesh" not in text and "quorum" not in text
    assert "fencing resource-and-stonith;" in _section(text, "disk")
    assert "fencing" not in _section(text, "net")  # 8.4: a disk option only
    handlers = _section(text, "handlers")
    assert 'fence-peer "/usr/lib/drbd/crm-fence-peer.9.sh";' in handlers
    assert 'after-resync-target "/usr/lib/drbd/crm-unfence-peer.9.sh";' in handlers
    assert 'unfence-peer "/usr/lib/drbd/crm-unfence-peer.9.sh";' in handlers
    assert "crm-fence-peer.sh" not in text and "crm-unfence-peer.sh" not in text
    assert 'shared-secret "' in _section(text, "net") and "after-sb-2pri disconnect;" in text


def test_backing_device_comes_from_the_inventory(tmp_path):
    inv = _inv(8, drbd_backing=DrbdBacking(disk="/dev/sdb", volume_group="data", volume="mailstore"))
    secret = Secrets(tmp_path / "s.yml").get
    text = templates.render("drbd/etc/drbd.d/mail.res.j2", inv, "postfix01", secret,
                            **drbd.template_vars(inv, "postfix01", secret))
    assert text.count("disk /dev/data/mailstore;") == 2
    assert drbd.template_vars(LAB, "postfix01", secret)["drbd_disk"] == "/dev/vg0/mail"  # the default


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
@pytest.mark.parametrize("version, drbdadm, env", [
    (8, "/usr/lib/drbd/drbdadm-84", {}),
    # what the hosts' drbdadm does once an 8.4 module is loaded (the tier's modprobe)
    (8, "drbdadm", {"DRBD_DRIVER_VERSION_OVERRIDE": "8.4.11"}),
    (9, "drbdadm", {}),
], ids=["8.4-drbdadm-84", "8.4-override", "9"])
def test_resource_file_parses_with_drbdadm(version, drbdadm, env, tmp_path):
    res = tmp_path / "mail.res"
    res.write_text(_render(version, tmp_path))
    r = subprocess.run([drbdadm, "-c", str(res), "dump", "all"], capture_output=True, text=True,
                       env={**os.environ, **env})
    assert r.returncode == 0, f"DRBD {version}: {r.stderr}"
    assert "resource mail" in r.stdout and "meta-disk" in r.stdout
    assert "resource-and-stonith" in r.stdout and "crm-fence-peer.9.sh" in r.stdout
    assert "crm-unfence-peer.9.sh" in r.stdout
    if version == 9:
        assert "connection-mesh" in r.stdout and r.stdout.count("node-id") == len(LAB.with_role("mail_backend"))


# --- the steps on recording hosts --------------------------------------------------------

SECRET = Secrets(Path("/nonexistent/secrets.yml"), persist=False).get
VAGRANT = load(PROJECT_ROOT / "inventory/vagrant.yml")  # two back ends, DRBD 8.4
PROC_84 = "version: 8.4.11 (api:1/proto:86-101)\nsrcversion: 1A2B3C\n"
PROC_9 = "version: 9.2.12 (api:2/proto:86-122)\nGIT-hash: abc build by root, 2024-11-01\nTransports (api:21): tcp\n"


@pytest.fixture(autouse=True)
def _no_waiting(monkeypatch):
    monkeypatch.setattr(drbd, "POLL_INTERVAL", 0)


def recording(version, answers, inv=None):
    inv = inv or _inv(version)
    run = RecordingRun(inv, answers={**answers, "*": [*answers.get("*", []),
                                                      (r"^(mkdir -p |chown |mv -f |rm -f )", Result())]})
    run.secrets.get = lambda name, *a: SECRET(name)
    return run


def _commands(h, prefix=""):
    return [c for c in h.changes if c.startswith(prefix)]


def test_the_resource_and_mail_store_are_the_cluster_tier_s():
    assert (drbd.RESOURCE, drbd.DEVICE, drbd.MAIL_DIR) == (topology.DRBD_RESOURCE, topology.DRBD_DEVICE,
                                                          topology.MAIL_STORE)


# the backing device: decisions over canned disk facts

EMPTY_DISK = dict(block=True, lsblk="/dev/vdb disk \n", blkid="", wipefs="", pv_vg=None)


def test_an_empty_disk_becomes_pv_and_volume_group():
    assert drbd.disk_plan(DrbdBacking(), **EMPTY_DISK) == ["pvcreate", "vgcreate"]


def test_an_empty_pv_left_by_an_interrupted_run_only_needs_the_volume_group():
    facts = {**EMPTY_DISK, "blkid": "DEVNAME=/dev/vdb\nTYPE=LVM2_member\nUSAGE=raid\n", "wipefs": "LVM2_member 0x218\n",
             "pv_vg": ""}
    assert drbd.disk_plan(DrbdBacking(), **facts) == ["vgcreate"]


def test_a_pv_of_this_volume_group_needs_nothing():
    facts = {**EMPTY_DISK, "lsblk": "/dev/vdb disk \n/dev/mapper/vg0-other lvm \n",
             "blkid": "TYPE=LVM2_member\n", "wipefs": "LVM2_member 0x218\n", "pv_vg": "vg0"}
    assert drbd.disk_plan(DrbdBacking(), **facts) == []


@pytest.mark.parametrize("facts, what", [
    ({"block": False}, r"/dev/vdb \(mail.drbd_backing.disk\) does not exist or is not a block device"),
    ({"blkid": "DEVNAME=/dev/vdb\nUUID=x\nTYPE=ext4\nUSAGE=filesystem\n", "wipefs": "ext4 0x438\n"},
     r"/dev/vdb \(mail.drbd_backing.disk\) is not an empty disk: it has signatures: ext4\. Refusing"),
    ({"wipefs": "xfs 0x0\n"}, "has signatures: xfs"),  # what only wipefs saw
    ({"blkid": "PTUUID=x\nPTTYPE=gpt\n", "lsblk": "/dev/vdb disk \n/dev/vdb1 part \n"},
     r"holds /dev/vdb1 \(part\); has signatures: partition table gpt"),
    ({"lsblk": "/dev/vdb disk /srv\n"}, "mounted at /srv"),
    ({"lsblk": "/dev/vdb disk \n/dev/vdb1 part [SWAP]\n"}, r"mounted at \[SWAP\]"),
    ({"blkid": "TYPE=LVM2_member\n", "wipefs": "LVM2_member 0x218\n", "pv_vg": "backups",
      "lsblk": "/dev/vdb disk \n/dev/mapper/backups-data lvm /srv/backups\n"},
     "mounted at /srv/backups; holds /dev/mapper/backups-data \\(lvm\\); is a physical volume of volume group backups"),
])
def test_a_disk_that_holds_anything_is_refused(facts, what):
    with pytest.raises(HostFailed, match=what):
        drbd.disk_plan(DrbdBacking(), **{**EMPTY_DISK, **facts})


def _disk_rules(**facts):
    """Rules for a host whose VG does not exist and whose disk says ``facts``."""
    f = {**EMPTY_DISK, **facts}
    rules = [(r"^lsblk -nrpo NAME,TYPE,MOUNTPOINT /dev/vdb$", Result(f["lsblk"])),
             (r"^blkid -p -o export /dev/vdb$", Result(f["blkid"]) if f["blkid"] else Result(exited=2)),
             (r"^wipefs -n --noheadings -O TYPE,OFFSET /dev/vdb$", Result(f["wipefs"]))]
    if f["block"]:
        rules.append((r"^test -b /dev/vdb$", Result()))
    if f["pv_vg"] is not None:
        rules.append((r"^pvs --noheadings -o vg_name /dev/vdb$", Result(f"  {f['pv_vg']}\n")))
    return rules


def test_brand_new_disk_gets_pv_volume_group_and_volume():
    run = recording(8, {"postfix01": _disk_rules()})
    drbd._backing(run.session("postfix01"))
    assert run.session("postfix01").changes == [
        "pvcreate /dev/vdb", "vgcreate vg0 /dev/vdb", "lvcreate --wipesignatures y -y -l 100%FREE -n mail vg0"]


def test_a_sized_volume_in_another_volume_group():
    backing = DrbdBacking(disk="/dev/disk/by-id/virtio-hastack-disk0", volume_group="data", volume="mail-store",
                          size="20G")
    run = recording(8, {"postfix01": [(r"^test -b /dev/disk/by-id/virtio-hastack-disk0$", Result()),
                                      (r"^lsblk ", Result("/dev/vdb disk \n")), (r"^wipefs ", Result())]},
                    inv=_inv(8, drbd_backing=backing))
    drbd._backing(run.session("postfix01"))
    assert run.session("postfix01").changes == [
        "pvcreate /dev/disk/by-id/virtio-hastack-disk0", "vgcreate data /dev/disk/by-id/virtio-hastack-disk0",
        "lvcreate --wipesignatures y -y -L 20G -n mail-store data"]


def test_existing_volume_group_gets_only_the_volume_and_the_disk_is_not_inspected():
    run = recording(8, {"postfix01": [(r"^vgs vg0$", Result("  VG  #PV #LV\n  vg0   1   0\n"))]})
    h = run.session("postfix01")
    drbd._backing(h)
    assert h.changes == ["lvcreate --wipesignatures y -y -l 100%FREE -n mail vg0"]
    assert not any(c.startswith(("pvcreate", "vgcreate", "lsblk", "wipefs", "blkid", "pvs")) for c in h.commands)


def test_existing_volume_needs_nothing():
    run = recording(8, {"postfix01": [(r"^test -b /dev/vg0/mail$", Result())]})
    h = run.session("postfix01")
    drbd._backing(h)
    assert h.changes == [] and h.commands == ["test -b /dev/vg0/mail"]
    assert h.reported("ok") == ["backing device /dev/vg0/mail"]


def test_an_inactive_volume_is_activated_not_created():
    run = recording(8, {"postfix01": [(r"^lvs vg0/mail$", Result("  mail vg0 -wi------- 20g\n"))]})
    drbd._backing(run.session("postfix01"))
    assert run.session("postfix01").changes == ["lvchange -ay vg0/mail"]


def test_a_disk_with_a_file_system_stops_the_host_untouched():
    run = recording(8, {"postfix01": _disk_rules(blkid="TYPE=ext4\n", wipefs="ext4 0x438\n")})
    with pytest.raises(HostFailed, match=r"/dev/vdb .* has signatures: ext4.*nothing was changed"):
        drbd._backing(run.session("postfix01"))
    assert run.session("postfix01").changes == []


def test_a_disk_of_another_volume_group_stops_the_host_untouched():
    run = recording(8, {"postfix01": _disk_rules(blkid="TYPE=LVM2_member\n", wipefs="LVM2_member 0x218\n",
                                                 pv_vg="vgdata")})
    with pytest.raises(HostFailed, match="is a physical volume of volume group vgdata"):
        drbd._backing(run.session("postfix01"))
    assert run.session("postfix01").changes == []


def test_a_missing_disk_stops_the_host_untouched():
    run = recording(8, {})
    with pytest.raises(HostFailed, match="does not exist or is not a block device"):
        drbd._backing(run.session("postfix01"))
    assert run.session("postfix01").changes == []


# the kernel module

def test_module_is_loaded_and_must_be_8_4():
    run = recording(8, {"postfix01": [(r"^cat /proc/drbd$", Result(PROC_84))]})
    h = run.session("postfix01")
    drbd._module(h)
    assert h.changes == ["modprobe drbd"] and "drbd module 8.4.11" in h.reported("ok")


def test_module_already_loaded_is_left_alone():
    run = recording(8, {"postfix01": [(r"^test -e /proc/drbd$", Result()), (r"^cat /proc/drbd$", Result(PROC_84))]})
    drbd._module(run.session("postfix01"))
    assert run.session("postfix01").changes == []


def test_drbd_8_refuses_a_drbd_9_module():
    run = recording(8, {"postfix01": [(r"^test -e /proc/drbd$", Result()), (r"^cat /proc/drbd$", Result(PROC_9))]})
    with pytest.raises(HostFailed, match="mail.drbd_version is 8 but the loaded drbd module is version 9.2.12"):
        drbd._module(run.session("postfix01"))


def test_drbd_9_replaces_an_unused_8_4_module():
    answers = iter([PROC_84, PROC_9])
    run = recording(9, {"postfix01": [(r"^test -e /proc/drbd$", Result()),
                                      (r"^cat /proc/drbd$", lambda c, i: Result(next(answers))),
                                      (r"^cat /sys/module/drbd/refcnt$", Result("0\n"))]})
    drbd._module(run.session("postfix01"))
    assert run.session("postfix01").changes == ["rmmod drbd && modprobe drbd"]


def test_drbd_9_never_unloads_an_8_4_module_in_use():
    proc = PROC_84 + " 0: cs:Connected ro:Secondary/Secondary ds:UpToDate/UpToDate C r-----\n"
    run = recording(9, {"postfix01": [(r"^test -e /proc/drbd$", Result()), (r"^cat /proc/drbd$", Result(proc)),
                                      (r"^cat /sys/module/drbd/refcnt$", Result("2\n"))]})
    with pytest.raises(HostFailed, match="8.4.11 and in use"):
        drbd._module(run.session("postfix01"))
    assert run.session("postfix01").changes == []


# DRBD 9: LINBIT's repository

LINBIT_LIST = ("deb [signed-by=/etc/apt/keyrings/linbit.asc] http://packages.linbit.com/public proxmox-8 drbd-9\n")


def test_drbd_9_adds_linbit_s_repository_and_builds_drbd_dkms():
    run = recording(9, {"postfix01": [(r"^uname -r$", Result("6.1.0-57-amd64\n"))]})
    h = run.session("postfix01")
    drbd._linbit(h)
    assert h.uploads["/etc/apt/sources.list.d/linbit.list.hastack-new"].endswith(LINBIT_LIST)
    steps = [c.split(" || ")[0] for c in h.changes]
    install = "DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends " \
              "-o Dpkg::Options::=--force-confold -o DPkg::Lock::Timeout=600 "
    assert steps[0] == install + "ca-certificates curl"
    # the key over HTTPS, through the site's apt proxy (the lab inventory has one), in place only when complete
    assert steps[1] == ("install -d -m 0755 /etc/apt/keyrings && curl -fsSL --max-time 60 --proxy "
                        f"{LAB.site.apt_proxy} -o /etc/apt/keyrings/linbit.asc.hastack-new "
                        "https://packages.linbit.com/package-signing-pubkey.asc && mv -f "
                        "/etc/apt/keyrings/linbit.asc.hastack-new /etc/apt/keyrings/linbit.asc")
    assert "apt-get update" in steps[2]
    assert steps[3:] == [install + "linux-headers-6.1.0-57-amd64 linux-headers-amd64",
                         install + "drbd-dkms drbd-utils lvm2"]


def test_drbd_8_never_adds_a_repository():
    run = recording(8, {"postfix01": [(r"^test -b /dev/vg0/mail$", Result()),
                                      (r"^cat /proc/drbd$", Result(PROC_84)), (r"^drbdadm ", Result())]},
                    inv=_inv(8, VAGRANT))
    h = run.session("postfix01")
    drbd._node(h, {})
    assert not any("linbit" in c or "curl" in c or "drbd-dkms" in c for c in h.commands)
    assert not any("linbit" in path for path in h.uploads)


def test_drbd_9_repository_converged_changes_nothing():
    run = recording(9, {"postfix01": [
        (r"^uname -r$", Result("6.1.0-57-amd64\n")), (r"^test -s /etc/apt/keyrings/linbit.asc$", Result()),
        files_present({"/etc/apt/sources.list.d/linbit.list": ("root:root:644", _linbit_list())}),
        packages_present("ca-certificates", "curl", "linux-headers-6.1.0-57-amd64", "linux-headers-amd64",
                         "drbd-dkms", "drbd-utils", "lvm2")]})
    drbd._linbit(run.session("postfix01"))
    assert run.session("postfix01").changes == []


def _linbit_list():
    inv = _inv(9)
    return templates.render("drbd/etc/apt/sources.list.d/linbit.list.j2", inv, "postfix01", SECRET,
                            **drbd.template_vars(inv, "postfix01", SECRET))


def test_linbit_list_is_managed():
    text = _linbit_list()
    assert text.startswith("# Managed by hastack (configs/drbd/etc/apt/sources.list.d/linbit.list.j2)")
    assert text.endswith(LINBIT_LIST)


def test_kernel_headers_for_dkms():
    assert drbd.header_packages("6.1.0-57-amd64") == ["linux-headers-6.1.0-57-amd64", "linux-headers-amd64"]
    assert drbd.header_packages("6.1.0-28-cloud-amd64") == ["linux-headers-6.1.0-28-cloud-amd64",
                                                            "linux-headers-cloud-amd64"]
    assert drbd.header_packages("6.9.3-custom") == ["linux-headers-6.9.3-custom"]


# the node step

def _converged_node(version, inv):
    text = templates.render("drbd/etc/drbd.d/mail.res.j2", inv, "postfix01", SECRET,
                            **drbd.template_vars(inv, "postfix01", SECRET))
    return [
        packages_present("drbd-utils", "lvm2"),
        files_present({drbd.RES_FILE: ("root:root:600", text)}),
        (r"^test -b /dev/vg0/mail$", Result()),
        (r"^test -e /proc/drbd$", Result()),
        (r"^cat /proc/drbd$", Result(PROC_84 if version == 8 else PROC_9)),
        (r"^drbdadm role mail$", Result("Secondary/Secondary\n" if version == 8 else "Secondary\n")),
        (r"^drbdadm dump-md mail", Result("Device '0' is configured!\n")),
        (r"^drbdadm dstate mail$", Result("UpToDate/UpToDate\n")),
        (r"^drbdadm cstate mail$", Result("Connected\n")),
    ]


def test_node_already_up_runs_no_command():
    inv = _inv(8, VAGRANT)
    run = recording(8, {"postfix01": _converged_node(8, inv)}, inv=inv)
    created = {}
    drbd._node(run.session("postfix01"), created)
    assert run.session("postfix01").changes == [] and created == {"postfix01": False}


BRAND_NEW = [
    (r"^test -b /dev/vdb$", Result()), (r"^lsblk -nrpo NAME,TYPE,MOUNTPOINT /dev/vdb$", Result("/dev/vdb disk \n")),
    (r"^wipefs -n ", Result()), (r"^cat /proc/drbd$", Result(PROC_84)),
    (r"^drbdadm -c \S+ dump all$", Result()),
    (r"^drbdadm dump-md mail", Result("No valid meta data found\n")),
]


def test_brand_new_node_gets_its_volume_module_metadata_and_comes_up():
    run = recording(8, {"postfix01": BRAND_NEW}, inv=_inv(8, VAGRANT))
    h = run.session("postfix01")
    created = {}
    drbd._node(h, created)
    assert [c for c in h.changes if not c.startswith("DEBIAN_FRONTEND")] == [
        "pvcreate /dev/vdb", "vgcreate vg0 /dev/vdb", "lvcreate --wipesignatures y -y -l 100%FREE -n mail vg0",
        "modprobe drbd", "drbdadm create-md --force mail", "drbdadm up mail"]
    assert "drbd-utils lvm2" in h.changes[0] and created == {"postfix01": True}
    # the module is loaded before drbdadm reads the file, the new one's check included
    first_drbdadm = next(i for i, c in enumerate(h.commands) if c.startswith("drbdadm"))
    assert h.commands.index("modprobe drbd") < first_drbdadm
    assert h.commands[first_drbdadm].startswith("drbdadm -c /etc/drbd.d/mail.res.hastack-new dump all")


def test_no_create_md_over_a_volume_with_a_file_system():
    rules = [(r"^blkid -p -o export /dev/vg0/mail$", Result("TYPE=xfs\n")), (r"^test -b /dev/vg0/mail$", Result()),
             *BRAND_NEW]
    run = recording(8, {"postfix01": rules}, inv=_inv(8, VAGRANT))
    with pytest.raises(HostFailed, match="/dev/vg0/mail has no DRBD metadata but holds xfs; refusing create-md"):
        drbd._node(run.session("postfix01"), {})
    assert not any("create-md" in c for c in run.session("postfix01").changes)


# the initial sync

AFTER_PRIMARY = [
    "mkfs.ext4 -q -L mail /dev/drbd0",
    "id vmail >/dev/null 2>&1 || useradd --system --home-dir /var/vmail --no-create-home "
    "--shell /usr/sbin/nologin vmail",
    "mkdir -p /var/vmail && mount /dev/drbd0 /var/vmail && chown vmail:vmail /var/vmail && chmod 0770 "
    "/var/vmail && mkdir /var/vmail/postfix-spool && cp -a /var/spool/postfix/. /var/vmail/postfix-spool/ "
    "&& umount /var/vmail",  # postfix's queue on the store
    "drbdadm secondary mail"]


def test_ready_to_skip_the_sync_only_connected_and_all_inconsistent():
    assert drbd.ready_to_skip_sync("Connected", "Inconsistent/Inconsistent")
    assert drbd.ready_to_skip_sync("Connected\nConnected\n", "Inconsistent/Inconsistent/Inconsistent")  # DRBD 9
    assert not drbd.ready_to_skip_sync("Connecting", "Inconsistent/DUnknown")
    assert not drbd.ready_to_skip_sync("Connected\nConnecting", "Inconsistent/Inconsistent/DUnknown")
    assert not drbd.ready_to_skip_sync("Connected", "UpToDate/Inconsistent")
    assert not drbd.ready_to_skip_sync("Connected", "Inconsistent")
    assert not drbd.ready_to_skip_sync("", "")


def test_initial_sync_without_a_full_resync_once_connected():
    cstates = iter(["WFConnection", "Connected", "Connected"])
    run = recording(8, {"postfix01": [(r"^drbdadm cstate mail$", lambda c, i: Result(next(cstates) + "\n")),
                                      (r"^drbdadm dstate mail$", Result("Inconsistent/Inconsistent\n"))]})
    h = run.session("postfix01")
    drbd._initial(h)
    assert h.changes == ["drbdadm -- --clear-bitmap new-current-uuid mail", "drbdadm primary mail", *AFTER_PRIMARY]
    assert not any("--force" in c for c in h.changes)


def test_initial_sync_falls_back_to_a_full_sync_and_says_so(monkeypatch):
    monkeypatch.setattr(drbd, "CONNECT_TIMEOUT", 0)
    run = recording(8, {"postfix01": [(r"^drbdadm cstate mail$", Result("WFConnection\n")),
                                      (r"^drbdadm dstate mail$", Result("Inconsistent/DUnknown\n"))]})
    h = run.session("postfix01")
    drbd._initial(h)
    assert h.changes == ["drbdadm primary --force mail", *AFTER_PRIMARY]
    assert "new-current-uuid" not in " ".join(h.commands)
    assert "cstate WFConnection, dstate Inconsistent/DUnknown" in run.output
    assert "falling back to a full initial sync (primary --force)" in run.output


def test_initial_sync_refuses_a_device_with_a_file_system():
    run = recording(8, {"postfix01": [(r"^blkid /dev/drbd0$", Result(stdout="TYPE=ext4\n")),
                                      (r"^drbdadm cstate mail$", Result("Connected\n")),
                                      (r"^drbdadm dstate mail$", Result("Inconsistent/Inconsistent\n"))]})
    with pytest.raises(HostFailed, match="already holds a file system"):
        drbd._initial(run.session("postfix01"))
    changes = run.session("postfix01").changes
    assert not any(c.startswith("mkfs") for c in changes) and changes[-1] == "drbdadm secondary mail"


# converge over the resource's nodes: the first run and the second

def test_first_converge_creates_metadata_everywhere_and_syncs_from_the_first_node():
    inv = _inv(8, VAGRANT)
    rules = [*BRAND_NEW, (r"^drbdadm cstate mail$", Result("Connected\n")),
             (r"^drbdadm dstate mail$", Result("Inconsistent/Inconsistent\n"))]
    run = recording(8, {"postfix01": rules, "postfix02": rules}, inv=inv)
    drbd.converge(run)
    one, two = run.session("postfix01"), run.session("postfix02")
    for h in (one, two):
        assert "drbdadm create-md --force mail" in h.changes and "drbdadm up mail" in h.changes
    assert "drbdadm -- --clear-bitmap new-current-uuid mail" in one.changes
    assert "mkfs.ext4 -q -L mail /dev/drbd0" in one.changes
    assert not any("new-current-uuid" in c or "mkfs" in c or "primary" in c for c in two.changes)


def test_second_converge_changes_nothing():
    inv = _inv(8, VAGRANT)
    run = recording(8, {h: _converged_node(8, inv) for h in ("postfix01", "postfix02")}, inv=inv)
    drbd.converge(run)
    for name in ("postfix01", "postfix02"):
        h = run.session(name)
        assert h.changes == [], name
        assert not any(w in c for c in h.commands for w in ("create-md", "mkfs", "new-current-uuid", "primary"))
    assert "existing data, no initial sync or mkfs" in run.output


def test_a_refused_disk_names_the_host_and_stops_the_run():
    inv = _inv(8, VAGRANT)
    rules = _disk_rules(blkid="TYPE=ext4\n", wipefs="ext4 0x438\n")
    run = recording(8, {"postfix01": rules, "postfix02": _disk_rules(), "*": [(r"^cat /proc/drbd$", Result(PROC_84))]},
                    inv=inv)
    with pytest.raises(StepFailed, match=r"postfix01: /dev/vdb \(mail.drbd_backing.disk\) is not an empty disk: "
                                         r"it has signatures: ext4"):
        drbd.converge(run)
    assert not any(c.startswith(("pvcreate", "vgcreate", "lvcreate")) for c in run.session("postfix01").changes)


def test_postfix_ids_must_match_on_every_back_end_before_anything_changes():
    drbd.check_postfix_ids({"postfix01": "101:104:105", "postfix02": "101:104:105"})
    with pytest.raises(UserError, match=r"postfix uid:gid:postdrop gid.*postfix01: 101:104:105; postfix02: 102:104:105"):
        drbd.check_postfix_ids({"postfix01": "101:104:105", "postfix02": "102:104:105"})
