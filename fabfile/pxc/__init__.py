"""Galera tier (the mail cluster's database): Percona XtraDB Cluster 8.0 or
Debian's MariaDB + galera-4, chosen by `mail.galera_flavour` in the inventory.

Runbook of `inv pxc.deploy`:
1. Packages (percona: Percona's repository first), the Galera config
   (cluster name and addresses from the inventory, SST with a generated SST
   user, row-based binlog, durable commits), a systemd drop-in, and the
   Galera-aware health check the DB proxy asks on port 9200.
2. Read every node's state (live wsrep status, grastate.dat). Decide, as a
   pure function (`formation`), what the cluster needs:
   - no node has Galera history: bootstrap the first node;
   - a Primary component exists: nothing to bootstrap, stopped nodes join;
   - nodes have history but nobody is Primary: stop and tell the operator to
     run `inv pxc.bootstrap` (a deploy never re-bootstraps a cluster).
3. Start the joiners one by one, waiting for each to be Synced; a node whose
   config changed is restarted the same way (rolling, never two at once).
4. Wait for wsrep_cluster_size = N and Synced on every node.
5. Databases and users the mail tier needs, on one node (Galera replicates
   them): generated passwords (stored as mysql_native_password hashes),
   grants limited to the hosts that connect (the DB proxy hosts, webmail).

`inv pxc.bootstrap` brings a cluster back after every node went down (or after
two of three died and the survivor lost quorum); `decide()` below is its
decision, `inv pxc.status` shows the evidence.

pxc_strict_mode: Percona runs with pxc_strict_mode=ENFORCING (never switched
off); the MariaDB flavour enforces the same rules with
wsrep_mode=REQUIRED_PRIMARY_KEY,STRICT_REPLICATION, so a schema that works in
the lab works on Percona: every table needs a primary key and InnoDB. The mail
tier creates Postfixadmin's and Roundcube's tables with primary keys (see
`tables_without_primary_key`, run by `inv pxc.status`, which lists offenders).
"""

from __future__ import annotations

import hashlib
import re
import shlex
import sys
import time
from dataclasses import dataclass, field, replace

from invoke import Collection
from rich.console import Console
from rich.table import Table

from .core import HostFailed, HostSession, Run, UserError, runbook
from .core.remote import APT_UPDATE
from .core.inventory import Inventory

NULL_UUID = "00000000-0000-0000-0000-000000000000"
DATADIR = "/var/lib/mysql"
GRASTATE = f"{DATADIR}/grastate.dat"
CHECK_PORT = 9200
CHECK_CNF = "/etc/mysql/galera-check.cnf"
POLICY_RC_D = "/usr/sbin/policy-rc.d"
SYNC_TIMEOUT = 600  # seconds a joiner may take (SST of a big data set)


# --- flavours ---------------------------------------------------------------------


@dataclass(frozen=True)
class Flavour:
    name: str
    packages: tuple[str, ...]
    service: str
    daemon: str
    config_template: str
    config_path: str
    dropin_template: str
    dropin_path: str
    provider: str
    sst_method: str
    sst_user: bool  # PXC 8.0 manages its own SST user (mysql.pxc.sst.user)
    bootstrap_cmd: str
    after_bootstrap: tuple[str, ...]  # once every node joined
    bootstrap_unit: str  # unit that is active while the node runs as bootstrap node

    @property
    def start_cmd(self) -> str:
        return f"systemctl start {self.service}"

    @property
    def stop_cmd(self) -> str:
        return f"systemctl stop {self.service}"


FLAVOURS = {
    "mariadb": Flavour(
        name="mariadb",
        packages=("mariadb-server", "mariadb-client", "galera-4", "mariadb-backup", "socat", "rsync"),
        service="mariadb",
        daemon="mariadbd",
        config_template="pxc/etc/mysql/mariadb.conf.d/60-galera.cnf.j2",
        config_path="/etc/mysql/mariadb.conf.d/60-galera.cnf",
        dropin_template="pxc/etc/systemd/system/mariadb.service.d/hastack.conf.j2",
        dropin_path="/etc/systemd/system/mariadb.service.d/hastack.conf",
        provider="/usr/lib/galera/libgalera_smm.so",
        sst_method="mariabackup",
        sst_user=True,
        # galera_new_cluster starts mariadb.service with --wsrep-new-cluster once;
        # later restarts of the unit join the cluster normally.
        bootstrap_cmd="galera_new_cluster",
        after_bootstrap=(),
        bootstrap_unit="mariadb",
    ),
    "percona": Flavour(
        name="percona",
        packages=("percona-xtradb-cluster", "socat", "rsync"),
        service="mysql",
        daemon="mysqld",
        config_template="pxc/etc/mysql/mysql.conf.d/mysqld.cnf.j2",
        config_path="/etc/mysql/mysql.conf.d/mysqld.cnf",
        dropin_template="pxc/etc/systemd/system/mysql.service.d/hastack.conf.j2",
        dropin_path="/etc/systemd/system/mysql.service.d/hastack.conf",
        provider="/usr/lib/galera4/libgalera_smm.so",
        sst_method="xtrabackup-v2",
        sst_user=False,
        bootstrap_cmd="systemctl start mysql@bootstrap.service",
        # Percona's documented sequence: the first node leaves bootstrap mode
        # once the others are in, and runs as an ordinary member.
        after_bootstrap=("systemctl stop mysql@bootstrap.service", "systemctl start mysql"),
        bootstrap_unit="mysql@bootstrap.service",
    ),
}


def flavour(inv: Inventory) -> Flavour:
    return FLAVOURS[inv.mail.galera_flavour if inv.mail else "percona"]


def nodes(inv: Inventory) -> list[str]:
    return inv.with_role("galera")


def cluster_address(inv: Inventory, host: str) -> str:
    """The address a Galera node talks to its peers on: its address on the
    network it shares with the other nodes (not management)."""
    from .base import service_address

    return service_address(inv, host)


