"""DRBD tier (mail back ends): the replicated block device under the mail store.

Only with `mail.storage: drbd`; with `none` (the container lab: no kernel
module) it does nothing. `mail.drbd_version: 8` is Debian's kernel DRBD 8.4,
two nodes per resource (the first two mail back ends, no third-party
repository); `9` is LINBIT's DRBD 9 (drbd-dkms from LINBIT's public
repository) with the seed's mesh over every back end (node-ids,
connection-mesh, quorum). Pacemaker (the cluster tier's DrbdData and DrbdFS)
takes the resource over once it is up; fencing is resource-and-stonith with
LINBIT's crm-fence-peer.9.sh / crm-unfence-peer.9.sh handlers (both versions).

Runbook, on every node of the resource at once:
1. Packages: drbd-utils and lvm2. DRBD 9 only: LINBIT's signing key
   (`LINBIT_KEY_URL`, fetched once into /etc/apt/keyrings/linbit.asc), the
   repository (`deb [signed-by=...] http://packages.linbit.com/public proxmox-8
   drbd-9`, from configs/drbd/etc/apt/sources.list.d/linbit.list.j2),
   apt-get update when either changed, the headers of the running kernel
   (and their meta package), drbd-dkms and LINBIT's drbd-utils.
2. The backing device /dev/VG/LV (`mail.drbd_backing`): present -> nothing;
   an inactive volume -> lvchange -ay; the volume group present -> lvcreate;
   else the disk is inspected first (a block device, not mounted, no
   partitions or holders, no signature by `blkid -p`, `wipefs -n` or `pvs`,
   but an empty PV or a PV of this very volume group) and anything else on it
   stops the host with what was found, nothing touched; then pvcreate,
   vgcreate, `lvcreate --wipesignatures y -y`.
3. The kernel module: `modprobe drbd` before any drbdadm (drbdadm 9.x reads
   the resource file as DRBD 9 unless it sees an 8.4 module), and /proc/drbd
   must say `version: 8.4` (or 9.x for DRBD 9: an unused 8.4 module that was
   loaded before drbd-dkms was built is replaced; one in use stops the host).
4. /etc/drbd.d/mail.res from configs/drbd/etc/drbd.d/mail.res.j2, checked with
   `drbdadm -c FILE dump all` before it replaces the old one (a changed file on
   a running resource is applied with `drbdadm adjust`).
5. Metadata only on a brand-new resource: `drbdadm dump-md` answering "No
   valid meta data found" on a resource that is not up, and a backing volume
   where `blkid -p` finds no file system. Existing metadata or a running
   resource is never touched (no create-md, never a mkfs).
6. `drbdadm up` where the resource is not up yet.
7. Initial sync, once: only when every node's metadata was created in this
   run and no disk is UpToDate, on the first node: wait (`CONNECT_TIMEOUT`)
   until it is Connected with every disk Inconsistent, then
   `drbdadm -- --clear-bitmap new-current-uuid` (every disk UpToDate at once,
   no full sync: there is no data yet) and `primary`; when it does not connect
   in time, `primary --force` (a full sync, said in the report). Then, unless
   blkid finds a file system on the device: mkfs.ext4, the mountpoint owned by
   the mail user, secondary again (Pacemaker promotes it).
A second run changes nothing: no create-md, no new-current-uuid, no mkfs.
"""

from __future__ import annotations

import re
from typing import TYPE_CHECKING

from invoke import Collection

from .core import HostFailed, UserError, q, runbook, topology
from .core.wait import TimedOut, poll

if TYPE_CHECKING:
    from .core import HostSession, Run
    from .core.inventory import DrbdBacking, Inventory

