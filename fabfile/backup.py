"""Backup tier (seed 004): Bacula 9.6 (Debian 12) with its catalog in PostgreSQL on
the host with role backup, a file daemon on every client of the inventory's
`backup.jobs`. Nothing to do without a backup host or without jobs.

Runbook of `inv backup.deploy`:
1. Every host of the tier has its certificate from our CA (`inv pki.deploy`).
2. Clients (the hosts the jobs name), in parallel:
   - bacula-fd, installed with no service started;
   - for a job with `pg_dump: DB`: /etc/bacula/scripts/hastack-dump-before
     (pg_dump of DB as postgres into /var/backups/hastack-dump/DB.sql, 0600 in
     a 0700 directory, plus DB.tables: row count and md5 of every table, read in
     the dump's own snapshot), hastack-dump-after (removes both, also after a
     failed job) and hastack-drill-pg (`inv backup.drill`);
   - /etc/bacula/bacula-fd.conf (root:bacula 0640), checked with
     `bacula-fd -t -c` before it replaces the live one: it listens on the
     address the backup host reaches it at (the one they share, else its
     service address across the gateway); only the director may connect, in
     TLS, its certificate's CN checked; data goes to the storage daemon in TLS;
   - bacula-fd running; restarted only when its configuration changed.
3. The backup host:
   - postgresql (its cluster 15/main running), then bacula-director(-pgsql)
     (debconf told first: no dbconfig-common database), bacula-sd and
     bacula-console, installed with no service started;
   - the catalog: role `bacula` (SCRAM password from the site's secrets,
     compared, never re-set when it matches), database `bacula` (SQL_ASCII,
     collation C, from template0, as Bacula wants), its tables from Debian's
     make_postgresql_tables in one transaction, only when the database has
     none; the schema version checked;
   - user bacula in group ssl-cert (the director and the storage daemon run as
     bacula and read the host key /etc/ssl/hastack/<host>.key, root:ssl-cert 0640);
   - the volume directory `backup.volume_dir` (bacula:tape 0750);
   - the metric script: every job's RunScript (after a good run, on the
     director) writes hastack_backup_last_success_timestamp_seconds{backup_job=...}
     into /var/lib/hastack-bacula-metrics/hastack_backup.prom (tmp + mv, the
     other jobs' lines kept), which the node exporter's textfile directory links
     to (/var/lib/prometheus/node-exporter/hastack_backup.prom: the director runs
     as bacula and may not write into prometheus's directory);
   - bacula-sd.conf (a file device on volume_dir), bacula-dir.conf (catalog,
     messages to /var/log/bacula/bacula.log, syslog and the catalog, a JobDefs,
     a Client per client with its own password, per job a FileSet, a Schedule,
     three Pools Full/Diff/Incr with the seed's recycling cycle and a Job; a
     restore job) and bconsole.conf (root 0600): each checked with the daemon's
     own `-t` (as user bacula: the key must be readable, the catalog must
     answer) before it replaces the live one;
   - bacula-sd and bacula-director running; each restarted only when its
     configuration (or the ssl-cert membership) changed.

Every connection between the daemons and bconsole is TLS with the site's CA
(TLS Require); the servers accept only the certificate CNs of their peers.
Bacula 9.6 checks a server's certificate against the name it dialled (DNS
names only): the storage daemon and the director are dialled by the backup
host's FQDN (/etc/hosts of the base tier), the clients by address with TLS
Allowed CN naming their FQDN.

Day-2: `inv backup.run JOB`, `inv backup.status`, `inv backup.restore`,
`inv backup.drill` (restore to a scratch directory and compare with the source).
"""

from __future__ import annotations

import datetime as dt
import math
import re
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from invoke import Collection

from .core import HostFailed, StepFailed, UserError, q, runbook, topology
from .core.sql import ensure_role, pg_ident, pg_literal, psql, psql_c

if TYPE_CHECKING:
    from .core import HostSession, Run
    from .core.inventory import BackupJob, Inventory

ROLE = topology.BACKUP
SERVER_PACKAGES = ["bacula-director", "bacula-director-pgsql", "bacula-sd", "bacula-console"]
PG_PACKAGES = ["postgresql"]  # the catalog's server (installed and started first)
PG_UNIT = f"postgresql@{topology.PG_VERSION}-main"
CLIENT_PACKAGES = ["bacula-fd"]
DEBCONF = ["bacula-director-pgsql bacula-director-pgsql/dbconfig-install boolean false"]
DIR_UNIT, SD_UNIT, FD_UNIT = "bacula-director", "bacula-sd", "bacula-fd"
ETC = "/etc/bacula"
DIR_CONF, SD_CONF, FD_CONF, CONSOLE_CONF = (f"{ETC}/bacula-dir.conf", f"{ETC}/bacula-sd.conf",
                                            f"{ETC}/bacula-fd.conf", f"{ETC}/bconsole.conf")
SCRIPTS = {
    "dump_before": f"{ETC}/scripts/hastack-dump-before",
    "dump_after": f"{ETC}/scripts/hastack-dump-after",
    "drill_pg": f"{ETC}/scripts/hastack-drill-pg",
    "metric": f"{ETC}/scripts/hastack-backup-metric",
}
PORTS = {"dir": 9101, "fd": 9102, "sd": 9103}
DUMP_DIR = "/var/backups/hastack-dump"
RESTORE_JOB = "RestoreFiles"  # capitals: never an inventory job name
RESTORE_WHERE = "/var/tmp/bacula-restores"
DRILL_DIR = "/var/tmp/hastack-drill"
JOBDEFS = "HastackJobDefs"
DEVICE = "FileStorage"
CATALOG = {"name": "MyCatalog", "db": "bacula", "user": "bacula", "address": "localhost", "port": topology.PG_PORT}
MAKE_TABLES = "/usr/share/bacula-director/make_postgresql_tables"
SCHEMA_VERSION = "16"  # Bacula 9.6's catalog (make_postgresql_tables: INSERT INTO Version VALUES (16))
PG_BIN = f"/usr/lib/postgresql/{topology.PG_VERSION}/bin"

