"""WAL archive tier (XMPP service): every WAL segment of the PostgreSQL primary and
its base backups kept on the backup host, so that a server can be rebuilt to any
point in time (`inv postgres.restore`).

Two modes (inventory `backup.wal_archive`); the lab runs pgbackrest.

pgbackrest (runs without kernel modules):
1. The PostgreSQL hosts and the backup host: Debian's pgbackrest;
   /etc/pgbackrest/pgbackrest.conf; hastack-pgbackrest.service, pgBackRest's
   TLS server (port 8432) on the host's service address with the host's
   certificate from the site's CA. A server accepts only the certificate CNs
   of its peers, for the stanza only (tls-server-auth): the PostgreSQL hosts
   accept the backup host; the backup host accepts the PostgreSQL hosts and
   the spares (restore targets).
2. The backup host: the user pgbackrest (group ssl-cert, for the host key),
   the repository in backup.wal_archive_dir (0750), the stanza created when it
   is missing, a first full backup when there is none; timers for the full and
   differential base backups (backup.base_backup_full / _diff, systemd
   OnCalendar) with retention backup.base_backups_kept full backups.
3. The primary: once the stanza is new, `pgbackrest check` (a WAL switch
   archived end to end). The postgres tier's archive hook runs
   `pgbackrest archive-push`: a segment the repository did not take stays in
   pg_wal and PostgreSQL tries again (pg_stat_archiver counts the failures).

nfs (the seed's; needs the nfsd kernel module on the backup host):
1. The backup host: nfs-kernel-server, one export per PostgreSQL host
   (backup.wal_archive_dir/<host>, rw, root_squash, to exactly that host's
   address), owned by the postgres uid/gid of the PostgreSQL hosts.
2. The PostgreSQL hosts: nfs-common, the export automounted on
   /var/lib/postgresql/walarchive (x-systemd.automount); the archive hook
   copies each segment there (never over a different one), the timer
   hastack-pg-basebackup takes base backups there (pg_basebackup -Ft) and
   keeps backup.base_backups_kept of them.

`inv postgres.backup` takes a base backup now; `inv postgres.restore --on HOST
--to TIME` restores one onto a host (default: the spare) up to TIME.
"""

from __future__ import annotations

import datetime as dt
import json
import re
import zoneinfo
from typing import TYPE_CHECKING

from invoke import Collection

from .core import HostFailed, UserError, q, runbook, topology
from .core.sql import psql_c

if TYPE_CHECKING:
    from .core import HostSession, Run
    from .core.inventory import Inventory

STANZA = topology.PG_STANZA
PACKAGES = ["pgbackrest"]
CONF = "/etc/pgbackrest/pgbackrest.conf"
SERVER_UNIT = "hastack-pgbackrest"
SERVER_SERVICE = f"/etc/systemd/system/{SERVER_UNIT}.service"
BACKUP_SERVICE = "/etc/systemd/system/hastack-pgbackrest-backup@.service"
BACKUP_SCRIPT = "/usr/local/lib/hastack/pgbackrest-backup"
TIMERS = {"full": "hastack-pgbackrest-backup-full", "diff": "hastack-pgbackrest-backup-diff"}
REPO_USER = "pgbackrest"
LOG_DIR = "/var/log/pgbackrest"
TLS_PORT = 8432
PGBACKREST_TLS = "pgBackRest's TLS reads the host key"
PG_DATA = f"/var/lib/postgresql/{topology.PG_VERSION}/main"
PG_UNIT = f"postgresql@{topology.PG_VERSION}-main"
TEXTFILE = "/var/lib/prometheus/node-exporter/hastack_backup_pgbackrest.prom"
BACKUP_TYPES = ("full", "diff", "incr")
# NFS mode
NFS_EXPORTS = "/etc/exports.d/hastack-walarchive.exports"
BASEBACKUP_UNIT = "hastack-pg-basebackup"


# --- what the inventory says ----------------------------------------------------------------


def restore_targets(inv: Inventory) -> list[str]:
    """Hosts a point-in-time restore may land on: the PostgreSQL hosts and the spares."""
    return topology.pg_hosts(inv) + [h for h in inv.with_role(topology.SPARE) if h not in topology.pg_hosts(inv)]