ROLE = topology.MAIL_BACKEND
RESOURCE = topology.DRBD_RESOURCE  # the cluster tier's DrbdData manages it by this name
RES_FILE = f"/etc/drbd.d/{RESOURCE}.res"
DEVICE = topology.DRBD_DEVICE
MINOR = 0
PORT = 7789
MAIL_DIR = topology.MAIL_STORE
MAIL_USER = topology.VMAIL_USER
SECRET = "drbd_mail_secret"
R = q(RESOURCE)
PACKAGES = ["drbd-utils", "lvm2"]
# How long the initial sync waits for the nodes to connect before it falls back to a full sync.
CONNECT_TIMEOUT = 60
POLL_INTERVAL = 2

# DRBD 9: LINBIT's public repository. Its proxmox-8 suite is built for Debian 12
# (Proxmox VE 8 is Debian 12): drbd-dkms (DKMS builds it against the running
# kernel's headers), drbd-utils 9.x. The key is fetched over HTTPS once; apt
# checks every index against it.
LINBIT_REPO = "http://packages.linbit.com/public"
LINBIT_SUITE, LINBIT_COMPONENT = "proxmox-8", "drbd-9"
LINBIT_KEY_URL = "https://packages.linbit.com/package-signing-pubkey.asc"
LINBIT_KEYRING = "/etc/apt/keyrings/linbit.asc"
LINBIT_LIST = "/etc/apt/sources.list.d/linbit.list"
KERNEL_RELEASE = re.compile(r"[0-9][A-Za-z0-9.+_~-]*")
VERSION_LINE = re.compile(r"^version: ((\d+)\.(\d+)\S*)", re.M)


def version(inv: Inventory) -> int:
    return inv.mail.drbd_version if inv.mail else 8


def backing(inv: Inventory) -> DrbdBacking:
    from .core.inventory import DrbdBacking  # pydantic: loaded when a task runs

    return inv.mail.drbd_backing if inv.mail else DrbdBacking()


def members(inv: Inventory) -> list[str]:
    """The resource's nodes: every back end with DRBD 9, the first two with 8.4."""
    hosts = inv.with_role(ROLE)
    return hosts if version(inv) == 9 else hosts[:2]


def check(inv: Inventory) -> None:
    hosts = inv.with_role(ROLE)
    if version(inv) == 8 and len(hosts) > 2:
        raise UserError(f"{inv.path}: DRBD 8.4 (Debian's kernel) replicates between two nodes, "
                        f"the inventory has {len(hosts)} back ends: set mail.drbd_version: 9 (LINBIT's "
                        "packages) for the 3-node mesh, or keep two back ends")


def template_vars(inv: Inventory, host: str, secret) -> dict:
    return {
        "drbd_version": version(inv),
        "drbd_resource": RESOURCE,
        "drbd_device": DEVICE,
        "drbd_minor": MINOR,
        "drbd_disk": backing(inv).device,
        "drbd_port": PORT,
        "drbd_secret": secret(SECRET),
        "drbd_nodes": [{"name": n, "address": topology.ring_address(inv, n)} for n in members(inv)]
        if inv.mail and inv.with_role(ROLE) else [{"name": host, "address": inv.management_address(host)}],
        "linbit_keyring": LINBIT_KEYRING,
        "linbit_repo": LINBIT_REPO,
        "linbit_suite": LINBIT_SUITE,
        "linbit_component": LINBIT_COMPONENT,
    }


def is_new(role_rc: int, dump_md_out: str) -> bool:
    """Brand new: not up (`drbdadm role` fails) and `drbdadm dump-md` finds no metadata."""
    return role_rc != 0 and "No valid meta data found" in dump_md_out


def initial_sync_wanted(created: dict[str, bool], dstates: dict[str, str]) -> bool:
    """The initial sync and mkfs only when every node's metadata is new from this
    run and no disk is UpToDate anywhere (nothing to lose)."""
    return bool(created) and all(created.values()) and all(
        s and "UpToDate" not in s for s in dstates.values())