# secrets
DIR_SECRET = "bacula_dir_password"  # bconsole -> director
SD_SECRET = "bacula_sd_password"  # director -> storage daemon
CATALOG_SECRET = "bacula_catalog_password"  # director -> PostgreSQL (role bacula)


def fd_secret(host: str) -> str:
    """The director -> file daemon password of one client."""
    return f"bacula_fd_{host}"


# the metric (fabfile/status.py and the monitoring tier read it from the textfile directory)
METRIC = "hastack_backup_last_success_timestamp_seconds"
TEXTFILE_DIR = "/var/lib/prometheus/node-exporter"
METRIC_DIR = "/var/lib/hastack-bacula-metrics"  # readable by the node exporter (/var/lib/bacula is 0700)
METRIC_FILE = f"{METRIC_DIR}/hastack_backup.prom"
TEXTFILE_LINK = f"{TEXTFILE_DIR}/hastack_backup.prom"

# The seed's pools: volumes of at most 1G, at most 3 per pool, the oldest recycled.
MAX_VOLUMES = 3
MAX_VOLUME_BYTES = "1G"
SEED_MAX_JOBS = {"Full": 30, "Diff": 30, "Incr": 14}
LEVELS = {"Full": "Full", "Diff": "Differential", "Incr": "Incremental"}
LEVEL_CODES = {"F": "Full", "D": "Differential", "I": "Incremental"}
JOB_STATUS = {
    "T": "OK", "W": "OK with warnings", "E": "error", "e": "non-fatal error", "f": "fatal error",
    "A": "canceled", "R": "running", "C": "created, not yet running", "B": "blocked", "D": "verify differences",
    "F": "waiting for the client", "S": "waiting for the storage daemon", "m": "waiting for a new volume",
    "M": "waiting for a mount", "s": "waiting for storage", "j": "waiting for a job", "c": "waiting for the client",
    "d": "waiting for the maximum jobs", "t": "waiting for the start time", "p": "waiting for a higher priority job",
    "a": "SD despooling attributes", "i": "doing batch insert of file records",
}
GOOD = ("T", "W")

# The seed's two schedules: the /etc jobs' monthly cycle, and the database and
# monitoring data's daily one with hourly incrementals.
MONTHLY = ["Level=Full on 1 at 01:00", "Level=Differential on 15 at 01:00",
           "Level=Incremental on 2-14 at 01:00", "Level=Incremental on 16-31 at 01:00"]
HOURLY = (["Level=Full at 01:00", "Level=Differential at 13:00"]
          + [f"Level=Incremental at {h:02d}:00" for h in range(24) if h not in (1, 13)])
CYCLES = {
    # runs per day of each pool's level (for Maximum Volume Jobs), and the Run lines
    "monthly": ({"Full": 1 / 30, "Diff": 1 / 30, "Incr": 1.0}, MONTHLY),
    "hourly": ({"Full": 1.0, "Diff": 1.0, "Incr": 22.0}, HOURLY),
}

# Per table of a database: "schema.table|rows|md5 of its rows' md5s, sorted" (psql -At).
# The dump script runs it in the dump's snapshot; the drill on the restored copy and
# on the live database.
MANIFEST_SQL = (
    "SELECT format('SELECT %L, count(*), coalesce(md5(string_agg(md5(t::text), '''' ORDER BY md5(t::text) "
    "COLLATE \"C\")), '''') FROM %I.%I t', n.nspname || '.' || c.relname, n.nspname, c.relname) "
    "FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace "
    "WHERE c.relkind IN ('r', 'p') AND n.nspname NOT IN ('pg_catalog', 'information_schema') "
    "AND n.nspname NOT LIKE 'pg\\_%' ORDER BY 1 \\gexec"
)

DIR_ARG = re.compile(r"/[A-Za-z0-9._+-]+(/[A-Za-z0-9._+-]+)*/?")
JOB_TIMEOUT = 6 * 3600  # how long `backup.run` / restore / drill wait for one job


# --- what the inventory says ---------------------------------------------------------------


def cycle(job: BackupJob) -> str:
    """The job's schedule: `schedule` in the inventory when it has one, else the seed's:
    the hourly cycle for a database dump, the monthly one for files."""
    return job.schedule or ("hourly" if job.pg_dump else "monthly")


def dump_files(db: str) -> list[str]:
    return [f"{DUMP_DIR}/{db}.sql", f"{DUMP_DIR}/{db}.tables"]


def job_files(job: BackupJob) -> list[str]:
    """What the job's FileSet holds: its paths, and the dump of its database."""
    return [*job.paths, *(dump_files(job.pg_dump) if job.pg_dump else [])]


def max_volume_jobs(level: str, retention_days: int, runs_per_day: float) -> int:
    """Jobs per volume: the seed's number, or more when the pool's volumes (all but
    the one being written) could not hold its retention's worth of jobs; with the
    seed's 14 per volume, 3 volumes and hourly incrementals kept 7 days, the pool
    would run out of volumes after 2 days and the jobs wait for a volume."""
    need = math.ceil(retention_days * runs_per_day / (MAX_VOLUMES - 1))
    return max(SEED_MAX_JOBS[level], need)