def client_addresses(inv: Inventory, roles: tuple[str, ...]) -> list[str]:
    """The addresses hosts with ``roles`` connect to the Galera nodes from."""
    from .firewall import peer_addresses

    galera = nodes(inv)
    out: list[str] = []
    for host in inv.with_role(*roles):
        for cidr in (peer_addresses(inv, host, galera[0]) if galera else []):
            addr = cidr.split("/")[0]
            if addr not in out:
                out.append(addr)
    return out


# --- databases and users -------------------------------------------------------------

APP_PRIVS = ("SELECT", "INSERT", "UPDATE", "DELETE", "CREATE", "DROP", "ALTER", "INDEX")


@dataclass(frozen=True)
class Account:
    user: str
    hosts: tuple[str, ...]
    secret: str  # name of the generated secret holding its password
    grants: dict[str, tuple[str, ...]] = field(default_factory=dict)  # schema ("*" = global) -> privileges
    why: str = ""


DATABASES = ("postfix", "roundcube")


def accounts(inv: Inventory) -> list[Account]:
    """Every MySQL account this tier manages, with the hosts it may connect from.
    The mail tier's clients go through the DB proxy, so the database sees the
    proxy hosts (mail_backend); Roundcube may also connect from the webmail hosts."""
    backends = tuple(client_addresses(inv, ("mail_backend",)))
    webmail = tuple(client_addresses(inv, ("webmail",)))
    out = []
    if flavour(inv).sst_user:
        out.append(Account("sst", ("localhost",), "pxc_sst_password",
                           {"*": ("RELOAD", "PROCESS", "LOCK TABLES", "BINLOG MONITOR")},
                           "mariabackup SST on the donor"))
    out += [
        Account("monitor", ("localhost", *backends), "pxc_monitor_password", {},
                "health checks (galera-check, ProxySQL monitor): no privileges"),
        Account("postfixadmin", backends, "mail_db_postfixadmin", {"postfix": APP_PRIVS},
                "Postfixadmin owns the postfix schema"),
        Account("postfix", backends, "mail_db_postfix", {"postfix": ("SELECT",)}, "postfix lookups"),
        Account("dovecot", backends, "mail_db_dovecot", {"postfix": ("SELECT",)}, "dovecot passdb/userdb"),
        Account("roundcube", tuple(dict.fromkeys(backends + webmail)), "mail_db_roundcube",
                {"roundcube": APP_PRIVS}, "Roundcube's own schema"),
    ]
    return out


def native_hash(password: str) -> str:
    """mysql_native_password's stored form: '*' + upper hex SHA1(SHA1(password))."""
    return "*" + hashlib.sha1(hashlib.sha1(password.encode()).digest()).hexdigest().upper()


def _identified(flav: Flavour, pw_hash: str) -> str:
    if flav.name == "mariadb":
        return f"IDENTIFIED BY PASSWORD '{pw_hash}'"
    return f"IDENTIFIED WITH mysql_native_password AS '{pw_hash}'"


STATE_SQL = """\
SELECT CONCAT('user ', user, ' ', host, ' ', plugin, ' ', authentication_string) FROM mysql.user WHERE user IN ({users});
SELECT CONCAT('db ', SCHEMA_NAME) FROM information_schema.SCHEMATA WHERE SCHEMA_NAME IN ({dbs});
SELECT CONCAT('grant ', GRANTEE, ' ', TABLE_SCHEMA, ' ', PRIVILEGE_TYPE) FROM information_schema.SCHEMA_PRIVILEGES;
SELECT CONCAT('grant ', GRANTEE, ' * ', PRIVILEGE_TYPE) FROM information_schema.USER_PRIVILEGES WHERE PRIVILEGE_TYPE <> 'USAGE';
SELECT CONCAT('table ', TABLE_SCHEMA, ' ', TABLE_NAME) FROM information_schema.TABLES WHERE TABLE_SCHEMA IN ({dbs});
"""


# Postfixadmin's upgrade.php creates `domain_admins` and `log` without a
# primary key (upgrade_1) and adds their `id` keys only later (upgrade_1837,
# upgrade_1839). In between, Percona's pxc_strict_mode=ENFORCING refuses DML on
# them (the seed's "prohibits use of DML command on a table (postfix.log)
# without an explicit primary key") and MariaDB's wsrep_mode=REQUIRED_PRIMARY_KEY
# refuses the CREATE itself. Instead of switching the mode off, the tier
# creates both tables up front in the shape upgrade.php leaves them in, id key
# included: its CREATE TABLE IF NOT EXISTS is then skipped and its
# _db_add_field('...', 'id') finds the column there. Every other Postfixadmin
# and Roundcube table is created with a primary key by the application itself.
PRECREATED_TABLES = {
    ("postfix", "domain_admins"): """\
CREATE TABLE IF NOT EXISTS `postfix`.`domain_admins` (
  `username` varchar(255) NOT NULL default '',
  `domain` varchar(255) NOT NULL default '',
  `created` datetime NOT NULL default '2000-01-01 00:00:00',
  `active` tinyint(1) NOT NULL default '1',
  `id` int(11) NOT NULL AUTO_INCREMENT,
  PRIMARY KEY (`id`),
  KEY username (`username`)
) ENGINE=InnoDB CHARACTER SET latin1 COLLATE latin1_general_ci COMMENT='Postfix Admin - Domain Admins'""",
    ("postfix", "log"): """\
CREATE TABLE IF NOT EXISTS `postfix`.`log` (
  `timestamp` datetime NOT NULL default '2000-01-01 00:00:00',
  `username` varchar(255) NOT NULL default '',
  `domain` varchar(255) NOT NULL default '',
  `action` varchar(255) NOT NULL default '',
  `data` varchar(255) NOT NULL default '',
  `id` int(11) NOT NULL AUTO_INCREMENT,
  PRIMARY KEY (`id`),
  KEY timestamp (`timestamp`)
) ENGINE=InnoDB CHARACTER SET latin1 COLLATE latin1_general_ci COMMENT='Postfix Admin - Log'""",
}