def ready_to_skip_sync(cstate: str, dstate: str) -> bool:
    """Connected to every peer (one line per connection with DRBD 9) and every
    disk, local and peers, Inconsistent: `new-current-uuid --clear-bitmap` may
    declare them all UpToDate."""
    conns = cstate.split()
    disks = [d for word in dstate.split() for d in word.split("/")]
    return bool(conns) and all(c == "Connected" for c in conns) and len(disks) >= 2 and all(
        d == "Inconsistent" for d in disks)


# --- the backing device ----------------------------------------------------------------


def blkid_signatures(export: str) -> list[str]:
    """`blkid -p -o export` -> what it found: ["ext4"], ["partition table gpt"], ..."""
    found = []
    for line in export.splitlines():
        key, _, value = line.partition("=")
        if key == "TYPE":
            found.append(value)
        elif key == "PTTYPE":
            found.append(f"partition table {value}")
    return found


def disk_plan(b: DrbdBacking, *, block: bool, lsblk: str, blkid: str, wipefs: str,
              pv_vg: str | None) -> list[str]:
    """What the disk needs before the volume group can hold the volume: a subset of
    ["pvcreate", "vgcreate"] (none: it is a PV of this volume group already).
    ``lsblk``: `lsblk -nrpo NAME,TYPE,MOUNTPOINT DISK`; ``blkid``: `blkid -p -o
    export DISK`; ``wipefs``: `wipefs -n --noheadings -O TYPE,OFFSET DISK`;
    ``pv_vg``: `pvs --noheadings -o vg_name DISK` (None: not a PV, "": a PV in no
    volume group). Anything else on the disk raises HostFailed saying what."""
    disk, vg = b.disk, b.volume_group
    if not block:
        raise HostFailed(f"{disk} (mail.drbd_backing.disk) does not exist or is not a block device; "
                         "nothing was changed")
    rows = [line.split() for line in lsblk.splitlines() if line.strip()]
    found: list[str] = []
    mounts = [r[2] for r in rows if len(r) > 2]
    if mounts:
        found.append("mounted at " + ", ".join(mounts))
    ours = pv_vg == vg
    if rows[1:] and not ours:
        found.append("holds " + ", ".join(f"{r[0]} ({r[1]})" if len(r) > 1 else r[0] for r in rows[1:]))
    if pv_vg and not ours:
        found.append(f"is a physical volume of volume group {pv_vg}")
    signatures = set(blkid_signatures(blkid)) | {line.split()[0] for line in wipefs.splitlines() if line.strip()}
    if pv_vg is not None:
        signatures.discard("LVM2_member")  # the PV pvs just named (empty, or ours)
    if signatures:
        found.append("has signatures: " + ", ".join(sorted(signatures)))
    if found:
        raise HostFailed(f"{disk} (mail.drbd_backing.disk) is not an empty disk: it "
                         + "; ".join(found) + f". Refusing to make it the physical volume of {vg}; nothing "
                         "was changed (name another disk, or clear this one by hand if it is really unused)")
    if ours:
        return []
    return ["vgcreate"] if pv_vg == "" else ["pvcreate", "vgcreate"]


def _backing(h: HostSession) -> None:
    b = backing(h.inv)
    lv, vg, disk = f"{b.volume_group}/{b.volume}", b.volume_group, b.disk
    if h.probe(f"test -b {q(b.device)}").ok:
        h.ok(f"backing device {b.device}")
        return
    if h.probe(f"lvs {q(lv)}").ok:
        h.sh(f"lvchange -ay {q(lv)}", message=f"backing device {b.device} activated")
        return
    if not h.probe(f"vgs {q(vg)}").ok:
        if not h.probe(f"test -b {q(disk)}").ok:
            disk_plan(b, block=False, lsblk="", blkid="", wipefs="", pv_vg=None)  # raises
        pvs = h.probe(f"pvs --noheadings -o vg_name {q(disk)}")
        plan = disk_plan(
            b, block=True,
            lsblk=h.read(f"lsblk -nrpo NAME,TYPE,MOUNTPOINT {q(disk)}"),
            blkid=h.probe(f"blkid -p -o export {q(disk)}").stdout,
            wipefs=h.read(f"wipefs -n --noheadings -O TYPE,OFFSET {q(disk)}"),
            pv_vg=pvs.stdout.strip() if pvs.ok else None)
        if "pvcreate" in plan:
            h.sh(f"pvcreate {q(disk)}", message=f"{disk}: LVM physical volume")
        if "vgcreate" in plan:
            h.sh(f"vgcreate {q(vg)} {q(disk)}", message=f"volume group {vg} on {disk}")
    opt, size = b.lvcreate_size
    h.sh(f"lvcreate --wipesignatures y -y {opt} {q(size)} -n {q(b.volume)} {q(vg)}",
         message=f"backing device {b.device} ({size})")