def job_vars(inv: Inventory, name: str, job: BackupJob) -> dict:
    per_day, runs = CYCLES[cycle(job)]
    b = inv.backup
    retention = {"Full": b.full_retention_days, "Diff": b.diff_retention_days, "Incr": b.incr_retention_days}
    return {
        "name": name,
        "client": job.client,
        "fd": f"{job.client}-fd",
        "paths": list(job.paths),
        "exclude": list(job.exclude),
        "pg_dump": job.pg_dump,
        "files": job_files(job),
        "fileset": f"{name}-FS",
        "schedule": f"{name}-Sdl",
        "cycle": cycle(job),
        "runs": runs,
        # the seed: LZO for files, GZIP for the (text) dump
        "compression": "GZIP" if job.pg_dump and not job.paths else "LZO",
        "pools": [{"name": f"{name}-{level}", "level": level, "retention_days": retention[level],
                   "max_jobs": max_volume_jobs(level, retention[level], per_day[level])}
                  for level in ("Full", "Diff", "Incr")],
    }


def template_vars(inv: Inventory, host: str, secret) -> dict:
    bk = topology.backup_host(inv) or host
    b = inv.backup
    return {
        "backup_host": bk,
        "backup_fqdn": inv.fqdn(bk),
        "director": f"{bk}-dir",
        "storage": f"{bk}-sd",
        "device": DEVICE,
        "dir_address": inv.service_address(bk),
        "ports": PORTS,
        "dir_password": secret(DIR_SECRET),
        "sd_password": secret(SD_SECRET),
        "catalog": {**CATALOG, "password": secret(CATALOG_SECRET)},
        "tls": {"ca": topology.CA_FILE, "cert": topology.cert_path(host), "key": topology.key_path(host)},
        "clients": [{"name": c, "fd": f"{c}-fd", "fqdn": inv.fqdn(c), "password": secret(fd_secret(c)),
                     "address": topology.reach_address(inv, bk, c)} for c in topology.backup_clients(inv)],
        "jobs": [job_vars(inv, name, job) for name, job in inv.backup_jobs.items()],
        "jobdefs": JOBDEFS,
        "restore_job": RESTORE_JOB,
        "restore_where": RESTORE_WHERE,
        "volume_dir": b.volume_dir,
        "max_volumes": MAX_VOLUMES,
        "max_volume_bytes": MAX_VOLUME_BYTES,
        "file_retention_days": 365,
        "job_retention_days": 365,
        # this host as a client
        "fd": {"name": f"{host}-fd", "address": topology.reach_address(inv, bk, host),
               "password": secret(fd_secret(host))},
        "scripts": SCRIPTS,
        "dump_dir": DUMP_DIR,
        "manifest_sql": MANIFEST_SQL,
        "pg_bin": PG_BIN,
        "metric": METRIC,
        "metric_file": METRIC_FILE,
        "textfile_link": TEXTFILE_LINK,
    }


# --- runbook ------------------------------------------------------------------------------


def converge(run: Run) -> None:
    inv = run.inv
    bk = topology.backup_host(inv)
    if bk is None or not inv.backup_jobs:
        run.report.note("backup: nothing to do (" + ("no host with role backup" if bk is None
                                                     else "no backup.jobs in the inventory") + ")")
        return
    for name in (DIR_SECRET, SD_SECRET, CATALOG_SECRET, *(fd_secret(c) for c in topology.backup_clients(inv))):
        run.secret(name)  # generated (and saved) once, before the hosts work in parallel
    fds, server, both = _targets(run)
    run.step("backup: certificates present", both, topology.require_certificate)
    run.step("backup: file daemons", fds, configure_client)
    run.step("backup: catalog, storage daemon and director", server, configure_server)


def install(run: Run, among: set[str] | None = None) -> None:
    """Only the packages of the file daemons and the backup host, no daemon started
    (nothing here needs the systems), on the selected hosts ``among`` these:
    `deploy.all` runs this beside them; converge() finds them installed then."""
    if topology.backup_host(run.inv) is None or not run.inv.backup_jobs:
        return
    fds, server, both = _targets(run, among)
    run.step("backup: packages", both, lambda h: _packages(h, client=h.name in fds, server=h.name in server))


def _targets(run: Run, among: set[str] | None = None) -> tuple[list[str], list[str], list[str]]:
    """The selected hosts (``among`` these): the jobs' clients, the backup host
    (a list of one or none), and both together in inventory order."""
    inv = run.inv
    bk = topology.backup_host(inv)
    selected = [h for h in run.hosts() if among is None or h in among]
    fds = [c for c in topology.backup_clients(inv) if c in selected]
    server = [bk] if bk in selected else []
    return fds, server, [h for h in inv.hosts if h in {*fds, *server}]


def _packages(h: HostSession, *, client: bool, server: bool) -> None:
    if client:
        h.packages(CLIENT_PACKAGES, no_start=True)
    if server:
        h.packages(PG_PACKAGES)
        h.packages(SERVER_PACKAGES, preseed=DEBCONF, no_start=True)


def _client_jobs(inv: Inventory, host: str) -> dict[str, BackupJob]:
    return {n: j for n, j in inv.backup_jobs.items() if j.client == host}


def configure_client(h: HostSession) -> None:
    v = h.tier_vars(template_vars)
    h.packages(CLIENT_PACKAGES, no_start=True)
    if any(j.pg_dump for j in _client_jobs(h.inv, h.name).values()):
        for key in ("dump_before", "dump_after", "drill_pg"):
            h.template(f"backup{SCRIPTS[key]}.j2", SCRIPTS[key], v, mode="0750")
    changed = h.template(f"backup{FD_CONF}.j2", FD_CONF, v, group="bacula", mode="0640",
                         validate="/usr/sbin/bacula-fd -t -c {}")
    h.service(FD_UNIT, restart=changed)


