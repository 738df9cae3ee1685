"""PostgreSQL tier (XMPP service): a primary and streaming replicas, Debian 12's
PostgreSQL 15.

Runbook:
1. Every postgres host (roles postgres_primary, postgres_replica): the
   `postgresql` package; /etc/postgresql/15/main/conf.d/hastack.conf
   (listen only on localhost and the host's own service address, WAL for
   streaming replication, the WAL-archive hook) checked with `postgres -C`;
   pg_hba.conf with scram-sha-256 for exactly the ejabberd nodes (database
   ejabberd) and the other postgres hosts (replication), checked through
   pg_hba_file_rules; the archive hook script. Restart on a server setting,
   reload on an hba change.
2. The primary: the roles `ejabberd` (owner of database `ejabberd`) and
   `replicator` (REPLICATION), their passwords generated into the site's
   secrets and sent as SCRAM verifiers computed here (the clear password never
   reaches the server); a physical replication slot per replica.
3. Each replica: when it is already a standby (pg_is_in_recovery) it is left
   alone: never a second base backup. A fresh cluster (only the default
   databases) is replaced by `pg_basebackup -S <slot>` from the primary, then
   standby.signal (primary_conninfo is in conf.d).
   A host that is a primary with data of its own is refused (that is a former
   primary: `inv postgres.rejoin` rewinds it).

Every postgres host also gets (for the rescue tasks, fabfile/rescue.py):
- wal_log_hints, a rewind role (EXECUTE on the four functions pg_rewind calls,
  pg_hba: database postgres from the other postgres hosts) and its password in
  .pgpass, so a former primary rejoins with pg_rewind;
- primary_conninfo/primary_slot_name in conf.d (a replica streams from the
  inventory's primary over its own slot; base backups are taken without -R);
- a start guard (ExecStartPre drop-in): a host about to start as a primary
  while a peer of the same cluster is on a newer timeline starts read-only;
- with postgres.synchronous: synchronous_standby_names = ANY 1 (replicas) on
  the primary, and the sync guard (hastack-pg-syncguard) that turns it off
  while no standby streams (postgres.synchronous_timeout) and on again.
A changed setting is reloaded; the server restarts only when one of them needs
it (pg_settings.pending_restart).

`inv postgres.status` prints each node's role, replication state and lag.
`inv postgres.promote` and `inv postgres.rejoin`: see fabfile/rescue.py.
The WAL archive: archive_command ships each segment to the backup host
(`pgbackrest archive-push`, or in nfs mode /usr/local/lib/hastack/pg-wal-archive
onto the automounted export; fabfile/walarchive.py configures both) and fails
while it cannot, so PostgreSQL keeps the segment; archive_mode is off when the
inventory has no backup host.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from invoke import Collection

from .core import HostFailed, UserError, q, runbook, topology
from .core.sql import ensure_role, pg_ident, pg_literal, psql, psql_c

if TYPE_CHECKING:
    from .core import HostSession, Run
    from .core.inventory import Inventory

VERSION = topology.PG_VERSION
CLUSTER = "main"
UNIT = f"postgresql@{VERSION}-{CLUSTER}"
ETC = f"/etc/postgresql/{VERSION}/{CLUSTER}"
DATA = f"/var/lib/postgresql/{VERSION}/{CLUSTER}"
BIN = f"/usr/lib/postgresql/{VERSION}/bin"
CONF_FILE = f"{ETC}/conf.d/hastack.conf"
HBA_FILE = f"{ETC}/pg_hba.conf"
PGPASS = "/var/lib/postgresql/.pgpass"
ARCHIVE_HOOK = "/usr/local/lib/hastack/pg-wal-archive"
START_GUARD = "/usr/local/lib/hastack/pg-start-guard"
GUARD_DROPIN = f"/etc/systemd/system/{UNIT}.service.d/hastack-start-guard.conf"
SYNC_GUARD = "/usr/local/lib/hastack/pg-syncguard"
SYNC_GUARD_UNIT = "hastack-pg-syncguard"
SYNC_GUARD_SERVICE = f"/etc/systemd/system/{SYNC_GUARD_UNIT}.service"
ASYNC_FILE = f"{ETC}/conf.d/zz-hastack-async.conf"  # written by the sync guard, never by a deploy
STANDBY_SIGNAL = f"{DATA}/standby.signal"
PACKAGES = ["postgresql", "postgresql-client"]

DB = topology.XMPP_DB  # the database ejabberd uses, and its owner role
DB_USER = topology.XMPP_DB_USER
REPL_USER = "replicator"
REWIND_USER = "rewind"  # what pg_rewind logs in as (postgres.rejoin): the four functions it needs
SECRET_REWIND = "postgres_rewind_password"
REWIND_FUNCTIONS = ("pg_ls_dir(text, boolean, boolean)", "pg_stat_file(text, boolean)",
                    "pg_read_binary_file(text)", "pg_read_binary_file(text, bigint, bigint, boolean)")
SECRET_DB = topology.XMPP_DB_SECRET
SECRET_REPL = "postgres_replication_password"
PRIMARY_ROLE = topology.PG_PRIMARY
REPLICA_ROLE = topology.PG_REPLICA
DEFAULT_DATABASES = {"postgres", "template0", "template1"}


# --- what the inventory says ----------------------------------------------------


def require_replica(inv: Inventory, host: str) -> str:
    """``host`` when it is a replica of the inventory; a UserError otherwise."""
    replicas = topology.pg_replicas(inv)
    if host not in inv.hosts:
        raise UserError(f"{inv.path}: {host!r} is not a host of the inventory "
                        f"(replicas: {', '.join(replicas) or 'none'}); nothing was changed")
    if host not in replicas:
        roles = ", ".join(inv.hosts[host].roles) or "no roles"
        raise UserError(f"{inv.path}: {host} has {roles}, not role {REPLICA_ROLE}; refusing to make it a "
                        f"replica (replicas: {', '.join(replicas) or 'none'}); nothing was changed")
    return host


def hba_entries(inv: Inventory, host: str) -> list[dict]:
    """The network lines of pg_hba.conf: the ejabberd nodes to the ejabberd
    database, every other postgres host to replication and (as the rewind role,
    for pg_rewind) to the database postgres; one /32 each."""
    rows = []
    # By the address each host connects from (topology: a shared network, else across the gateway).
    for node in topology.ejabberd_nodes(inv):
        for address in inv.peer_addresses(node, host):
            rows.append({"database": DB, "user": DB_USER, "address": address, "why": f"ejabberd node {node}"})
    for node in topology.pg_hosts(inv):
        if node != host:
            for address in inv.peer_addresses(node, host):
                rows.append({"database": "replication", "user": REPL_USER, "address": address,
                             "why": f"streaming replication to {node}"})
                rows.append({"database": "postgres", "user": REWIND_USER, "address": address,
                             "why": f"pg_rewind of {node} from here"})
    return rows


def listen_addresses(inv: Inventory, host: str) -> list[str]:
    """localhost and the host's own service address: never '*' or 0.0.0.0."""
    return ["localhost", inv.service_address(host)]