# --- the kernel module -------------------------------------------------------------------


def module_version(proc_drbd: str) -> tuple[int, int, str] | None:
    """/proc/drbd's `version: 8.4.11 (api:1/...)` -> (8, 4, "8.4.11")."""
    m = VERSION_LINE.search(proc_drbd)
    return (int(m[2]), int(m[3]), m[1]) if m else None


def _module(h: HostSession) -> None:
    """The drbd module loaded, of the inventory's version, before any drbdadm call."""
    want = version(h.inv)
    if not h.probe("test -e /proc/drbd").ok:
        h.sh("modprobe drbd", message="drbd kernel module loaded")
        if h.run.check:
            return
    text = h.read("cat /proc/drbd")
    have = module_version(text)
    shown = have[2] if have else "unknown"
    if want == 8:
        if not have or have[:2] != (8, 4):
            raise HostFailed(f"mail.drbd_version is 8 but the loaded drbd module is version {shown} (/proc/drbd); "
                             "DRBD 8.4 is Debian's kernel module: remove drbd-dkms, or set mail.drbd_version: 9")
        h.ok(f"drbd module {shown}")
        return
    if have and have[0] == 9:
        h.ok(f"drbd module {shown}")
        return
    # The kernel's own 8.4 was loaded (drbd-utils' udev rule) before drbd-dkms was built.
    minors = re.findall(r"^ *\d+: cs:", text, re.M)
    refs = h.probe("cat /sys/module/drbd/refcnt").stdout.strip()
    if minors or refs not in ("", "0"):
        raise HostFailed(f"mail.drbd_version is 9 but the loaded drbd module is {shown} and in use "
                         "(/proc/drbd); stop what uses it, `rmmod drbd`, and run again")
    h.sh("rmmod drbd && modprobe drbd", message=f"drbd module {shown} replaced by LINBIT's DRBD 9 (drbd-dkms)")
    if h.run.check:
        return
    have = module_version(h.read("cat /proc/drbd"))
    if not have or have[0] != 9:
        raise HostFailed(f"drbd-dkms did not give a DRBD 9 module (loaded: "
                         f"{have[2] if have else 'none'}); check `dkms status drbd` and the "
                         "headers of the running kernel")


# --- DRBD 9: LINBIT's repository -----------------------------------------------------------


def header_packages(release: str) -> list[str]:
    """The headers DKMS builds drbd-dkms against: the running kernel's, and their
    meta package (6.1.0-57-amd64 -> linux-headers-amd64) for the next kernels."""
    pkgs = [f"linux-headers-{release}"]
    m = re.fullmatch(r"\d+\.\d+\.\d+-\d+-(.+)", release)
    if m:
        pkgs.append(f"linux-headers-{m[1]}")
    return pkgs


