"""DRBD tier (mail back ends): the replicated block device under the mail store.

Only with `mail.storage: drbd`; with `none` (the container lab: no kernel
module) it does nothing. `mail.drbd_version: 8` is Debian's kernel DRBD 8.4,
two nodes per resource (the first two mail back ends); `9` is LINBIT's DRBD 9
with the seed's mesh over every back end (node-ids, connection-mesh, quorum).

Runbook:
1. drbd-utils; /etc/drbd.d/mail.res from configs/drbd/etc/drbd.d/mail.res.j2,
   checked with `drbdadm -c FILE dump` before it replaces the old one (a
   changed file on a running resource is applied with `drbdadm adjust`).
2. Metadata only on a brand-new resource: `drbdadm dump-md` answering "No
   valid meta data found" on a resource that is not up. Existing metadata or
   a running resource is never touched (no create-md, never a mkfs).
3. `drbdadm up` where the resource is not up yet (Pacemaker's DrbdData takes
   over from there).
4. Initial sync, once: only when every node's metadata was created in this
   run and every disk is Inconsistent: `primary --force` on the first node,
   mkfs.ext4, the mountpoint owned by the mail user, then secondary again.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from invoke import Collection

from .core import HostFailed, UserError, q, runbook, topology

if TYPE_CHECKING:
    from .core import HostSession, Run
    from .core.inventory import Inventory

ROLE = topology.MAIL_BACKEND
RESOURCE = topology.DRBD_RESOURCE  # the cluster tier's DrbdData manages it by this name
RES_FILE = f"/etc/drbd.d/{RESOURCE}.res"
DEVICE = topology.DRBD_DEVICE
MINOR = 0
DISK = "/dev/vg0/mail"  # the backing device on every back end (LVM volume by default)
PORT = 7789
MAIL_DIR = topology.MAIL_STORE
MAIL_USER = topology.VMAIL_USER
SECRET = "drbd_mail_secret"
R = q(RESOURCE)


def version(inv: Inventory) -> int:
    return inv.mail.drbd_version if inv.mail else 8


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
        "drbd_disk": DISK,
        "drbd_port": PORT,
        "drbd_secret": secret(SECRET),
        "drbd_nodes": [{"name": n, "address": topology.ring_address(inv, n)} for n in members(inv)]
        if inv.mail and inv.with_role(ROLE) else [{"name": host, "address": inv.management_address(host)}],
    }


def is_new(role_rc: int, dump_md_out: str) -> bool:
    """Brand new: not up (`drbdadm role` fails) and `drbdadm dump-md` finds no metadata."""
    return role_rc != 0 and "No valid meta data found" in dump_md_out


def initial_sync_wanted(created: dict[str, bool], dstates: dict[str, str]) -> bool:
    """primary --force and mkfs only when every node's metadata is new from this
    run and no disk is UpToDate anywhere (nothing to lose)."""
    return bool(created) and all(created.values()) and all(
        s and "UpToDate" not in s for s in dstates.values())


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


def converge(run: Run) -> None:
    inv = run.inv
    if inv.mail is None or inv.mail.storage != "drbd":
        run.report.note("drbd: mail.storage is not drbd, nothing to do")
        return
    hosts = preflight(run)
    if not hosts:
        run.report.note("drbd: no node of the resource selected (--hosts), skipped")
        return
    run.secret(SECRET)
    created: dict[str, bool] = {}
    run.step("drbd: resource file, metadata, up", hosts, lambda h: _node(h, created))
    dstates: dict[str, str] = {}
    run.step("drbd: disk states", hosts,
             lambda h: dstates.__setitem__(h.name, h.probe(f"drbdadm dstate {R}").stdout.strip()))
    if initial_sync_wanted(created, dstates):
        run.step("drbd: initial sync and file system (brand-new resource)", hosts[:1], _initial)
    else:
        run.report.note("drbd: existing data, no initial sync or mkfs")


def _node(h: HostSession, created: dict) -> None:
    h.packages(["drbd-utils"])
    changed = h.template("drbd/etc/drbd.d/mail.res.j2", RES_FILE, h.tier_vars(template_vars), mode="0600",
                         validate="drbdadm -c {} dump all")
    role = h.probe(f"drbdadm role {R}")
    dump = h.probe(f"drbdadm dump-md {R} 2>&1 | tail -3")
    if is_new(role.exited, dump.stdout):
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
    dev, user, mnt = q(DEVICE), q(MAIL_USER), q(MAIL_DIR)
    if h.probe(f"blkid {dev}").ok:
        raise HostFailed(f"{DEVICE} already holds a file system; refusing to mkfs")
    h.sh(f"drbdadm primary --force {R}", message=f"{RESOURCE}: primary --force (initial sync source)")
    h.sh(f"mkfs.ext4 -q -L mail {dev}", message=f"mkfs.ext4 {DEVICE}")
    h.sh(f"id {user} >/dev/null 2>&1 || useradd --system --home-dir {mnt} --no-create-home "
         f"--shell /usr/sbin/nologin {user}", message=f"mail user {MAIL_USER}")
    h.sh(f"mkdir -p {mnt} && mount {dev} {mnt} && chown {q(MAIL_USER + ':' + MAIL_USER)} {mnt} "
         f"&& chmod 0770 {mnt} && umount {mnt}", message=f"{MAIL_DIR} owned by {MAIL_USER}")
    h.sh(f"drbdadm secondary {R}", message=f"{RESOURCE}: secondary (Pacemaker promotes it)")


@runbook(default=True)
def deploy(run):
    """Converge the DRBD resource under the mail store (only with mail.storage: drbd)."""
    converge(run)


ns = Collection("drbd", deploy)