def primary_conninfo(inv: Inventory, host: str) -> str:
    """A replica's connection to the primary (its own slot and name come from the
    other settings); empty on the primary."""
    prim = inv.with_role(PRIMARY_ROLE)
    if not prim or prim[0] == host:
        return ""
    return (f"host={inv.service_address(prim[0])} port={topology.PG_PORT} user={REPL_USER} "
            f"passfile={PGPASS} application_name={host}")


def synchronous_standbys(inv: Inventory, host: str) -> list[str]:
    """The standbys a commit on the primary ``host`` waits for (ANY 1 of them) when
    postgres.synchronous is on: the replicas, by name (their application_name)."""
    if not inv.postgres.synchronous or PRIMARY_ROLE not in inv.hosts[host].roles:
        return []
    return [f'"{r}"' for r in topology.pg_replicas(inv)]


def archive_command(inv: Inventory) -> str:
    """PostgreSQL's archive_command for backup.wal_archive ('' without an archive)."""
    mode = topology.wal_archive(inv)
    if mode == "pgbackrest":  # `pgbackrest check` wants its own command there
        return f"pgbackrest --stanza={topology.PG_STANZA} archive-push %p"
    return f"{ARCHIVE_HOOK} %p %f" if mode == "nfs" else ""


def template_vars(inv: Inventory, host: str, secret) -> dict:
    prim = inv.with_role(PRIMARY_ROLE)
    return {
        "pg_data": DATA,
        "pg_bin": BIN,
        "pg_etc": ETC,
        "pg_unit": UNIT,
        "pgpass": PGPASS,
        "pg_slot": topology.slot_name(host),
        "pg_primary_conninfo": primary_conninfo(inv, host),
        "pg_synchronous_standbys": synchronous_standbys(inv, host),
        "pg_synchronous_timeout": inv.postgres.synchronous_timeout,
        "pg_async_file": ASYNC_FILE,
        "pg_start_guard": START_GUARD,
        "pg_sync_guard": SYNC_GUARD,
        "pg_peers": [inv.service_address(n) for n in topology.pg_hosts(inv) if n != host],
        "pg_rewind_user": REWIND_USER,
        "pg_rewind_password": secret(SECRET_REWIND),
        "pg_version": VERSION,
        "pg_listen": listen_addresses(inv, host),
        "pg_hba": hba_entries(inv, host),
        "pg_db": DB,
        "pg_db_user": DB_USER,
        "pg_repl_user": REPL_USER,
        "pg_archive_hook": ARCHIVE_HOOK,
        "pg_archive_command": archive_command(inv),
        "pg_wal_archive": topology.wal_archive(inv),
        "pg_stanza": topology.PG_STANZA,
        "pg_wal_mount": topology.WAL_MOUNT,
        "pg_primary_address": inv.service_address(prim[0]) if prim else "",
        "pg_replication_password": secret(SECRET_REPL),
    }