def _linbit(h: HostSession) -> None:
    """LINBIT's key and repository, the kernel headers, drbd-dkms and LINBIT's drbd-utils."""
    h.packages(["ca-certificates", "curl"])
    proxy = h.inv.site.apt_proxy
    via = f"--proxy {q(proxy)} " if proxy else ""
    tmp = f"{LINBIT_KEYRING}.hastack-new"
    changed = h.ensure(f"test -s {q(LINBIT_KEYRING)}",
                       f"install -d -m 0755 /etc/apt/keyrings && curl -fsSL --max-time 60 {via}-o {q(tmp)} "
                       f"{q(LINBIT_KEY_URL)} && mv -f {q(tmp)} {q(LINBIT_KEYRING)}",
                       f"LINBIT's signing key {LINBIT_KEYRING}")
    changed |= h.template("drbd/etc/apt/sources.list.d/linbit.list.j2", LINBIT_LIST, h.tier_vars(template_vars))
    if changed:
        h.apt_update()
    release = h.read("uname -r").strip()
    if not KERNEL_RELEASE.fullmatch(release):
        raise HostFailed(f"cannot tell the running kernel (`uname -r` said {release!r})")
    h.packages(header_packages(release))
    h.packages(["drbd-dkms", *PACKAGES])


# --- the steps ---------------------------------------------------------------------------


def preflight(run: Run) -> list[str]:
    """Checked before any host is touched (deploy.all asks every tier first): the
    node count, and all of the resource's nodes selected or none. Returns them."""
    inv = run.inv
    if inv.mail is None or inv.mail.storage != "drbd":
        return []
    check(inv)
    nodes = members(inv)
    selected = [h for h in nodes if h in run.hosts()]
    if selected and selected != nodes:
        raise UserError(f"drbd: the resource is converged on all its nodes at once; --hosts must name all of "
                        f"{', '.join(nodes)} or none of them")
    return selected


POSTFIX_IDS_PROBE = ("echo $(id -u postfix):$(id -g postfix):$(getent group postdrop | cut -d: -f3)")


def check_postfix_ids(ids: dict[str, str]) -> None:
    """postfix's queue moves between the nodes on the store: its owners must have
    the same uid/gids everywhere (Debian allocates them at install)."""
    if len(set(ids.values())) > 1:
        listed = "; ".join(f"{h}: {v or 'missing'}" for h, v in ids.items())
        raise UserError(f"drbd: postfix's queue is on the mail store, so the postfix uid:gid:postdrop gid must be "
                        f"the same on every back end, and they differ ({listed}); align them by hand "
                        "(usermod/groupmod, then chown the spool) before deploying")


def converge(run: Run) -> None:
    inv = run.inv
    if inv.mail is None or inv.mail.storage != "drbd":
        run.report.note("drbd: mail.storage is not drbd, nothing to do")
        return
    hosts = preflight(run)
    if not hosts:
        run.report.note("drbd: no node of the resource selected (--hosts), skipped")
        return
    ids: dict[str, str] = {}
    run.step("drbd: postfix's ids (its queue is on the store)", hosts,
             lambda h: ids.__setitem__(h.name, h.probe(POSTFIX_IDS_PROBE).stdout.strip()))
    check_postfix_ids(ids)  # before anything changes
    run.secret(SECRET)
    created: dict[str, bool] = {}
    run.step("drbd: packages, backing device, module, resource file, metadata, up", hosts,
             lambda h: _node(h, created))
    dstates: dict[str, str] = {}
    run.step("drbd: disk states", hosts,
             lambda h: dstates.__setitem__(h.name, h.probe(f"drbdadm dstate {R}").stdout.strip()))
    if initial_sync_wanted(created, dstates):
        run.step("drbd: initial sync and file system (brand-new resource)", hosts[:1], _initial)
    else:
        run.report.note("drbd: existing data, no initial sync or mkfs")