def state_sql(inv: Inventory) -> str:
    users = ", ".join(f"'{a.user}'" for a in accounts(inv))
    return STATE_SQL.format(users=users, dbs=", ".join(f"'{d}'" for d in DATABASES))


def sql_changes(inv: Inventory, state: str, password) -> list[tuple[str, str]]:
    """(statement, description) pairs that turn the accounts/databases described
    by ``state`` (STATE_SQL's output) into what `accounts()` wants. Empty when
    converged. ``password(secret_name)`` gives the generated passwords."""
    flav = flavour(inv)
    users: dict[tuple[str, str], tuple[str, str]] = {}
    dbs: set[str] = set()
    tables: set[tuple[str, str]] = set()
    grants: set[tuple[str, str, str]] = set()
    for line in state.splitlines():
        parts = line.split(" ")
        if parts[0] == "user" and len(parts) >= 4:
            users[(parts[1], parts[2])] = (parts[3], parts[4] if len(parts) > 4 else "")
        elif parts[0] == "db" and len(parts) == 2:
            dbs.add(parts[1])
        elif parts[0] == "table" and len(parts) == 3:
            tables.add((parts[1], parts[2]))
        elif parts[0] == "grant" and len(parts) >= 4:
            m = re.fullmatch(r"'(.*)'@'(.*)'", parts[1])
            if m:
                grants.add((f"{m[1]}@{m[2]}", parts[2].replace("\\_", "_"), " ".join(parts[3:])))
    out: list[tuple[str, str]] = []
    for db in DATABASES:
        if db not in dbs:
            out.append((f"CREATE DATABASE IF NOT EXISTS `{db}` CHARACTER SET utf8mb4 COLLATE utf8mb4_unicode_ci",
                        f"database {db}"))
    for (db, table), create in PRECREATED_TABLES.items():
        if (db, table) not in tables:
            out.append((create, f"table {db}.{table} with its primary key (pxc_strict_mode)"))
    managed = {a.user for a in accounts(inv)}
    wanted_hosts = {(a.user, h) for a in accounts(inv) for h in a.hosts}
    for (user, host) in sorted(users):
        if user in managed and (user, host) not in wanted_hosts:
            out.append((f"DROP USER '{user}'@'{host}'", f"drop {user}@{host} (not a host this account may connect from)"))
    for a in accounts(inv):
        pw_hash = native_hash(password(a.secret))
        for host in a.hosts:
            who = f"'{a.user}'@'{host}'"
            have = users.get((a.user, host))
            if have is None:
                out.append((f"CREATE USER {who} {_identified(flav, pw_hash)}", f"user {a.user}@{host}"))
            elif have != ("mysql_native_password", pw_hash):
                out.append((f"ALTER USER {who} {_identified(flav, pw_hash)}", f"password of {a.user}@{host}"))
            key = f"{a.user}@{host}"
            have_privs = {(s, p) for (g, s, p) in grants if g == key}
            want_privs = {(s, p) for s, privs in a.grants.items() for p in privs}
            for schema, privs in a.grants.items():
                missing = [p for p in privs if (schema, p) not in have_privs]
                if missing:
                    on = "*.*" if schema == "*" else f"`{schema}`.*"
                    out.append((f"GRANT {', '.join(missing)} ON {on} TO {who}",
                                f"grant {', '.join(missing)} on {on} to {a.user}@{host}"))
            extra: dict[str, list[str]] = {}
            for schema, priv in sorted(have_privs - want_privs):
                extra.setdefault(schema, []).append(priv)
            for schema, privs in extra.items():
                on = "*.*" if schema == "*" else f"`{schema}`.*"
                out.append((f"REVOKE {', '.join(privs)} ON {on} FROM {who}",
                            f"revoke {', '.join(privs)} on {on} from {a.user}@{host}"))
    return out


NO_PK_SQL = """\
SELECT CONCAT(t.TABLE_SCHEMA, '.', t.TABLE_NAME) FROM information_schema.TABLES t
LEFT JOIN information_schema.TABLE_CONSTRAINTS c ON c.TABLE_SCHEMA = t.TABLE_SCHEMA
  AND c.TABLE_NAME = t.TABLE_NAME AND c.CONSTRAINT_TYPE = 'PRIMARY KEY'
WHERE t.TABLE_TYPE = 'BASE TABLE' AND t.TABLE_SCHEMA IN ({dbs}) AND c.CONSTRAINT_NAME IS NULL
"""


def tables_without_primary_key_sql() -> str:
    """Tables pxc_strict_mode=ENFORCING (and wsrep_mode=REQUIRED_PRIMARY_KEY)
    would refuse DML on; `inv pxc.status` lists them."""
    return NO_PK_SQL.format(dbs=", ".join(f"'{d}'" for d in DATABASES))


# --- template variables -----------------------------------------------------------------


def template_vars(inv: Inventory, host: str, secret) -> dict:
    flav = flavour(inv)
    galera = nodes(inv)
    me = host if host in galera else (galera[0] if galera else host)
    return {
        "flavour": flav,
        "cluster_name": f"{inv.site.name}-mail",
        "cluster_nodes": [(n, cluster_address(inv, n)) for n in galera],
        "node_name": me,
        "node_address": cluster_address(inv, me),
        "sst_password": secret("pxc_sst_password") if flav.sst_user else "",
        "monitor_password": secret("pxc_monitor_password"),
        "check_port": CHECK_PORT,
        "check_cnf": CHECK_CNF,
        "daemon": flav.daemon,
        "service": flav.service,
        "cert_dir": "/etc/ssl/hastack",
    }


# --- node state and the decisions over it -------------------------------------------------