# --- the runbook -----------------------------------------------------------------------


def converge(run: Run) -> None:
    inv = run.inv
    prim = topology.pg_primary(inv)
    run.secret(SECRET_DB)
    run.secret(SECRET_REPL)
    run.secret(SECRET_REWIND)
    run.step("postgres: packages and configuration", run.hosts(PRIMARY_ROLE, REPLICA_ROLE), _configure)
    if prim in run.hosts(PRIMARY_ROLE):
        run.step("postgres: roles, database and replication slots on the primary", [prim], _primary)
    run.step("postgres: streaming replicas", run.hosts(REPLICA_ROLE), _replica)


def _configure(h: HostSession) -> None:
    conf_changed, hba_changed, guard_changed = _files(h)
    _apply(h, conf_changed, hba_changed)
    if h.inv.postgres.synchronous:
        h.service(SYNC_GUARD_UNIT, restart=guard_changed and not h.run.check)


def _files(h: HostSession) -> tuple[bool, bool, bool]:
    """Packages and every file of the tier; (settings, pg_hba.conf, sync guard) changed."""
    tvars = h.tier_vars(template_vars)
    h.packages(PACKAGES)
    h.directory("/usr/local/lib/hastack", mode="0755")
    if topology.wal_archive(h.inv) == "nfs":  # the copy onto the automounted export
        h.template("postgres/usr/local/lib/hastack/pg-wal-archive.j2", ARCHIVE_HOOK, tvars, mode="0755",
                   validate="sh -n {}")
    elif h.probe(f"test -e {ARCHIVE_HOOK}").ok:
        h.sh(f"rm -f {ARCHIVE_HOOK}", message=f"{ARCHIVE_HOOK} removed (the WAL archive is not in nfs mode)")
    # A former primary must not come back as a primary by itself (postgres.promote).
    h.template(f"postgres{START_GUARD}.j2", START_GUARD, tvars, mode="0755", validate="sh -n {}")
    h.directory(GUARD_DROPIN.rsplit("/", 1)[0], mode="0755")
    units_changed = h.template(f"postgres{GUARD_DROPIN}.j2", GUARD_DROPIN, tvars, mode="0644")
    guard_changed = False
    if h.inv.postgres.synchronous:
        guard_changed = h.template(f"postgres{SYNC_GUARD}.j2", SYNC_GUARD, tvars, mode="0755", validate="sh -n {}")
        service_changed = h.template(f"postgres{SYNC_GUARD_SERVICE}.j2", SYNC_GUARD_SERVICE, tvars, mode="0644")
        units_changed |= service_changed
        guard_changed |= service_changed
    if units_changed and not h.run.check:
        h.sh("systemctl daemon-reload", message="systemctl daemon-reload (PostgreSQL's start guard or sync guard)")
    h.directory(f"{ETC}/conf.d", owner="postgres", group="postgres", mode="0755")
    check_conf = (f"runuser -u postgres -- {BIN}/postgres -C listen_addresses "
                  f"-c config_file={ETC}/postgresql.conf >/dev/null")
    conf_changed = h.template(f"postgres{CONF_FILE}.j2", CONF_FILE, tvars, owner="postgres", group="postgres",
                              mode="0644", validate=check_conf)
    hba_changed = h.template(f"postgres{HBA_FILE}.j2", HBA_FILE, tvars, owner="postgres", group="postgres",
                             mode="0640")
    # Every postgres host can be a replica (after a promotion): the password file
    # pg_basebackup, the WAL receiver, pg_rewind and the start guard read.
    h.template("postgres/var/lib/postgresql/.pgpass.j2", PGPASS, tvars, owner="postgres", group="postgres",
               mode="0600")
    return conf_changed, hba_changed, guard_changed