def configure_server(h: HostSession) -> None:
    v = h.tier_vars(template_vars)
    h.packages(PG_PACKAGES)
    h.service(PG_UNIT)
    h.wait_for("runuser -u postgres -- pg_isready -q", timeout=60, what="PostgreSQL on the backup host")
    h.packages(SERVER_PACKAGES, preseed=DEBCONF, no_start=True)
    catalog(h, v["catalog"]["password"])
    groups = topology.key_reader(h, "bacula", "the director and the storage daemon read the host key")
    h.directory(h.inv.backup.volume_dir, owner="bacula", group="tape", mode="0750")
    h.directory(METRIC_DIR, owner="bacula", group="bacula", mode="0755")
    h.template(f"backup{SCRIPTS['metric']}.j2", SCRIPTS["metric"], v, mode="0755")
    h.ensure(f"test -d {TEXTFILE_DIR}", f"mkdir -p {TEXTFILE_DIR}",
             f"{TEXTFILE_DIR}/ (the node exporter's textfile directory)")
    h.ensure(f"test \"$(readlink {TEXTFILE_LINK})\" = {METRIC_FILE}", f"ln -sfn {METRIC_FILE} {TEXTFILE_LINK}",
             f"{TEXTFILE_LINK} -> {METRIC_FILE}")
    as_bacula = "runuser -u bacula -- "
    sd = h.template(f"backup{SD_CONF}.j2", SD_CONF, v, group="bacula", mode="0640",
                    validate=f"{as_bacula}/usr/sbin/bacula-sd -t -c {{}}")
    dird = h.template(f"backup{DIR_CONF}.j2", DIR_CONF, v, group="bacula", mode="0640",
                      validate=f"{as_bacula}/usr/sbin/bacula-dir -t -c {{}}")
    h.template(f"backup{CONSOLE_CONF}.j2", CONSOLE_CONF, v, mode="0600", validate="/usr/sbin/bconsole -t -c {}")
    h.service(SD_UNIT, restart=sd or groups)
    h.service(DIR_UNIT, restart=dird or groups)


# --- the catalog --------------------------------------------------------------------------


def catalog(h: HostSession, password: str) -> None:
    """Role, database and tables of Bacula's catalog, each only when missing."""
    if h.run.check and not h.installed("postgresql"):
        h.changed("would create the catalog: role bacula, database bacula (SQL_ASCII), Bacula's tables")
        return
    user, db = CATALOG["user"], CATALOG["db"]
    ensure_role(h, user, password, "LOGIN", label="catalog role")
    if h.probe(psql_c(f"SELECT 1 FROM pg_database WHERE datname = {pg_literal(db)}")).stdout.strip() == "1":
        h.ok(f"catalog database {db}")
    else:
        h.sh(f"{psql()} -f -", stdin=(
            f"CREATE DATABASE {pg_ident(db)} OWNER {pg_ident(user)} ENCODING 'SQL_ASCII' LC_COLLATE 'C' "
            f"LC_CTYPE 'C' TEMPLATE template0;\nALTER DATABASE {pg_ident(db)} SET datestyle TO 'ISO, YMD';\n"),
            message=f"catalog database {db} (SQL_ASCII, collation C, owner {user})")
    if h.run.check and not h.probe(psql_c("SELECT 1", db)).ok:
        h.changed(f"would create Bacula's tables ({MAKE_TABLES})")
        return
    if h.probe(psql_c("SELECT to_regclass('public.version') IS NOT NULL", db)).stdout.strip() == "t":
        h.ok(f"catalog tables present in {db}")
    else:
        # as the owner (PGOPTIONS role), one transaction: all of Bacula's tables or none
        h.sh(f"cd / && runuser -u postgres -- env db_name={q(db)} PGOPTIONS={q('-c role=' + user)} "
             f"{MAKE_TABLES} -X -q -v ON_ERROR_STOP=1 --single-transaction",
             message=f"Bacula's catalog tables created in {db} ({MAKE_TABLES})")
        h.sh(f"{psql(db)} -f -", stdin=f"GRANT ALL ON ALL TABLES IN SCHEMA public TO {pg_ident(user)};\n"
             f"GRANT ALL ON ALL SEQUENCES IN SCHEMA public TO {pg_ident(user)};\n",
             message=f"catalog tables and sequences granted to {user}")
    if not h.run.check:
        version = h.probe(psql_c("SELECT max(versionid) FROM version", db)).stdout.strip()
        if version != SCHEMA_VERSION:
            raise HostFailed(f"catalog {db}: schema version {version or 'unknown'}, Bacula 9.6 wants "
                             f"{SCHEMA_VERSION} (an older catalog: Debian's update_postgresql_tables)")


@runbook(default=True)
def deploy(run):
    """Converge Bacula: the file daemons of the jobs' clients, the catalog, storage and director."""
    converge(run)


# --- operating it: bconsole and the catalog -----------------------------------------------


def bconsole(commands: list[str]) -> tuple[str, str]:
    """The bconsole command line and its standard input (the commands, then quit)."""
    return f"bconsole -c {CONSOLE_CONF}", "".join(c + "\n" for c in commands) + "quit\n"


def catalog_query(sql: str) -> str:
    """psql on the backup host's catalog (as postgres, peer), fields separated by '|'."""
    return psql_c(sql, CATALOG["db"])


def director(run: Run) -> HostSession:
    """The backup host, when the inventory has one with jobs and its director runs."""
    inv = run.inv
    bk = topology.backup_host(inv)
    if bk is None:
        raise UserError(f"{inv.path}: no host with role backup: Bacula is not part of this site")
    if not inv.backup_jobs:
        raise UserError(f"{inv.path}: backup.jobs is empty: Bacula has no job here")
    return run.answering([bk], what="Bacula director", probe=f"systemctl is-active --quiet {DIR_UNIT}")


def job_names(inv: Inventory) -> str:
    return ", ".join(inv.backup_jobs) or "none"