@dataclass(frozen=True)
class Node:
    """What one Galera node says about itself (the evidence `decide` works on)."""

    name: str
    reachable: bool = True
    running: bool = False  # a mysqld/mariadbd process is alive
    answering: bool = False  # ... and answers the local client
    wsrep_on: bool = True
    status: str = ""  # wsrep_cluster_status: Primary / non-Primary / Disconnected
    state: str = ""  # wsrep_local_state_comment: Synced, Donor/Desynced, Joining, ...
    size: int = 0
    uuid: str = ""  # cluster state UUID (live, or from grastate / wsrep-recover)
    seqno: int = -1
    safe_to_bootstrap: bool = False
    source: str = ""  # where uuid/seqno come from: live, grastate, wsrep-recover
    history: bool = False  # the datadir has Galera state (grastate.dat with a UUID)
    error: str = ""

    @property
    def primary(self) -> bool:
        return self.running and self.answering and self.status == "Primary"

    @property
    def synced(self) -> bool:
        return self.primary and self.state == "Synced"

    @property
    def position_known(self) -> bool:
        return bool(self.uuid) and self.uuid != NULL_UUID and self.seqno >= 0

    @property
    def position(self) -> str:
        return f"{self.uuid or '?'}:{self.seqno}"


def parse_grastate(text: str) -> dict:
    """grastate.dat -> {'uuid', 'seqno', 'safe_to_bootstrap'} (missing keys absent)."""
    out: dict = {}
    for line in text.splitlines():
        key, _, value = line.partition(":")
        key, value = key.strip(), value.strip()
        if key == "uuid":
            out["uuid"] = value
        elif key == "seqno":
            try:
                out["seqno"] = int(value)
            except ValueError:
                out["seqno"] = -1
        elif key == "safe_to_bootstrap":
            out["safe_to_bootstrap"] = value == "1"
    return out


def parse_recovered(text: str) -> tuple[str, int] | None:
    """The last 'Recovered position: UUID:SEQNO' of a --wsrep-recover log."""
    found = re.findall(r"Recovered position:\s*([0-9a-fA-F-]{36}):(-?\d+)", text)
    if not found:
        return None
    uuid, seqno = found[-1]
    return uuid, int(seqno)


def parse_status(text: str) -> dict[str, str]:
    """`mysql -NB` output of name<TAB>value lines."""
    out = {}
    for line in text.splitlines():
        if "\t" in line:
            k, v = line.split("\t", 1)
            out[k.strip().lower()] = v.strip()
    return out


@dataclass(frozen=True)
class Formation:
    """What `pxc.deploy` does with the cluster: bootstrap a new one from
    ``bootstrap`` (or not), then start ``joiners`` one by one."""

    bootstrap: str | None
    joiners: tuple[str, ...]
    primary: str | None  # a node of the Primary component (after bootstrap: the bootstrap node)


def formation(states: list[Node]) -> Formation:
    """pxc.deploy's decision. Never re-bootstraps a cluster with history."""
    unreachable = [n.name for n in states if not n.reachable]
    if unreachable:
        raise UserError(f"cannot read the state of {', '.join(unreachable)}; nothing was changed")
    primaries = [n for n in states if n.primary]
    if primaries:
        uuids = {n.uuid for n in primaries}
        if len(uuids) > 1:
            raise UserError("two Primary components with different cluster UUIDs ("
                            + ", ".join(f"{n.name}: {n.uuid}" for n in primaries) + "): split brain, "
                            "resolve by hand")
        joiners = tuple(n.name for n in states if not n.primary)
        return Formation(None, joiners, primaries[0].name)
    alive = [n.name for n in states if n.running and n.wsrep_on]
    historic = [n.name for n in states if n.history or (n.running and n.wsrep_on)]
    if historic:
        detail = ", ".join(f"{n.name}: {describe(n)}" for n in states)
        raise UserError(
            "the Galera cluster has no Primary component (" + detail + "); a deploy never bootstraps a "
            "cluster with history: run `inv pxc.bootstrap`" + (f" (alive: {', '.join(alive)})" if alive else ""))
    first = states[0].name
    return Formation(first, tuple(n.name for n in states[1:]), first)


def describe(n: Node) -> str:
    if not n.reachable:
        return "unreachable over SSH" + (f" ({n.error})" if n.error else "")
    if n.running and not n.answering:
        return "mysqld alive, not answering"
    if n.running and not n.wsrep_on:
        return "running standalone (wsrep off)"
    if n.running:
        return f"{n.status or '?'} {n.state or ''} size {n.size}".strip()
    return "stopped"


@dataclass(frozen=True)
class Decision:
    node: str
    how: str  # "new-cluster": start the node as a new cluster; "pc-bootstrap": make its live component Primary
    stop_first: tuple[str, ...]  # running non-Primary nodes stopped before the bootstrap
    start_after: tuple[str, ...]  # nodes started (one by one) after it
    reasons: tuple[str, ...]