def _apply(h: HostSession, conf_changed: bool, hba_changed: bool) -> None:
    """Running, with the files in force: a reload, and a restart only when a changed
    setting needs one (pg_settings.pending_restart)."""
    h.service(UNIT, reload=(conf_changed or hba_changed) and not h.run.check)
    if h.run.check:
        return
    if conf_changed:
        _wait_ready(h)
        pending = h.read(psql_c("SELECT string_agg(name, ', ' ORDER BY name) FROM pg_settings "
                                "WHERE pending_restart")).strip()
        if pending:
            h.sh(f"systemctl restart {UNIT}", message=f"restart {UNIT} ({pending} need a restart)")
    if hba_changed:
        errors = h.probe(psql_c("SELECT line_number || ': ' || error FROM pg_hba_file_rules WHERE error IS NOT NULL"))
        if errors.stdout.strip():
            raise HostFailed(f"{HBA_FILE}: rejected by PostgreSQL: {errors.stdout.strip()}")


def _scalar(h: HostSession, query: str, db: str = "postgres") -> str:
    return h.read(psql_c(query, db)).strip()


def _wait_ready(h: HostSession) -> None:
    h.wait_for("runuser -u postgres -- pg_isready -q", timeout=60, what=f"{UNIT} accepting connections")


def _primary(h: HostSession) -> None:
    _wait_ready(h)
    if not h.run.check and _scalar(h, "SELECT pg_is_in_recovery()") == "t":
        raise HostFailed(f"{h.name} is the inventory's {PRIMARY_ROLE} but is a standby (in recovery); "
                         "refusing to create roles on it")
    ensure_role(h, DB_USER, h.run.secret(SECRET_DB), "LOGIN")
    ensure_role(h, REPL_USER, h.run.secret(SECRET_REPL), "LOGIN REPLICATION")
    ensure_role(h, REWIND_USER, h.run.secret(SECRET_REWIND), "LOGIN")
    _rewind_grants(h)
    # the owner's name, an empty line for a database without a known owner, no line when it does not exist
    owner = h.probe(psql_c(f"SELECT coalesce(pg_get_userbyid(datdba), '') FROM pg_database "
                           f"WHERE datname = {pg_literal(DB)}")).stdout
    if owner:
        if owner.strip() == DB_USER:
            h.ok(f"database {DB} exists, owned by {DB_USER}")
        else:
            h.sh(psql_c(f"ALTER DATABASE {pg_ident(DB)} OWNER TO {pg_ident(DB_USER)}"),
                 message=f"database {DB}: owner {DB_USER}")
    else:
        h.sh(psql_c(f"CREATE DATABASE {pg_ident(DB)} OWNER {pg_ident(DB_USER)} ENCODING 'UTF8' TEMPLATE template0"),
             message=f"create database {DB} owned by {DB_USER}")
    public = h.probe(psql_c("SELECT pg_get_userbyid(nspowner) FROM pg_namespace WHERE nspname = 'public'", DB))
    if public.ok and public.stdout.strip() == DB_USER:
        h.ok(f"schema public of {DB} owned by {DB_USER}")
    else:
        h.sh(psql_c(f"ALTER SCHEMA public OWNER TO {pg_ident(DB_USER)}", DB),
             message=f"schema public of {DB}: owner {DB_USER}")
    slots = _stale_slots(h)
    for replica in topology.pg_replicas(h.inv):
        slot = topology.slot_name(replica)
        if slot in slots:
            h.ok(f"replication slot {slot} (for {replica})")
        else:
            h.sh(psql_c(f"SELECT pg_create_physical_replication_slot({pg_literal(slot)})"),
                 message=f"create physical replication slot {slot} for {replica}")