def check_job(inv: Inventory, job: str | None) -> str:
    if not job or job not in inv.backup_jobs:
        raise UserError(f"{inv.path}: no backup job {job!r}; the jobs are: {job_names(inv)} (nothing was changed)")
    return job


def check_level(level: str | None) -> str | None:
    if level is None or level == "":
        return None
    for full in LEVELS.values():
        if level.strip() and full.lower().startswith(level.strip().lower()):
            return full
    raise UserError(f"--level {level!r}: give Full, Differential or Incremental (nothing was changed)")


def check_time(value: str | None, what: str = "--before") -> str | None:
    """'YYYY-MM-DD HH:MM:SS' (the director's local time, as Bacula's catalog keeps it)."""
    if value is None or value == "":
        return None
    try:
        when = dt.datetime.strptime(value.strip(), "%Y-%m-%d %H:%M:%S")
    except ValueError:
        raise UserError(f"{what} {value!r}: give 'YYYY-MM-DD HH:MM:SS' (nothing was changed)") from None
    return when.strftime("%Y-%m-%d %H:%M:%S")


def check_dir(value: str, what: str = "DIR") -> str:
    """An absolute directory made of safe characters only, no '.' or '..' component."""
    if not isinstance(value, str) or not DIR_ARG.fullmatch(value) or any(
            part in (".", "..") for part in value.split("/")):
        raise UserError(f"{what} {value!r}: give an absolute directory of letters, digits and . _ + - "
                        "(no '..', no spaces) (nothing was changed)")
    return value.rstrip("/") or "/"


def parse_target(inv: Inventory, value: str | None) -> tuple[str, str]:
    """--to HOST:DIR: HOST a Bacula client of the inventory, DIR absolute and safe."""
    if not value or ":" not in value:
        example = next(iter(topology.backup_clients(inv)), "host")
        raise UserError(f"--to {value!r}: give HOST:DIR, e.g. --to {example}:/var/tmp/restore "
                        "(nothing was changed)")
    host, _, where = value.partition(":")
    if host not in inv.hosts:
        raise UserError(f"--to {value!r}: unknown host {host!r} (nothing was changed)")
    if host not in topology.backup_clients(inv):
        raise UserError(f"--to {value!r}: {host} runs no Bacula file daemon; restore onto one of the jobs' "
                        f"clients: {', '.join(topology.backup_clients(inv))} (nothing was changed)")
    return host, check_dir(where, "--to")


@dataclass
class JobRun:
    """One row of the catalog's Job table."""

    jobid: int
    name: str
    level: str
    status: str
    start: str
    end: str
    files: int
    bytes: int
    seconds: float
    age: float | None = None

    @property
    def ok(self) -> bool:
        return self.status in GOOD

    def describe(self) -> str:
        state = JOB_STATUS.get(self.status, "unknown")
        return (f"JobId {self.jobid} {self.name}: {self.status} ({state}), {LEVEL_CODES.get(self.level, self.level)}, "
                f"{self.files} files, {human_bytes(self.bytes)}, {self.seconds:.0f} s "
                f"({self.start or '-'} - {self.end or '-'})")


JOB_COLUMNS = ("jobid, name, level, jobstatus, coalesce(to_char(starttime, 'YYYY-MM-DD HH24:MI:SS'), ''), "
               "coalesce(to_char(endtime, 'YYYY-MM-DD HH24:MI:SS'), ''), coalesce(jobfiles, 0), "
               "coalesce(jobbytes, 0), coalesce(extract(epoch from (endtime - starttime)), 0), "
               "coalesce(extract(epoch from (localtimestamp - endtime)), -1)")


def parse_jobs(text: str) -> list[JobRun]:
    """Rows of JOB_COLUMNS as psql -At prints them (fields separated by '|')."""
    out = []
    for line in text.splitlines():
        f = line.split("|")
        if len(f) != 10 or not f[0].strip().isdigit():
            continue
        try:
            age = float(f[9])
            out.append(JobRun(int(f[0]), f[1], f[2], f[3], f[4], f[5], int(f[6] or 0), int(f[7] or 0),
                              float(f[8] or 0), age if age >= 0 else None))
        except ValueError:
            continue
    return out


def job_row(h: HostSession, jobid: int) -> JobRun | None:
    rows = parse_jobs(h.probe(catalog_query(f"SELECT {JOB_COLUMNS} FROM job WHERE jobid = {int(jobid)}")).stdout)
    return rows[0] if rows else None


def job_log(h: HostSession, jobid: int, lines: int = 15) -> str:
    out = h.probe(catalog_query(f"SELECT logtext FROM log WHERE jobid = {int(jobid)} ORDER BY time, logid")).stdout
    return "\n".join(out.strip().splitlines()[-lines:])


def queued_jobid(output: str) -> int | None:
    """'Job queued. JobId=123' (run) or 'JobId 123' lines: the new job's id."""
    m = re.search(r"Job queued\. JobId=(\d+)", output) or re.search(r"JobId[= ](\d+)", output)
    return int(m[1]) if m else None


def human_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n} B"


def start_and_wait(h: HostSession, command: str, what: str) -> JobRun:
    """One bconsole command that queues a job, then `wait jobid=N`; the job's row."""
    cmd, stdin = bconsole([command])
    r = h.sh(cmd, stdin=stdin, message=what)
    jobid = queued_jobid(r.stdout)
    if jobid is None:
        raise HostFailed(f"bconsole did not queue {what}:\n" + "\n".join(r.stdout.strip().splitlines()[-15:]))
    h.note(f"{what}: JobId {jobid} queued, waiting for it")
    cmd, stdin = bconsole([f"wait jobid={jobid}"])
    h.probe(cmd, stdin=stdin, timeout=JOB_TIMEOUT)
    row = job_row(h, jobid)
    if row is None:
        raise HostFailed(f"JobId {jobid} ({what}) is not in the catalog")
    return row