def decide(states: list[Node], *, node: str | None = None, force: bool = False) -> Decision:
    """pxc.bootstrap's decision over the evidence: which node, how, or why not.

    - a node still part of a Primary component: refuse (nothing to bootstrap);
    - a node that cannot be reached, or whose mysqld is alive but does not
      answer: refuse, even with --force (its mysqld may be alive);
    - highest seqno wins; ties go to a node with safe_to_bootstrap: 1, then to
      a node that is still running, then inventory order;
    - a node whose position cannot be recovered (seqno -1 / null UUID) is
      never chosen; while one exists the choice is refused unless --force
      (it might have been the most advanced);
    - --node X: refused when X is behind another node or has no position.
    """
    names = [n.name for n in states]
    if node is not None and node not in names:
        raise UserError(f"--node {node}: not a Galera node (Galera nodes: {', '.join(names)})")
    reasons: list[str] = []
    primaries = [n for n in states if n.primary]
    if primaries:
        p = primaries[0]
        down = [n.name for n in states if not n.primary]
        raise UserError(
            f"refusing: the cluster is running, {p.name} is Primary (size {p.size}, {p.state}); "
            "nothing to bootstrap" + (f"; the stopped nodes ({', '.join(down)}) rejoin with `inv pxc.deploy`"
                                      if down else ""))
    hung = [n.name for n in states if n.reachable and n.running and not n.answering]
    if hung:
        raise UserError(f"refusing: mysqld on {', '.join(hung)} is alive but does not answer (starting, "
                        "joining or hung); it may still become Primary: wait, or stop it, then retry")
    unreachable = [n.name for n in states if not n.reachable]
    if unreachable:
        # Not even --force: a peer we cannot see may still be Primary (split brain).
        raise UserError(f"refusing: cannot reach {', '.join(unreachable)} over SSH, so its mysqld may "
                        "still be alive; make it reachable (if it is gone for good, replace it in the "
                        "inventory first)")
    standalone = [n.name for n in states if n.running and not n.wsrep_on]
    if standalone:
        raise UserError(f"refusing: {', '.join(standalone)} runs mysqld without Galera (wsrep off); "
                        "run `inv pxc.deploy` first")
    seen = [n for n in states if n.reachable]
    unknown = [n for n in seen if not n.position_known]
    known = [n for n in seen if n.position_known]
    if not known:
        raise UserError("refusing: no node has a recoverable position (" + ", ".join(
            f"{n.name}: {n.position}" for n in seen) + "); nothing can be bootstrapped safely")
    if unknown:
        names_unknown = ", ".join(f"{n.name} ({n.position})" for n in unknown)
        if not force:
            raise UserError(f"refusing: the position of {names_unknown} cannot be recovered; it may have "
                            "been the most advanced node. Inspect it, or use --force to choose among the others")
        reasons.append(f"--force: {names_unknown} has no position and is never chosen")
    uuids = sorted({n.uuid for n in known})
    if len(uuids) > 1:
        if not force:
            raise UserError("refusing: the nodes have different cluster UUIDs (" + ", ".join(
                f"{n.name}: {n.uuid}" for n in known) + "); they are not one cluster's history")
        reasons.append("--force: different cluster UUIDs, choosing by seqno")
    best = max(n.seqno for n in known)
    top = [n for n in known if n.seqno == best]
    if node is not None:
        chosen = next(n for n in states if n.name == node)
        if not chosen.position_known:
            raise UserError(f"refusing --node {node}: its position cannot be recovered ({chosen.position})")
        if chosen.seqno < best:
            ahead = ", ".join(f"{n.name} (seqno {n.seqno})" for n in top)
            raise UserError(f"refusing --node {node}: it is behind {ahead} (seqno {chosen.seqno}); "
                            "bootstrapping it would lose the transactions the others have")
        reasons.append(f"{node} chosen by --node; it has the highest seqno {best}")
    else:
        order = {n: i for i, n in enumerate(names)}
        chosen = sorted(top, key=lambda n: (not n.safe_to_bootstrap, not n.running, order[n.name]))[0]
        if len(top) == 1:
            reasons.append(f"{chosen.name} has the highest seqno ({best})")
        else:
            why = ("safe_to_bootstrap: 1" if chosen.safe_to_bootstrap else
                   "still running" if chosen.running else "first in the inventory")
            reasons.append(f"{', '.join(n.name for n in top)} share the highest seqno ({best}); "
                           f"{chosen.name}: {why}")
    if chosen.running:
        how = "pc-bootstrap"
        stop_first: tuple[str, ...] = ()
        reasons.append(f"{chosen.name} is alive in a non-Primary component: pc.bootstrap=YES makes it Primary")
    else:
        how = "new-cluster"
        stop_first = tuple(n.name for n in states if n.running and n.name != chosen.name)
    start_after = tuple(n.name for n in states if n.name != chosen.name and n.reachable
                        and (not n.running or n.name in stop_first))
    return Decision(chosen.name, how, stop_first, start_after, tuple(reasons))


def bootstrap_commands(flav: Flavour, decision: Decision) -> list[str]:
    """The commands run on the chosen node (after every check passed)."""
    if decision.how == "pc-bootstrap":
        return [mysql_cmd("SET GLOBAL wsrep_provider_options='pc.bootstrap=YES'")]
    return [f"sed -i 's/^safe_to_bootstrap:.*/safe_to_bootstrap: 1/' {GRASTATE}", flav.bootstrap_cmd]


# --- reading a node ---------------------------------------------------------------------

STATUS_VARS = ("wsrep_cluster_status", "wsrep_local_state_comment", "wsrep_cluster_size",
               "wsrep_last_committed", "wsrep_cluster_state_uuid", "wsrep_ready")


def mysql_cmd(sql: str, *, timeout: int = 10) -> str:
    """The local client as root over the unix socket (socket authentication)."""
    return f"mysql --connect-timeout={timeout} -NB -e {shlex.quote(sql)}"


def read_node(h: HostSession, *, recover: bool = False) -> Node:
    flav = flavour(h.inv)
    pid = h.probe(f"pidof {flav.daemon}")
    running = pid.ok
    node = Node(h.name, running=running)
    gra = h.probe(f"cat {GRASTATE}")
    g = parse_grastate(gra.stdout) if gra.ok else {}
    history = bool(g.get("uuid")) and g.get("uuid") != NULL_UUID
    node = replace(node, history=history, safe_to_bootstrap=g.get("safe_to_bootstrap", False))
    if running:
        names = ", ".join(f"'{v}'" for v in STATUS_VARS)
        r = h.probe(mysql_cmd(f"SHOW GLOBAL STATUS WHERE Variable_name IN ({names}); "
                              "SELECT 'wsrep_on', @@wsrep_on"))
        if not r.ok:
            return replace(node, answering=False, error=(r.stderr or "").strip()[-200:])
        s = parse_status(r.stdout)
        wsrep_on = s.get("wsrep_on", "0") in ("1", "ON")
        node = replace(node, answering=True, wsrep_on=wsrep_on,
                       status=s.get("wsrep_cluster_status", ""), state=s.get("wsrep_local_state_comment", ""),
                       size=int(s.get("wsrep_cluster_size", "0") or 0))
        if wsrep_on:
            node = replace(node, uuid=s.get("wsrep_cluster_state_uuid", ""),
                           seqno=int(s.get("wsrep_last_committed", "-1") or -1), source="live")
        return node
    if g:
        node = replace(node, uuid=g.get("uuid", ""), seqno=g.get("seqno", -1), source="grastate")
    if recover and history and node.seqno < 0:
        pos = recover_position(h, flav)
        if pos:
            node = replace(node, uuid=pos[0], seqno=pos[1], source="wsrep-recover")
        else:
            node = replace(node, source="wsrep-recover failed")
    return node