def _stale_slots(h: HostSession) -> set[str]:
    """A slot of ours (replica_*) whose host is no PostgreSQL host of the inventory any
    more (retired, replaced, taken out) keeps WAL on the primary forever: dropped once
    no WAL sender uses it. Returns the slots of ours that stay."""
    ours = {topology.slot_name(n) for n in topology.pg_hosts(h.inv) if n != h.name}
    have = h.read(psql_c("SELECT slot_name || ' ' || active::text FROM pg_replication_slots "
                         "WHERE slot_name LIKE 'replica\\_%'")).split("\n")
    kept: set[str] = set()
    for line in filter(None, (x.strip() for x in have)):
        slot, active = line.split(" ", 1)
        if slot in ours:
            kept.add(slot)
            continue
        if active == "true":
            h.note(f"slot {slot} belongs to no PostgreSQL host of the inventory but a standby still uses it: "
                   "left for now (stop PostgreSQL on that host)")
            continue
        h.sh(psql_c(f"SELECT pg_drop_replication_slot({pg_literal(slot)})"),
             message=f"drop replication slot {slot}: its host is no PostgreSQL host of the inventory")
    return kept


def _rewind_grants(h: HostSession) -> None:
    """EXECUTE on the functions pg_rewind calls, for the rewind role (no superuser)."""
    functions = ", ".join(pg_literal(f"pg_catalog.{f}") for f in REWIND_FUNCTIONS)
    have = _scalar(h, f"SELECT string_agg(has_function_privilege({pg_literal(REWIND_USER)}, f, 'EXECUTE')::text, ',') "
                   f"FROM unnest(ARRAY[{functions}]) AS f")
    if have == ",".join(["true"] * len(REWIND_FUNCTIONS)):
        h.ok(f"role {REWIND_USER}: EXECUTE on the {len(REWIND_FUNCTIONS)} functions pg_rewind calls")
        return
    statement = "".join(f"GRANT EXECUTE ON FUNCTION pg_catalog.{f} TO {pg_ident(REWIND_USER)};\n"
                        for f in REWIND_FUNCTIONS)
    h.sh(f"{psql()} -f -", stdin=statement, message=f"role {REWIND_USER}: EXECUTE on the functions pg_rewind calls")