def conf_vars(inv: Inventory, host: str, secret) -> dict:
    bk = topology.backup_host(inv)
    cert, key = topology.cert_path(host), topology.key_path(host)
    repo = host == bk
    if repo:
        auth = [inv.fqdn(h) for h in restore_targets(inv)]
        # By name (/etc/hosts: the service address): pgBackRest 2.45 matches a
        # certificate's DNS names only, not its IP addresses.
        pg = [{"address": inv.fqdn(h), "name": h} for h in topology.pg_hosts(inv)]
        user = REPO_USER
    else:
        auth = [inv.fqdn(bk)] if bk else []
        pg = [{"address": "", "name": host}]
        user = "postgres"
    return {
        "repo": repo,
        "stanza": STANZA,
        "repo_path": inv.backup.wal_archive_dir,
        "repo_address": inv.fqdn(bk) if bk and not repo else "",
        "retention_full": inv.backup.base_backups_kept,
        "tls_address": inv.service_address(host),
        "tls_port": TLS_PORT,
        "tls_auth": auth,
        "ca": topology.CA_FILE,
        "cert": cert,
        "key": key,
        "pg": pg,
        "pg_data": PG_DATA,
        "log_dir": LOG_DIR,
        "user": user,
        "conf": CONF,
        "server_unit": SERVER_UNIT,
        "backup_script": BACKUP_SCRIPT,
        "textfile": TEXTFILE,
        "timers": TIMERS,
        "full_calendar": inv.backup.base_backup_full,
        "diff_calendar": inv.backup.base_backup_diff,
    }


def restore_target_time(inv: Inventory, text: str, now: dt.datetime | None = None) -> dt.datetime:
    """``--to`` as an aware datetime: ISO 8601 ('2026-12-01 10:15:00', with or without
    an offset; without one it is the site's time zone). A time to come is refused."""
    value = (text or "").strip()
    try:
        when = dt.datetime.fromisoformat(value)
    except ValueError:
        raise UserError(f"--to {text!r}: not a time; give 'YYYY-MM-DD HH:MM:SS' (the site's time zone, "
                        f"{inv.site.timezone}) or with an offset, '2026-12-01 10:15:00+00:00'; nothing was changed")
    if when.tzinfo is None:
        when = when.replace(tzinfo=zoneinfo.ZoneInfo(inv.site.timezone))
    now = now or dt.datetime.now(dt.timezone.utc)
    if when > now:
        raise UserError(f"--to {text!r} is in the future ({now:%Y-%m-%d %H:%M:%S} UTC now): no WAL reaches it yet; "
                        "nothing was changed")
    return when


def check_after_oldest(when: dt.datetime, backups: list[dict], text: str) -> dict:
    """The newest base backup that ended before ``when`` (pgbackrest info's backup
    entries); a UserError when ``when`` is before every one of them."""
    done = sorted((b for b in backups if b.get("timestamp", {}).get("stop")), key=lambda b: b["timestamp"]["stop"])
    if not done:
        raise UserError("the WAL archive has no base backup yet (`inv postgres.backup` takes one); "
                        "nothing was changed")
    before = [b for b in done if b["timestamp"]["stop"] <= when.timestamp()]
    if not before:
        oldest = dt.datetime.fromtimestamp(done[0]["timestamp"]["stop"], dt.timezone.utc)
        raise UserError(f"--to {text!r} is before the oldest base backup (it ended {oldest:%Y-%m-%d %H:%M:%S} UTC): "
                        "the archive cannot reach that time; nothing was changed")
    return before[-1]


# --- the runbook ------------------------------------------------------------------------------


def converge(run: Run) -> None:
    mode = topology.wal_archive(run.inv)
    if mode is None:
        run.report.note("walarchive: no backup host or no PostgreSQL host in the inventory; archive_mode is off")
        return
    if mode == "nfs":
        _converge_nfs(run)
        return
    bk = topology.backup_host(run.inv)
    pg = topology.pg_hosts(run.inv)
    run.step("walarchive: pgBackRest on the backup host", [bk], _repo_host)
    run.step("walarchive: pgBackRest on the PostgreSQL hosts", pg, _pg_host)
    run.step("walarchive: the stanza and the first full backup", [bk], _stanza)


def _config(h: HostSession, tvars: dict) -> bool:
    """The package, its configuration and its log folder; whether the configuration changed."""
    h.packages(PACKAGES)
    h.directory("/etc/pgbackrest", mode="0755")
    changed = h.template("walarchive/etc/pgbackrest/pgbackrest.conf.j2", CONF, tvars, group=tvars["user"],
                         mode="0640")
    h.directory(LOG_DIR, owner=tvars["user"], group=tvars["user"], mode="0750")
    return changed


def _files(h: HostSession, tvars: dict) -> bool:
    """The configuration and the TLS server's unit; whether the server must restart."""
    changed = _config(h, tvars)
    unit = h.template(f"walarchive{SERVER_SERVICE}.j2", SERVER_SERVICE, tvars)
    if unit and not h.run.check:
        h.sh("systemctl daemon-reload", message="systemctl daemon-reload (pgBackRest's TLS server)")
    return changed or unit