def recover_cmd(flav: Flavour) -> str:
    # Reads the last committed position from InnoDB (runs crash recovery, then
    # exits; no networking, no Galera connection).
    return (f"log=$(mktemp /tmp/wsrep-recover.XXXXXX) && chown mysql: $log && "
            f"{flav.daemon} --user=mysql --wsrep-recover --skip-networking --log-error=$log >/dev/null 2>&1; "
            f"grep 'Recovered position' $log; rm -f $log")


def recover_position(h: HostSession, flav: Flavour) -> tuple[str, int] | None:
    return parse_recovered(h.probe(recover_cmd(flav)).stdout)


# --- deploy -----------------------------------------------------------------------------


def _guard_inventory(run: Run) -> list[str]:
    if run.inv.mail is None:
        raise UserError(f"{run.inv.path}: no 'mail' section: the inventory has no Galera cluster")
    galera = nodes(run.inv)
    if len(galera) < 3 or len(galera) % 2 == 0:
        raise UserError(f"{run.inv.path}: role galera needs an odd number of hosts, at least 3 "
                        f"(found {len(galera)}: {', '.join(galera)})")
    selected = run.hosts("galera")
    if run.only is not None and set(selected) != set(galera):
        raise UserError("the Galera cluster is converged as a whole: --hosts must name all of "
                        f"{', '.join(galera)} or none of them")
    return galera


def converge(run: Run) -> None:
    if run.inv.mail is None or not nodes(run.inv):
        run.report.note("pxc: the inventory has no Galera cluster, skipped")
        return
    galera = _guard_inventory(run)
    if not run.hosts("galera"):
        run.report.note("pxc: no Galera host selected, skipped")
        return
    flav = flavour(run.inv)
    changed: dict[str, bool] = {}

    def install(h: HostSession) -> None:
        changed[h.name] = _install(h, flav) or _config_newer_than_server(h, flav)

    run.step("pxc: packages, config and health check", galera, install)
    states: dict[str, Node] = {}

    def read(h: HostSession) -> None:
        states[h.name] = read_node(h)
        h.ok(f"state: {describe(states[h.name])}")

    run.step("pxc: cluster state", galera, read)
    form = formation([states[n] for n in galera])
    if run.check:
        if form.bootstrap:
            run.report.note(f"pxc: would bootstrap a new cluster on {form.bootstrap}, then join "
                            f"{', '.join(form.joiners)} one by one, then create the databases and users")
            return
        if form.joiners:
            run.report.note(f"pxc: would start {', '.join(form.joiners)} to join the Primary component")
        stale = [n for n in galera if changed.get(n) and n not in form.joiners]
        if stale:
            run.report.note(f"pxc: would restart {', '.join(stale)} one at a time (config changed)")
        run.step("pxc: databases and users", [form.primary], lambda h: _accounts(h))
        return
    if form.bootstrap:
        run.step("pxc: stop the packages' standalone servers",
                 [n for n in galera if states[n].running], lambda h: h.sh(flav.stop_cmd))
        run.step(f"pxc: bootstrap a new cluster on {form.bootstrap}", [form.bootstrap],
                 lambda h: (h.sh(flav.bootstrap_cmd, message=f"{flav.bootstrap_cmd} (new cluster)"),
                            wait_for(h, lambda n: n.synced, "Primary and Synced")))
    primary = form.primary
    # Accounts first: the SST user must exist on the donor before anyone joins.
    run.step("pxc: databases and users", [primary], lambda h: _accounts(h))
    for name in form.joiners:
        st = states[name]

        def join(h: HostSession, st=st) -> None:
            if st.running:  # the package's standalone server, or a non-Primary leftover
                h.sh(flav.stop_cmd, message=f"stop {flav.service} ({describe(st)})")
            h.sh(flav.start_cmd, message=f"start {flav.service}: join the cluster", timeout=SYNC_TIMEOUT)
            wait_for(h, lambda n: n.synced, "Synced")
        run.step(f"pxc: {name} joins", [name], join)
    # Members whose config changed restart one at a time, each only while the
    # others hold the Primary component (never the last member standing).
    for name in [n for n in galera if changed.get(n) and n not in form.joiners and n != form.bootstrap]:
        def restart(h: HostSession) -> None:
            now = read_node(h)
            if now.size < 2:
                raise HostFailed(f"config changed, but it is the only member ({describe(now)}); "
                                 "a restart would take the cluster down: start the other nodes first")
            h.sh(f"systemctl restart {flav.service}", message=f"restart {flav.service} (config changed)",
                 timeout=SYNC_TIMEOUT)
            wait_for(h, lambda n: n.synced and n.size == now.size, f"Synced, size {now.size}")
        run.step(f"pxc: {name} restarts (rolling, config changed)", [name], restart)
    run.step("pxc: cluster formed", galera, lambda h: _check_formed(h, len(galera)))
    if flav.after_bootstrap:
        for name in galera:
            run.step(f"pxc: {name} leaves bootstrap mode", [name], lambda h: _leave_bootstrap(h, flav))