def _replica(h: HostSession) -> None:
    inv = h.inv
    prim = topology.pg_primary(inv)
    slot = topology.slot_name(h.name)
    _wait_ready(h)
    state = h.probe(psql_c("SELECT pg_is_in_recovery()"))
    if state.ok and state.stdout.strip() == "t":
        receiver = h.probe(psql_c("SELECT status || ' from ' || sender_host FROM pg_stat_wal_receiver")).stdout.strip()
        if receiver.startswith("streaming"):
            h.ok(f"standby, {receiver} (slot {slot}): left alone, no base backup")
        else:
            h.ok(f"standby, WAL receiver: {receiver or 'not connected'}; left alone (no base backup "
                 "over a standby: see `inv postgres.status`)")
        return
    databases = set(h.read(psql_c("SELECT datname FROM pg_database")).split()) if state.ok else set()
    own = sorted(databases - DEFAULT_DATABASES)
    if own:
        raise HostFailed(f"{h.name} is a primary with databases of its own ({', '.join(own)}), not a standby; "
                         f"refusing to wipe it for a base backup (a former primary? `inv postgres.rejoin {h.name}`)")
    _basebackup(h, prim, slot)


def _basebackup(h: HostSession, prim: str, slot: str) -> None:
    source = h.inv.service_address(prim)
    if h.run.check:
        h.changed(f"would replace the fresh cluster {DATA} by pg_basebackup -S {slot} from {prim} ({source})")
        return
    cmd = " && ".join([
        f"systemctl stop {UNIT}",
        f"find {DATA} -mindepth 1 -delete",
        basebackup(source, slot),
        # primary_conninfo and primary_slot_name are in conf.d/hastack.conf, not in postgresql.auto.conf
        f"runuser -u postgres -- touch {STANDBY_SIGNAL}",
        f"systemctl start {UNIT}",
    ])
    h.sh(cmd, message=f"base backup from {prim} ({source}) over slot {slot}; started as a streaming standby",
         timeout=1800)
    _wait_ready(h)
    wait_streaming(h, timeout=30)


def basebackup(source: str, slot: str) -> str:
    """pg_basebackup from the primary at ``source`` into the empty data directory, over ``slot``
    (no -R: a standby's settings are in conf.d)."""
    return (f"runuser -u postgres -- env PGPASSFILE={PGPASS} pg_basebackup -h {q(source)} -U {REPL_USER} "
            f"-D {DATA} -S {q(slot)} -X stream -c fast -w")


def wait_streaming(h: HostSession, timeout: int = 60) -> None:
    """Until the standby's WAL receiver streams from the inventory's primary."""
    prim = topology.pg_primary(h.inv)
    address = h.inv.service_address(prim)
    h.wait_for(psql_c("SELECT status || ' ' || sender_host FROM pg_stat_wal_receiver")
               + f" | grep -qx {q('streaming ' + address)}", timeout=timeout,
               what=f"{h.name}: its WAL receiver streaming from {prim} ({address})")
    h.ok(f"streaming from {prim} ({address})")


# --- status ---------------------------------------------------------------------------------


ARCHIVER_QUERY = (
    "SELECT current_setting('archive_mode') || '|' || archived_count || '|' || coalesce(last_archived_wal, '') "
    "|| '|' || coalesce(to_char(last_archived_time, 'YYYY-MM-DD HH24:MI:SS'), '') || '|' || failed_count || '|' "
    "|| coalesce(last_failed_wal, '') || '|' || coalesce(to_char(last_failed_time, 'YYYY-MM-DD HH24:MI:SS'), '') "
    "|| '|' || (SELECT count(*) FROM pg_ls_archive_statusdir() WHERE name LIKE '%.ready') FROM pg_stat_archiver")