def _node(h: HostSession, created: dict) -> None:
    if version(h.inv) == 9:
        _linbit(h)
    else:
        h.packages(PACKAGES)
    _backing(h)
    _module(h)
    changed = h.template("drbd/etc/drbd.d/mail.res.j2", RES_FILE, h.tier_vars(template_vars), mode="0600",
                         validate="drbdadm -c {} dump all")
    role = h.probe(f"drbdadm role {R}")
    dump = h.probe(f"drbdadm dump-md {R} 2>&1 | tail -3")
    if is_new(role.exited, dump.stdout):
        lv = backing(h.inv).device
        found = blkid_signatures(h.probe(f"blkid -p -o export {q(lv)}").stdout)
        if found:
            raise HostFailed(f"{lv} has no DRBD metadata but holds {', '.join(found)}; refusing "
                             "create-md over it (nothing was changed)")
        h.sh(f"drbdadm create-md --force {R}", message=f"{RESOURCE}: metadata created (brand-new resource)")
        created[h.name] = True
    else:
        created[h.name] = False
        h.ok(f"{RESOURCE}: metadata exists")
    if role.ok:
        if changed:
            h.sh(f"drbdadm adjust {R}", message=f"{RESOURCE}: adjusted to the changed file")
        else:
            h.ok(f"{RESOURCE} is up ({role.stdout.strip()})")
    else:
        h.sh(f"drbdadm up {R}", message=f"{RESOURCE}: up")


def _initial(h: HostSession) -> None:
    """On the first node of a brand-new resource: every disk UpToDate (without a
    full sync when the nodes connect in time), a file system owned by the mail
    user, secondary again."""
    dev, user, mnt = q(DEVICE), q(MAIL_USER), q(MAIL_DIR)

    def states() -> tuple[str, str]:
        return (h.probe(f"drbdadm cstate {R}").stdout.strip(), h.probe(f"drbdadm dstate {R}").stdout.strip())

    try:
        poll(states, lambda s: ready_to_skip_sync(*s), timeout=CONNECT_TIMEOUT, interval=POLL_INTERVAL,
             what=f"{RESOURCE} Connected with every disk Inconsistent",
             describe=lambda s: f"cstate {s[0] or '?'}, dstate {s[1] or '?'}")
    except TimedOut as exc:
        h.note(f"{exc}; falling back to a full initial sync (primary --force)")
        h.sh(f"drbdadm primary --force {R}", message=f"{RESOURCE}: primary --force (full initial sync from here)")
    else:
        h.sh(f"drbdadm -- --clear-bitmap new-current-uuid {R}",
             message=f"{RESOURCE}: every disk UpToDate without a full sync (new-current-uuid --clear-bitmap)")
        h.sh(f"drbdadm primary {R}", message=f"{RESOURCE}: primary")
    if h.probe(f"blkid {dev}").ok:
        h.sh(f"drbdadm secondary {R}", message=f"{RESOURCE}: secondary again")
        raise HostFailed(f"{DEVICE} already holds a file system; refusing to mkfs")
    h.sh(f"mkfs.ext4 -q -L mail {dev}", message=f"mkfs.ext4 {DEVICE}")
    h.sh(f"id {user} >/dev/null 2>&1 || useradd --system --home-dir {mnt} --no-create-home "
         f"--shell /usr/sbin/nologin {user}", message=f"mail user {MAIL_USER}")
    spool, store_spool = q(topology.POSTFIX_SPOOL), q(topology.POSTFIX_SPOOL_ON_STORE)
    h.sh(f"mkdir -p {mnt} && mount {dev} {mnt} && chown {q(MAIL_USER + ':' + MAIL_USER)} {mnt} "
         f"&& chmod 0770 {mnt} && mkdir {store_spool} && cp -a {spool}/. {store_spool}/ && umount {mnt}",
         message=f"{MAIL_DIR} owned by {MAIL_USER}, postfix's queue copied to {topology.POSTFIX_SPOOL_ON_STORE}")
    h.sh(f"drbdadm secondary {R}", message=f"{RESOURCE}: secondary (Pacemaker promotes it)")


@runbook(default=True)
def deploy(run):
    """Converge the DRBD resource under the mail store (only with mail.storage: drbd)."""
    converge(run)


ns = Collection("drbd", deploy)