def _install(h: HostSession, flav: Flavour) -> bool:
    if flav.name == "percona":
        _percona_repository(h)
    else:
        # Debian's MariaDB enables mariadb.socket, which holds 3306 and makes the
        # Galera start fail ("Address already in use" during wsrep recovery).
        h.ensure("! systemctl is-enabled -q mariadb.socket 2>/dev/null && ! systemctl is-active -q mariadb.socket",
                 "systemctl disable --now mariadb.socket && systemctl mask mariadb.socket",
                 "mariadb.socket disabled (3306 belongs to mariadbd)")
    if flav.name == "percona":
        _percona_packages(h, flav)
    else:
        h.packages(flav.packages)
    changed = h.template(flav.config_template, flav.config_path, group="mysql", mode="0640")
    if h.template(flav.dropin_template, flav.dropin_path):
        h.sh("systemctl daemon-reload")
        changed = True
    # Started by the formation steps below (bootstrap node first, then joiners), not here.
    h.ensure(f"systemctl is-enabled -q {flav.service}", f"systemctl enable {flav.service}",
             f"{flav.service} enabled at boot")
    # The Galera-aware health check the DB proxy asks (HTTP 200 when Synced).
    h.template("pxc/etc/mysql/galera-check.cnf.j2", CHECK_CNF, group="nogroup", mode="0640")
    h.template("pxc/usr/local/bin/galera-check.j2", "/usr/local/bin/galera-check", mode="0755")
    units = h.template("pxc/etc/systemd/system/galera-check.socket.j2", "/etc/systemd/system/galera-check.socket")
    units |= h.template("pxc/etc/systemd/system/galera-check@.service.j2",
                        "/etc/systemd/system/galera-check@.service")
    if units:
        h.sh("systemctl daemon-reload")
    h.service("galera-check.socket", restart=units)
    return changed


def _percona_packages(h: HostSession, flav: Flavour) -> None:
    """PXC's postinst would start each node as a cluster of its own: the install
    runs under a policy-rc.d that lets no service start; the nodes are started
    by the formation steps. mysqld reads the pki tier's host key (group ssl-cert)
    for pxc-encrypt-cluster-traffic."""
    fresh = not h.probe("dpkg-query -W -f='${db:Status-Status}' percona-xtradb-cluster | grep -qx installed").ok
    if fresh:
        h.template("pxc/usr/sbin/policy-rc.d.j2", POLICY_RC_D, mode="0755")
    try:
        h.packages(flav.packages)
    finally:
        if fresh:
            h.sh(f"rm -f {POLICY_RC_D}", message=f"remove {POLICY_RC_D} (services may start again)")
    h.ensure("id -nG mysql | grep -qw ssl-cert", "usermod -aG ssl-cert mysql",
             "mysql is in group ssl-cert (reads the host key for encrypted cluster traffic)")


def _config_newer_than_server(h: HostSession, flav: Flavour) -> bool:
    """A running server started before its config was last written (say, a run
    that wrote the config and failed before the restart) needs a restart too."""
    r = h.probe(f"pid=$(pidof {flav.daemon}) && echo $(( $(date +%s) - $(ps -o etimes= -p $pid) )) "
                f"$(stat -c %Y {flav.config_path} {flav.dropin_path})")
    if not r.ok:
        return False
    started, *mtimes = (int(x) for x in r.stdout.split())
    stale = any(m > started + 1 for m in mtimes)
    if stale:
        h.note(f"{flav.daemon} runs with an older config than {flav.config_path}: restart due")
    return stale


def _percona_repository(h: HostSession) -> None:
    """Percona's repository through its own percona-release tool (Percona's
    documented setup: `percona-release setup pxc80`)."""
    h.ensure("dpkg-query -W -f='${Status}' percona-release 2>/dev/null | grep -q 'ok installed'",
             "curl -fsSLo /tmp/percona-release.deb "
             "https://repo.percona.com/apt/percona-release_latest.generic_all.deb && "
             "DEBIAN_FRONTEND=noninteractive apt-get install -y -q /tmp/percona-release.deb && "
             "rm -f /tmp/percona-release.deb",
             "percona-release installed")
    h.ensure("test -e /etc/apt/sources.list.d/percona-pxc-80-release.list",
             "percona-release enable-only pxc-80 release && percona-release enable tools release && "
             + APT_UPDATE, "Percona repository pxc-80 enabled")


def wait_for(h: HostSession, cond, what: str, timeout: float = SYNC_TIMEOUT) -> Node:
    deadline = time.monotonic() + timeout
    while True:
        node = read_node(h)
        if cond(node):
            h.ok(f"{what}: {describe(node)}")
            return node
        if time.monotonic() > deadline:
            raise HostFailed(f"not {what} after {timeout:.0f}s: {describe(node)}")
        if not node.running and time.monotonic() > deadline - timeout + 15:
            raise HostFailed(f"mysqld is not running (waiting for {what}); see `journalctl -u "
                             f"{flavour(h.inv).service}` and the error log")
        time.sleep(2)


def _check_formed(h: HostSession, size: int) -> None:
    wait_for(h, lambda n: n.synced and n.size == size, f"cluster size {size}, Synced", timeout=120)


def _leave_bootstrap(h: HostSession, flav: Flavour) -> None:
    if h.probe(f"systemctl is-active -q {flav.bootstrap_unit}").ok:
        for cmd in flav.after_bootstrap:
            h.sh(cmd, timeout=SYNC_TIMEOUT)
        wait_for(h, lambda n: n.synced, "Synced")
    else:
        h.ok(f"runs as {flav.service} (not in bootstrap mode)")


def _accounts(h: HostSession) -> None:
    inv = h.inv
    state = h.read(mysql_cmd(state_sql(inv)))
    changes = sql_changes(inv, state, h.run.secret)
    if not changes:
        h.ok(f"databases {', '.join(DATABASES)} and {len(accounts(inv))} accounts as wanted")
        return
    for stmt, what in changes:
        # The statement carries password hashes only; it goes through stdin, not the command line.
        h.sh("mysql -NB", stdin=stmt + ";\n", message=what)


# --- tasks ------------------------------------------------------------------------------


@runbook(default=True)
def deploy(run):
    """Converge the Galera cluster: packages, config, bootstrap once, joiners, users."""
    converge(run)