def _repo_host(h: HostSession) -> None:
    tvars = h.tier_vars(template_vars)
    h.ensure(f"id -u {REPO_USER} >/dev/null 2>&1",
             f"useradd --system --home-dir /var/lib/{REPO_USER} --create-home --shell /usr/sbin/nologin "
             f"--groups ssl-cert {REPO_USER}", f"user {REPO_USER} (group ssl-cert: the host key)")
    topology.key_reader(h, REPO_USER, PGBACKREST_TLS)
    h.directory(tvars["repo_path"], owner=REPO_USER, group=REPO_USER, mode="0750")
    restart = _files(h, tvars)
    h.directory("/usr/local/lib/hastack", mode="0755")
    h.template(f"walarchive{BACKUP_SCRIPT}.j2", BACKUP_SCRIPT, tvars, mode="0755", validate="sh -n {}")
    units = h.template(f"walarchive{BACKUP_SERVICE}.j2", BACKUP_SERVICE, tvars)
    for kind, timer in TIMERS.items():
        path = f"/etc/systemd/system/{timer}.timer"
        calendar = tvars[f"{kind}_calendar"]
        units |= h.template(f"walarchive{path}.j2", path, tvars,
                            validate=f"systemd-analyze calendar {q(calendar)} >/dev/null")
    if units and not h.run.check:
        h.sh("systemctl daemon-reload", message="systemctl daemon-reload (base backup timers)")
    h.service(SERVER_UNIT, restart=restart and not h.run.check)
    for timer in TIMERS.values():
        h.service(f"{timer}.timer")


def _pg_host(h: HostSession) -> None:
    tvars = h.tier_vars(template_vars)
    topology.key_reader(h, "postgres", PGBACKREST_TLS)
    restart = _files(h, tvars)
    h.service(SERVER_UNIT, restart=restart and not h.run.check)


def _info(h: HostSession) -> dict:
    """`pgbackrest info` of the stanza as JSON (runs on the backup host as its user)."""
    r = h.probe(f"runuser -u {REPO_USER} -- pgbackrest --stanza={STANZA} --output=json info")
    try:
        data = json.loads(r.stdout or "[]")
    except ValueError:
        raise HostFailed(f"pgbackrest info: not JSON: {(r.stderr or r.stdout).strip()[:300]}")
    return data[0] if data else {}


def _stanza(h: HostSession) -> None:
    prim = topology.pg_primary(h.inv)
    h.wait_for(f"timeout 5 bash -c '</dev/tcp/{topology.reach_address(h.inv, h.name, prim)}/{TLS_PORT}'",
               timeout=30, what=f"pgBackRest's TLS server on {prim}")
    info = _info(h)
    status = info.get("status", {})
    if status.get("code") in (1, None) and "missing stanza" in status.get("message", "missing stanza"):
        h.sh(f"runuser -u {REPO_USER} -- pgbackrest --stanza={STANZA} stanza-create",
             message=f"stanza {STANZA} created in {h.inv.backup.wal_archive_dir}")
        info = {}
    if h.run.check:
        h.ok(f"stanza {STANZA}: {status.get('message', '?')}")
        return
    if not info.get("backup"):
        # A new archive: a WAL switch archived end to end, then the first full backup.
        h.sh(f"runuser -u {REPO_USER} -- pgbackrest --stanza={STANZA} check",
             message=f"pgbackrest check: a WAL segment of {prim} archived end to end", timeout=300)
        h.sh(f"systemctl start {q('hastack-pgbackrest-backup@full.service')}",
             message=f"first full base backup of {prim}", timeout=1800)
        info = _info(h)
    backups = info.get("backup", [])
    newest = backups[-1] if backups else {}
    h.ok(f"stanza {STANZA}: {len(backups)} base backup(s), newest {newest.get('label', '-')}; "
         f"WAL {info.get('archive', [{}])[0].get('min', '?')} .. {info.get('archive', [{}])[0].get('max', '?')}")


# --- nfs mode ------------------------------------------------------------------------------------