def archiver_line(text: str) -> str:
    """pg_stat_archiver in words: the last archived segment, the failures, the backlog."""
    parts = text.strip().split("|")
    if len(parts) != 8:
        return f"archiver: unknown ({text.strip()[:80]!r})"
    mode, count, last, last_at, failed, failed_wal, failed_at, ready = parts
    if mode == "off":
        return "archiver: off (no WAL archive)"
    line = f"archiver: {count} archived, last {last or '-'}" + (f" at {last_at}" if last_at else "")
    if int(failed or 0):
        newer = failed_at > last_at if failed_at and last_at else bool(failed_at)
        line += f"; {failed} failed, last {failed_wal} at {failed_at}" + (" (FAILING NOW)" if newer else "")
    return line + f"; {ready} waiting"


def _status(h: HostSession) -> None:
    in_recovery = h.probe(psql_c("SELECT pg_is_in_recovery()"))
    if not in_recovery.ok:
        raise HostFailed(f"PostgreSQL does not answer: {(in_recovery.stderr or in_recovery.stdout).strip()}")
    if in_recovery.stdout.strip() == "f":
        rows = h.read(psql_c(
            "SELECT coalesce(application_name, '?') || ' ' || coalesce(host(client_addr), 'local') || ' ' || "
            "state || ' ' || coalesce(sync_state, '?') || ' lag ' || "
            "coalesce(pg_wal_lsn_diff(pg_current_wal_lsn(), replay_lsn)::bigint::text, '?') || ' bytes' "
            "FROM pg_stat_replication ORDER BY 1")).strip()
        slots = h.read(psql_c("SELECT slot_name || (CASE WHEN active THEN ' active' ELSE ' inactive' END) "
                            "FROM pg_replication_slots ORDER BY 1")).strip()
        sync = h.read(psql_c("SELECT current_setting('synchronous_standby_names')")).strip()
        h.ok("role primary; replicas: " + ("; ".join(rows.splitlines()) or "none connected")
             + "; slots: " + (", ".join(slots.splitlines()) or "none")
             + (f"; synchronous: {sync}" if sync else "; asynchronous"
                + (" (the sync guard turned it off: no standby streams)"
                   if h.probe(f"test -e {ASYNC_FILE}").ok else ""))
             + "; " + archiver_line(h.read(psql_c(ARCHIVER_QUERY))))
    else:
        receiver = h.read(psql_c(
            "SELECT status || ' from ' || sender_host || ' slot ' || coalesce(slot_name, '-') "
            "FROM pg_stat_wal_receiver")).strip()
        lag = h.read(psql_c("SELECT coalesce(pg_wal_lsn_diff(pg_last_wal_receive_lsn(), "
                          "pg_last_wal_replay_lsn())::bigint::text, '?')")).strip()
        h.ok(f"role replica; WAL receiver {receiver or 'not connected'}; replay lag {lag} bytes")


@runbook(default=True)
def deploy(run):
    """Converge PostgreSQL: the primary, its roles and database, streaming replicas."""
    converge(run)


@runbook(readonly=True)
def status(run):
    """Print every PostgreSQL node's role, replication state and lag in bytes."""
    run.step("postgres: status", run.hosts(PRIMARY_ROLE, REPLICA_ROLE), _status)


@runbook(help={"host": f"the replica to build (a host with role {REPLICA_ROLE})"})
def replica(run, host):
    """Build one streaming replica (base backup only when it is not a standby yet)."""
    require_replica(run.inv, host)
    prim = topology.pg_primary(run.inv)
    run.step("postgres: packages and configuration", [prim, host], _configure)
    run.step("postgres: replication slot on the primary", [prim], _primary)
    run.step("postgres: streaming replica", [host], _replica)


ns = Collection("postgres", deploy, status, replica)