def gather(run: Run, galera: list[str], *, recover: bool) -> list[Node]:
    states: dict[str, Node] = {}
    unreachable: dict[str, str] = {}
    for name in galera:
        try:
            run.session(name).open()
        except UserError as exc:
            unreachable[name] = str(exc)

    def one(h: HostSession) -> None:
        states[h.name] = read_node(h, recover=recover)
        h.ok(f"{describe(states[h.name])}, position {states[h.name].position} ({states[h.name].source or '-'})")

    reachable = [n for n in galera if n not in unreachable]
    run.step("pxc: read every node" + (" (wsrep-recover where seqno is -1)" if recover else ""), reachable, one)
    return [states.get(n) or Node(n, reachable=False, error=unreachable[n]) for n in galera]


def evidence_table(states: list[Node], chosen: str | None = None) -> Table:
    """The evidence pxc.bootstrap decides on, one row per node (UUIDs shortened
    to 8 characters; the full ones are in the run's log)."""
    t = Table(title="Galera nodes" + (f" (-> {chosen}: chosen)" if chosen else ""))
    for col in ("node", "mysqld", "status", "state", "size", "uuid", "seqno", "from", "safe"):
        t.add_column(col, no_wrap=True)
    for n in states:
        t.add_row(
            ("-> " if n.name == chosen else "") + n.name,
            "unreachable" if not n.reachable else "alive" if n.running else "down",
            n.status or "-", n.state or "-", str(n.size or "-"), (n.uuid or "-")[:8], str(n.seqno),
            n.source or "-", "1" if n.safe_to_bootstrap else "0",
        )
    return t


def _print_table(run: Run, table: Table) -> None:
    # Off a terminal (logs, CI, tests) the table keeps its full width instead of 80 columns.
    console = run.report.console
    if console.is_terminal:
        console.print(table)
    else:
        Console(highlight=False, width=160, file=console.file).print(table)


@runbook(help={
    "yes": "do not ask for confirmation (needed when stdin is not a terminal)",
    "node": "bootstrap this node (refused when another node is ahead of it)",
    "force": "proceed although a node has no recoverable position (it is never chosen) or the nodes' "
             "cluster UUIDs differ; never overrides a live Primary or an unreachable peer",
})
def bootstrap(run, yes=False, node=None, force=False):
    """Bring the cluster back after every node went down (or the survivor lost quorum)."""
    galera = _guard_inventory(run)
    if node is not None and node not in galera:
        raise UserError(f"--node {node}: not a Galera node (Galera nodes: {', '.join(galera)}); nothing was changed")
    flav = flavour(run.inv)
    states = gather(run, galera, recover=True)
    try:
        decision = decide(states, node=node, force=force)
    except UserError:
        _print_table(run, evidence_table(states))
        raise
    _print_table(run, evidence_table(states, decision.node))
    run.report.log("evidence: " + "; ".join(f"{n.name} {describe(n)} {n.position} ({n.source}) "
                                            f"safe_to_bootstrap={int(n.safe_to_bootstrap)}" for n in states))
    for r in decision.reasons:
        run.report.note(r)
    plan = (f"make {decision.node}'s component Primary (pc.bootstrap)" if decision.how == "pc-bootstrap"
            else f"bootstrap a new cluster from {decision.node} ({flav.bootstrap_cmd})")
    if decision.stop_first:
        plan = f"stop {', '.join(decision.stop_first)}, then " + plan
    if decision.start_after:
        plan += f", then start {', '.join(decision.start_after)} one by one"
    run.report.note("plan: " + plan)
    if run.check:
        return
    if not yes:
        if not sys.stdin.isatty():
            raise UserError("no terminal to confirm on: re-run with --yes after reading the evidence above")
        answer = input(f"{plan}? type 'yes' to proceed: ")
        if answer.strip().lower() != "yes":
            raise UserError("not confirmed; nothing was changed")
    if decision.stop_first:
        run.step("pxc: stop the non-Primary nodes", list(decision.stop_first), lambda h: h.sh(flav.stop_cmd))
    # Last look before forcing a Primary component: every other node's mysqld must be down
    # (or, for pc.bootstrap, not part of any Primary component).
    others = [n for n in galera if n != decision.node and any(s.name == n and s.reachable for s in states)]

    def confirm_down(h: HostSession) -> None:
        now = read_node(h)
        if decision.how == "new-cluster" and now.running:
            raise HostFailed(f"mysqld is alive again ({describe(now)}); refusing to bootstrap")
        if now.primary:
            raise HostFailed(f"is Primary now ({describe(now)}); refusing to bootstrap")
        h.ok(f"confirmed: {describe(now)}")

    run.step("pxc: confirm the other nodes are down", others, confirm_down)

    def boot(h: HostSession) -> None:
        for cmd in bootstrap_commands(flav, decision):
            h.sh(cmd, timeout=SYNC_TIMEOUT)
        wait_for(h, lambda n: n.primary, "Primary")

    run.step(f"pxc: bootstrap {decision.node}", [decision.node], boot)
    for name in decision.start_after:
        def start(h: HostSession) -> None:
            h.sh(flav.start_cmd, message=f"start {flav.service}: rejoin", timeout=SYNC_TIMEOUT)
            wait_for(h, lambda n: n.synced, "Synced")
        run.step(f"pxc: {name} rejoins", [name], start)
    run.step("pxc: cluster formed", galera, lambda h: _check_formed(h, len(galera)))
    if flav.after_bootstrap and decision.how == "new-cluster":
        run.step(f"pxc: {decision.node} leaves bootstrap mode", [decision.node],
                 lambda h: _leave_bootstrap(h, flav))


@runbook
def status(run):
    """Per node: mysqld, cluster status (Primary?), state, size, seqno; tables without a primary key."""
    galera = _guard_inventory(run) if run.inv.mail else []
    states = gather(run, galera, recover=False)
    _print_table(run, evidence_table(states))
    primary = next((n for n in states if n.synced), None)
    if primary:
        out = run.session(primary.name).probe(mysql_cmd(tables_without_primary_key_sql()))
        bad = out.stdout.split()
        run.report.note("tables without a primary key (refused by pxc_strict_mode / wsrep_mode): "
                        + (", ".join(bad) if bad else "none"))


ns = Collection("pxc", deploy, bootstrap, status)