def nfs_vars(inv: Inventory, host: str, secret) -> dict:
    bk = topology.backup_host(inv)
    exports = [{"dir": f"{inv.backup.wal_archive_dir}/{h}", "client": topology.reach_address(inv, bk, h), "host": h}
               for h in topology.pg_hosts(inv)]
    return {
        "exports": exports,
        "export_root": inv.backup.wal_archive_dir,
        "mount": topology.WAL_MOUNT,
        "server": topology.reach_address(inv, host, bk) if bk and host != bk else "",
        "source": f"{inv.backup.wal_archive_dir}/{host}",
        "kept": inv.backup.base_backups_kept,
        "full_calendar": inv.backup.base_backup_full,
        "pg_unit": PG_UNIT,
    }


def template_vars(inv: Inventory, host: str, secret) -> dict:
    """Every template's variables (both modes)."""
    return {**conf_vars(inv, host, secret), **nfs_vars(inv, host, secret)}


def fstab_line(inv: Inventory, host: str) -> str:
    v = nfs_vars(inv, host, None)
    return (f"{v['server']}:{v['source']} {v['mount']} nfs4 "
            "rw,noauto,x-systemd.automount,x-systemd.idle-timeout=600,_netdev,hard,timeo=100 0 0")


def _converge_nfs(run: Run) -> None:
    bk = topology.backup_host(run.inv)
    run.step("walarchive: NFS exports on the backup host", [bk], _nfs_server)
    run.step("walarchive: the automounted archive on the PostgreSQL hosts", topology.pg_hosts(run.inv), _nfs_client)


def _nfs_server(h: HostSession) -> None:
    tvars = h.tier_vars(template_vars)
    h.packages(["nfs-kernel-server"])
    for export in tvars["exports"]:
        # root_squash: each folder belongs to the uid/gid of postgres on its client
        # (the postgres tier made that user there), the only one that writes in it.
        ids = h.run.memo(("postgres ids", export["host"]), lambda host=export["host"]: _postgres_ids(h.run, host))
        h.directory(export["dir"], mode="0700")
        h.ensure(f"test \"$(stat -c %u:%g {q(export['dir'])})\" = {q(ids)}", f"chown {q(ids)} {q(export['dir'])}",
                 f"{export['dir']} owned by postgres of {export['host']} ({ids})")
    h.directory("/etc/exports.d", mode="0755")
    if h.template(f"walarchive{NFS_EXPORTS}.j2", NFS_EXPORTS, tvars) and not h.run.check:
        h.sh("exportfs -ra", message="exportfs -ra (the WAL archive exports)")
    h.service("nfs-server")


def _postgres_ids(run: Run, host: str) -> str:
    """uid:gid of postgres on ``host``."""
    ids = run.session(host).read("echo $(id -u postgres):$(id -g postgres)").strip()
    if not re.fullmatch(r"\d+:\d+", ids):
        raise HostFailed(f"{host}: no user postgres ({ids!r}); the postgres tier runs before the WAL archive")
    return ids


def _nfs_client(h: HostSession) -> None:
    tvars = h.tier_vars(template_vars)
    h.packages(["nfs-common"])
    line = fstab_line(h.inv, h.name)
    h.ensure(f"grep -qxF {q(line)} /etc/fstab",
             f"sed -i '\\# {topology.WAL_MOUNT} #d' /etc/fstab && printf '%s\\n' {q(line)} >> /etc/fstab "
             "&& systemctl daemon-reload",
             f"/etc/fstab: {topology.WAL_MOUNT} automounted from the backup host")
    for path in (f"/etc/systemd/system/{BASEBACKUP_UNIT}.service", f"/etc/systemd/system/{BASEBACKUP_UNIT}.timer"):
        h.template(f"walarchive{path}.j2", path, tvars)
    h.service(f"{BASEBACKUP_UNIT}.timer")


# --- tasks -------------------------------------------------------------------------------------


def _require_pgbackrest(inv: Inventory, what: str) -> str:
    mode = topology.wal_archive(inv)
    if mode is None:
        raise UserError(f"{inv.path}: {what} needs a host with role backup and PostgreSQL hosts; nothing was changed")
    if mode != "pgbackrest":
        raise UserError(f"{inv.path}: {what} works with backup.wal_archive: pgbackrest (this inventory: {mode}; "
                        "restore NFS base backups with pg_basebackup's tar files, see the README); nothing was changed")
    return topology.backup_host(inv)


@runbook(help={"type": "full, diff (changes since the last full) or incr (since the last backup); default full"})
def backup(run, type="full"):
    """Take a base backup of the PostgreSQL primary into the WAL archive now."""
    if type not in BACKUP_TYPES:
        raise UserError(f"--type {type!r}: give one of {', '.join(BACKUP_TYPES)}; nothing was changed")
    bk = _require_pgbackrest(run.inv, "postgres.backup")

    def one(h: HostSession) -> None:
        h.sh(f"systemctl start {q(f'hastack-pgbackrest-backup@{type}.service')}",
             message=f"{type} base backup of {topology.pg_primary(h.inv)}", timeout=3600)
        info = _info(h)
        newest = (info.get("backup") or [{}])[-1]
        size = newest.get("info", {}).get("repository", {}).get("delta", 0)
        h.ok(f"backup {newest.get('label', '?')} ({newest.get('type', '?')}): {size} bytes in the repository")

    run.on_one("postgres: base backup", run.answering([bk], what="backup host"), one)