def fail_unless_ok(h: HostSession, row: JobRun, what: str) -> None:
    if not row.ok:
        raise StepFailed(f"{h.name}: {what} did not end OK: {row.describe()}\n"
                         f"its log (bconsole: list joblog jobid={row.jobid}):\n{job_log(h, row.jobid)}")


@runbook(name="run", help={
    "job": "the inventory's job name (backup.jobs), e.g. e1-fs",
    "level": "Full, Differential or Incremental (default: the job's, Incremental; Bacula makes the "
             "first one Full)",
})
def run_(run, job, level=None):
    """Run one backup job now and wait for it: status, level, files, bytes, duration."""
    job = check_job(run.inv, job)
    lvl = check_level(level)
    h = director(run)
    command = f"run job={job}" + (f" level={lvl}" if lvl else "") + " yes"
    bconsole_job(run, h, f"backup: run {job}", command, f"backup job {job}", lambda row: row.describe())


def bconsole_job(run: Run, h: HostSession, title: str, command: str, what: str, done) -> None:
    """A bconsole command that queues a job, the job waited for, ``done(row)`` reported;
    a job that does not end OK fails the task. In check mode: what would run."""
    if run.check:
        run.on_one(title, h, lambda h: h.changed(f"would run `{command}` in bconsole and wait"))
        return

    def go(h: HostSession) -> None:
        row = start_and_wait(h, command, what)
        fail_unless_ok(h, row, what)
        h.ok(done(row))

    run.on_one(title, h, go)


# --- status -------------------------------------------------------------------------------


@dataclass
class PoolUse:
    name: str
    volumes: int
    bytes: int


def parse_pools(text: str) -> list[PoolUse]:
    out = []
    for line in text.splitlines():
        f = line.split("|")
        if len(f) == 3 and f[1].strip().isdigit() and f[2].strip().isdigit():
            out.append(PoolUse(f[0], int(f[1]), int(f[2])))
    return out


LAST_GOOD_SQL = (f"SELECT DISTINCT ON (name) {JOB_COLUMNS} FROM job WHERE type = 'B' AND jobstatus IN ('T', 'W') "
                 "ORDER BY name, endtime DESC")
LAST_ANY_SQL = (f"SELECT DISTINCT ON (name) {JOB_COLUMNS} FROM job WHERE type = 'B' "
                "ORDER BY name, jobid DESC")
POOLS_SQL = ("SELECT p.name, count(m.mediaid), coalesce(sum(m.volbytes), 0) FROM pool p "
             "LEFT JOIN media m ON m.poolid = p.poolid GROUP BY p.name ORDER BY p.name")


def age_limit_hours(inv: Inventory) -> float:
    return inv.monitoring.thresholds.backup_age_hours if inv.monitoring is not None else 26.0