RESTORE_HELP = {
    "on": "the host to restore onto (default: the first spare); never the primary",
    "to": "the time to stop at: 'YYYY-MM-DD HH:MM:SS' (site time zone) or with an offset",
    "force": "wipe a data directory that holds a PostgreSQL cluster (it is stopped first)",
}


@runbook(help=RESTORE_HELP)
def restore(run, to, on=None, force=False):
    """Restore the PostgreSQL cluster onto a host as it was at a point in time (base backup + WAL)."""
    inv = run.inv
    bk = _require_pgbackrest(inv, "postgres.restore")
    spares = inv.with_role(topology.SPARE)
    host = on or (spares[0] if spares else None)
    if host is None:
        raise UserError(f"{inv.path}: no host with role spare; name the target with --on HOST; nothing was changed")
    if host not in restore_targets(inv):
        raise UserError(f"--on {host!r}: restore onto a PostgreSQL host or a spare of {inv.path} "
                        f"({', '.join(restore_targets(inv))}); nothing was changed")
    when = restore_target_time(inv, to)
    target = when.astimezone(dt.timezone.utc).strftime("%Y-%m-%d %H:%M:%S+00")
    run.connect([bk, host])
    bk_h = run.session(bk)
    # Everything is checked before anything changes: the archive reaches the time,
    # the target is not a running primary, its data directory is ours to replace.
    h = run.session(host)
    state = h.probe(f"test -e {PG_DATA}/PG_VERSION && echo cluster; "
                    f"systemctl is-active {PG_UNIT} 2>/dev/null; "
                    + psql_c("SELECT pg_is_in_recovery()") + " 2>/dev/null || true")
    words = state.stdout.split()
    running_primary = "cluster" in words and "active" in words and "f" in words
    if host == topology.pg_primary(inv) or (running_primary and not force):
        raise UserError(f"{host} " + ("is the inventory's primary" if host == topology.pg_primary(inv)
                                      else "runs a PostgreSQL primary")
                        + ": a restore would overwrite it. Restore onto the spare or a stopped host"
                        + ("" if host == topology.pg_primary(inv) else " (or --force)") + "; nothing was changed")
    if "cluster" in words and not force:
        raise UserError(f"{host}: {PG_DATA} holds a PostgreSQL cluster; --force replaces it (it is stopped first); "
                        "nothing was changed")
    base = check_after_oldest(when, _info(bk_h).get("backup", []), to)
    run.report.note(f"restore: base backup {base['label']} + WAL up to {target} onto {host}")

    def restore_one(h: HostSession) -> None:
        tvars = template_vars(inv, host, run.secret)
        h.packages(["postgresql", "postgresql-client"] + PACKAGES)  # one install
        topology.key_reader(h, "postgres", PGBACKREST_TLS)
        _config(h, tvars)  # a restore target is a client of the repository: no TLS server of its own
        h.sh(f"systemctl stop {PG_UNIT}; find {PG_DATA} -mindepth 1 -delete; "
             f"install -d -o postgres -g postgres -m 0700 {PG_DATA}", message=f"{PG_UNIT} stopped, {PG_DATA} emptied")
        h.sh(f"runuser -u postgres -- pgbackrest --stanza={STANZA} --type=time --target={q(target)} "
             f"--target-action=promote --set={q(base['label'])} restore",
             message=f"pgbackrest restore: {base['label']} + WAL to {target}", timeout=3600)
        h.sh(f"systemctl start {PG_UNIT}", message=f"{PG_UNIT} started: recovery to {target}")
        h.wait_for(psql_c("SELECT pg_is_in_recovery()") + " | grep -qx f", timeout=600,
                   what=f"{host}: recovery to {target} finished and promoted")
        h.changed(f"{host}: the cluster as it was at {target}, open read-write (not a member of the XMPP service)")

    run.step("postgres: point-in-time restore", [host], restore_one)


ns = Collection("walarchive")


@runbook(default=True)
def deploy(run):
    """Converge the WAL archive and base backups of the PostgreSQL hosts on the backup host."""
    converge(run)


ns.add_task(deploy)