def ago(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    if seconds < 3600:
        return f"{seconds / 60:.0f} min"
    if seconds < 172800:
        return f"{seconds / 3600:.1f} h"
    return f"{seconds / 86400:.1f} d"


@dataclass
class JobStatus:
    name: str
    last_good: JobRun | None
    last: JobRun | None
    pools: list[PoolUse] = field(default_factory=list)
    stale: bool = False

    def problem(self) -> str | None:
        if self.last_good is None:
            return "no good run yet"
        if self.stale:
            return "stale"
        if self.last is not None and not self.last.ok and self.last.status not in ("R", "C"):
            return f"last run {self.last.status} ({JOB_STATUS.get(self.last.status, 'unknown')})"
        return None


def job_statuses(inv: Inventory, good: list[JobRun], last: list[JobRun], pools: list[PoolUse]) -> list[JobStatus]:
    limit = age_limit_hours(inv) * 3600
    goods = {r.name: r for r in good}
    lasts = {r.name: r for r in last}
    out = []
    by_name = {p.name: p for p in pools}
    for name in inv.backup_jobs:
        g = goods.get(name)
        out.append(JobStatus(name, g, lasts.get(name), [by_name[f"{name}-{level}"] for level in LEVELS
                                                        if f"{name}-{level}" in by_name],
                             stale=g is not None and (g.age is None or g.age > limit)))
    return out


@runbook(readonly=True)
def status(run):
    """Per job: the last good run (time, level, age, files, bytes), flagged when too old; volumes per pool."""
    from rich.table import Table

    h = director(run)
    rows: list[JobStatus] = []

    def read(h: HostSession) -> None:
        answers = [h.probe(catalog_query(sql)) for sql in (LAST_GOOD_SQL, LAST_ANY_SQL, POOLS_SQL)]
        bad = next((r for r in answers if not r.ok), None)
        if bad is not None:
            raise HostFailed(f"cannot read Bacula's catalog: {(bad.stderr or bad.stdout).strip()}")
        rows.extend(job_statuses(h.inv, parse_jobs(answers[0].stdout), parse_jobs(answers[1].stdout),
                                 parse_pools(answers[2].stdout)))
        problems = [f"{s.name}: {s.problem()}" for s in rows if s.problem()]
        if problems:
            h.run.report.result(h.name, "failed", "; ".join(problems))
        else:
            h.ok(f"{len(rows)} jobs, every one with a good run within {age_limit_hours(h.inv):g} h")

    run.on_one("backup: status", h, read)
    t = Table(title=f"Bacula jobs on {h.name} (stale after {age_limit_hours(run.inv):g} h)")
    for col in ("job", "state", "last good run", "level", "age", "files", "bytes", "volumes (Full/Diff/Incr)"):
        t.add_column(col, no_wrap=True)
    for s in rows:
        g = s.last_good
        vols = " / ".join(f"{p.volumes} ({human_bytes(p.bytes)})" for p in s.pools) or "-"
        t.add_row(s.name, s.problem() or "ok", g.end if g else "-", LEVEL_CODES.get(g.level, g.level) if g else "-",
                  ago(g.age) if g else "-", str(g.files) if g else "-", human_bytes(g.bytes) if g else "-", vols)
    run.report.table(t)


# --- restore ------------------------------------------------------------------------------


def restore_command(inv: Inventory, job: str, target: str, where: str, before: str | None) -> str:
    """The bconsole restore of ``job``'s newest backup (or the newest before ``before``)
    onto ``target`` under ``where``: every value was validated (names from the
    inventory, a safe directory, a parsed time)."""
    j = inv.backup_jobs[job]
    when = f'before="{before}"' if before else "current"
    return (f"restore client={j.client}-fd restoreclient={target}-fd fileset={job}-FS restorejob={RESTORE_JOB} "
            f"where={where} {when} select all done yes")


def restore_guard(inv: Inventory, job: str, target: str, where: str, force: bool) -> None:
    """Refuse "/" and the job's own source paths on its own client (a restore there
    would overwrite the live files) unless --force."""
    if force:
        return
    if where == "/":
        raise UserError("--to HOST:/ would restore over the host's own files; give a scratch directory, "
                        "or --force (nothing was changed)")
    j = inv.backup_jobs[job]
    if target == j.client:
        for path in job_files(j):
            p = path.rstrip("/")
            if where == p or where.startswith(p + "/") or p.startswith(where + "/"):
                raise UserError(f"--to {target}:{where} overlaps the job's own source {path} on {target}; "
                                "give a scratch directory, or --force (nothing was changed)")


def empty_dir_probe(where: str) -> str:
    """Succeeds when ``where`` does not exist or is an empty directory."""
    return f"! test -e {q(where)} || {{ test -d {q(where)} && test -z \"$(ls -A {q(where)})\"; }}"


@runbook(help={
    "job": "the inventory's job whose backup is restored, e.g. e1-fs",
    "to": "HOST:DIR: a Bacula client (a job's client) and an absolute directory the files go under",
    "before": "restore the newest backup before this time ('YYYY-MM-DD HH:MM:SS', the backup host's local time)",
    "force": "restore into a non-empty directory, into /, or over the job's own source paths",
})
def restore(run, job=None, to=None, before=None, force=False):
    """Restore the newest backup of a job (or the newest before --before) to HOST:DIR; files and bytes."""
    inv = run.inv
    job = check_job(inv, job)
    target, where = parse_target(inv, to)
    before = check_time(before)
    restore_guard(inv, job, target, where, force)
    h = director(run)
    t = run.session(target)
    run.on_one(f"backup: {target} answers", t, lambda t: t.open())
    if not force and not t.probe(empty_dir_probe(where)).ok:
        raise UserError(f"--to {target}:{where} is not an empty directory; give an empty or new one, "
                        "or --force (nothing was changed)")
    command = restore_command(inv, job, target, where, before)
    bconsole_job(run, h, f"backup: restore {job} onto {target}:{where}", command,
                 f"restore of {job} onto {target}:{where}",
                 lambda row: f"{job} restored onto {target}:{where}: {row.files} files, "
                             f"{human_bytes(row.bytes)} ({row.describe()})")


# --- drill --------------------------------------------------------------------------------


def tree_listing(root: str, paths: list[str], since: int | None = None, exclude: list[str] = ()) -> str:
    """One command on a client: `sha256  path` of every regular file under ``paths``
    (rooted at ``root``: "" for the live tree, the scratch directory for the
    restored one); with ``since``, then "== changed" and the live files (and their
    directories) modified after that epoch."""
    def pruned(top: str) -> str:  # the job's excluded paths (not in the backup) are not listed
        return "".join(f"-path {q(top + e)} -prune -o " for e in exclude)

    parts = []
    for p in paths:
        full = f"{root}{p}"
        parts.append(f"{{ test ! -e {q(full)} || find {q(full)} {pruned(root)}-type f -print0 | sort -z | "
                     f"xargs -0 -r sha256sum; }}")
    cmd = "; ".join(parts)
    if since is not None:
        cmd += "; echo '== changed'; " + "; ".join(
            f"{{ test ! -e {q(p)} || find {q(p)} {pruned('')}-newermt @{int(since)} -print; }}" for p in paths)
    return f"cd / && {{ {cmd}; }}"


def parse_sums(text: str, strip: str = "") -> dict[str, str]:
    """`sha256  path` lines -> {path: sha256}, ``strip`` taken off the paths' front."""
    out = {}
    for line in text.splitlines():
        m = re.fullmatch(r"\\?([0-9a-f]{64}) [ *](.+)", line)
        if m:
            path = m[2]
            if strip and path.startswith(strip):
                path = path[len(strip):]
            out[path] = m[1]
    return out


@dataclass
class Comparison:
    identical: int = 0
    differences: list[str] = field(default_factory=list)
    changed_since: list[str] = field(default_factory=list)


def compare_trees(source: dict[str, str], restored: dict[str, str], changed: set[str]) -> Comparison:
    """File by file: a difference on a file (or in a directory) changed since the
    backup started is reported, never counted as a failure."""
    c = Comparison()

    def since(path: str) -> bool:
        return path in changed or path.rsplit("/", 1)[0] in changed

    for path in sorted(set(source) | set(restored)):
        if path in source and path in restored:
            if source[path] == restored[path]:
                c.identical += 1
            elif since(path):
                c.changed_since.append(f"{path}: differs (changed since the backup)")
            else:
                c.differences.append(f"{path}: differs")
        elif path in source:
            (c.changed_since if since(path) else c.differences).append(
                f"{path}: missing from the restore" + (" (new since the backup)" if since(path) else ""))
        else:
            (c.changed_since if since(path) else c.differences).append(
                f"{path}: only in the restore" + (" (removed since the backup)" if since(path) else ""))
    return c


def parse_manifests(text: str) -> dict[str, dict[str, tuple[str, str]]]:
    """hastack-drill-pg's output: {"restored"|"backup"|"live": {table: (rows, md5)}}."""
    out: dict[str, dict[str, tuple[str, str]]] = {}
    current = None
    for line in text.splitlines():
        m = re.fullmatch(r"== (\w+)", line.strip())
        if m:
            current = out.setdefault(m[1], {})
            continue
        f = line.split("|")
        if current is not None and len(f) == 3:
            current[f[0]] = (f[1], f[2])
    return out


def compare_databases(m: dict[str, dict[str, tuple[str, str]]]) -> Comparison:
    """The restored database against the dump's own table list (taken in its
    snapshot): any difference is a real one. Against the live database: reported
    as changed since the backup."""
    c = Comparison()
    restored, backup, live = m.get("restored", {}), m.get("backup", {}), m.get("live", {})
    for table in sorted(set(restored) | set(backup)):
        if table not in restored:
            c.differences.append(f"table {table}: missing from the restored database")
        elif table not in backup:
            c.differences.append(f"table {table}: in the restored database, not in the dump's table list")
        elif restored[table] != backup[table]:
            c.differences.append(f"table {table}: {restored[table][0]} rows restored, {backup[table][0]} dumped"
                                 + (" (same count, other rows)" if restored[table][0] == backup[table][0] else ""))
        else:
            c.identical += 1
    for table in sorted(set(live) | set(restored)):
        if live.get(table) != restored.get(table):
            lv, rv = live.get(table, ("absent", "")), restored.get(table, ("absent", ""))
            c.changed_since.append(f"table {table}: {rv[0]} rows in the backup, {lv[0]} live now")
    return c


def drill_one(run: Run, h: HostSession, job: str) -> Comparison:
    inv = run.inv
    j = inv.backup_jobs[job]
    client = run.session(j.client)
    scratch = f"{DRILL_DIR}/{job}"
    good = parse_jobs(h.probe(catalog_query(
        f"SELECT {JOB_COLUMNS} FROM job WHERE type = 'B' AND jobstatus IN ('T', 'W') AND name = {pg_literal(job)} "
        "ORDER BY endtime DESC LIMIT 1")).stdout)
    if not good:
        raise HostFailed(f"job {job} has no good backup to restore (inv backup.run {job})")
    newest = good[0]
    start = h.probe(catalog_query(f"SELECT extract(epoch from starttime)::bigint FROM job WHERE jobid = {newest.jobid}")
                    ).stdout.strip()
    client.sh(f"rm -rf {q(scratch)} && mkdir -p {q(scratch)} && chmod 0700 {q(scratch)}",
              message=f"scratch directory {scratch}")
    try:
        row = start_and_wait(h, restore_command(inv, job, j.client, scratch, None),
                             f"restore of {job} onto {j.client}:{scratch}")
        fail_unless_ok(h, row, f"drill restore of {job}")
        result = Comparison()
        if j.paths:
            live = client.probe(tree_listing("", j.paths, int(start) if start.isdigit() else None, j.exclude),
                                timeout=3600)
            text, _, changed = live.stdout.partition("== changed\n")
            restored = client.probe(tree_listing(scratch, j.paths, exclude=j.exclude), timeout=3600)
            result = compare_trees(parse_sums(text), parse_sums(restored.stdout, strip=scratch),
                                   {p for p in changed.splitlines() if p})
        if j.pg_dump:
            dump, tables = (f"{scratch}{f}" for f in dump_files(j.pg_dump))
            r = client.probe(f"{SCRIPTS['drill_pg']} {q(dump)} {q(tables)} {q(j.pg_dump)}", timeout=3600)
            if not r.ok:
                result.differences.append(f"the dump of {j.pg_dump} does not load into a scratch database: "
                                          + "\n".join((r.stderr or r.stdout).strip().splitlines()[-10:]))
            else:
                db = compare_databases(parse_manifests(r.stdout))
                result.identical += db.identical
                result.differences += db.differences
                result.changed_since += db.changed_since
        return result
    finally:
        client.sh(f"rm -rf {q(scratch)}", message=f"scratch directory {scratch} removed")


@runbook(help={"job": "only this job (default: every job of the inventory)"})
def drill(run, job=None):
    """Restore the newest backup of each job to a scratch directory on its client and compare with the source."""
    inv = run.inv
    names = [check_job(inv, job)] if job else list(inv.backup_jobs)
    h = director(run)
    if run.check:
        run.on_one("backup: drill", h, lambda h: h.changed(f"would restore and compare: {', '.join(names)}"))
        return
    failures = []
    for name in names:
        def one(h: HostSession, name: str = name) -> None:
            c = drill_one(run, h, name)
            for line in c.changed_since[:50]:
                h.note(f"{name}: {line}")
            if c.differences:
                failures.append(f"{name}: " + "; ".join(c.differences[:20])
                                + (f"; and {len(c.differences) - 20} more" if len(c.differences) > 20 else ""))
                h.run.report.result(h.name, "failed", f"{name}: {len(c.differences)} difference(s), "
                                    f"{c.identical} identical")
            else:
                h.ok(f"{name}: {c.identical} identical, {len(c.changed_since)} changed since the backup, "
                     "no difference")

        run.on_one(f"backup: drill {name}", h, one)
    if failures:
        raise StepFailed("backup drill found differences:\n  " + "\n  ".join(failures))


ns = Collection("backup", deploy, run_, status, restore, drill)
