"""The Galera tier's facts: what a node says about itself (read-only probes
and the parsing of their output), and the pure decisions over that evidence:
`formation` (what `pxc.deploy` does with the cluster), `decide` (what
`pxc.bootstrap` does), and `sql_changes` (the statements that bring the mail
cluster's databases and accounts to what `core.topology.db_accounts` wants).
Nothing here changes a host; `fabfile/pxc/__init__.py` acts on the answers.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING

from ..core import UserError
from ..core.sql import my_ident, my_literal, mysql_e, mysql_native_hash
from ..core.topology import DATABASES, db_accounts
from .flavours import Flavour, flavour

if TYPE_CHECKING:
    from ..core import HostSession
    from ..core.inventory import Inventory

NULL_UUID = "00000000-0000-0000-0000-000000000000"
DATADIR = "/var/lib/mysql"
GRASTATE = f"{DATADIR}/grastate.dat"


# --- node state ------------------------------------------------------------------------


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


# --- reading a node (probes only) ----------------------------------------------------------

STATUS_VARS = ("wsrep_cluster_status", "wsrep_local_state_comment", "wsrep_cluster_size",
               "wsrep_last_committed", "wsrep_cluster_state_uuid", "wsrep_ready")
STATUS_SQL = (f"SHOW GLOBAL STATUS WHERE Variable_name IN ({', '.join(map(my_literal, STATUS_VARS))}); "
              "SELECT 'wsrep_on', @@wsrep_on")


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
        r = h.probe(mysql_e(STATUS_SQL))
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


# --- the decisions over the evidence ---------------------------------------------------


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
        return [mysql_e("SET GLOBAL wsrep_provider_options='pc.bootstrap=YES'")]
    return [f"sed -i 's/^safe_to_bootstrap:.*/safe_to_bootstrap: 1/' {GRASTATE}", flav.bootstrap_cmd]


# --- databases and accounts ---------------------------------------------------------------


def _account(user: str, host: str) -> str:
    return f"{my_literal(user)}@{my_literal(host)}"


def _on(schema: str) -> str:
    """A GRANT's target: "*" is every schema, "schema.table" one table."""
    if schema == "*":
        return "*.*"
    if "." in schema:
        db, table = schema.split(".", 1)
        return f"{my_ident(db)}.{my_ident(table)}"
    return f"{my_ident(schema)}.*"


def _identified(flav: Flavour, pw_hash: str) -> str:
    if flav.name == "mariadb":
        return f"IDENTIFIED BY PASSWORD {my_literal(pw_hash)}"
    return f"IDENTIFIED WITH mysql_native_password AS {my_literal(pw_hash)}"


STATE_SQL = """\
SELECT CONCAT('user ', user, ' ', host, ' ', plugin, ' ', authentication_string) FROM mysql.user WHERE user IN ({users});
SELECT CONCAT('db ', SCHEMA_NAME) FROM information_schema.SCHEMATA WHERE SCHEMA_NAME IN ({dbs});
SELECT CONCAT('grant ', GRANTEE, ' ', TABLE_SCHEMA, ' ', PRIVILEGE_TYPE) FROM information_schema.SCHEMA_PRIVILEGES;
SELECT CONCAT('grant ', GRANTEE, ' * ', PRIVILEGE_TYPE) FROM information_schema.USER_PRIVILEGES WHERE PRIVILEGE_TYPE <> 'USAGE';
SELECT CONCAT('grant ', GRANTEE, ' ', TABLE_SCHEMA, '.', TABLE_NAME, ' ', PRIVILEGE_TYPE) FROM information_schema.TABLE_PRIVILEGES;
SELECT CONCAT('table ', TABLE_SCHEMA, ' ', TABLE_NAME) FROM information_schema.TABLES WHERE TABLE_SCHEMA IN ({dbs});
"""


# Two Postfixadmin tables created up front with their primary key (pxc_strict_mode
# / wsrep_mode=REQUIRED_PRIMARY_KEY): why, and how it fits the mail tier's
# upgrade.php patch, is explained once in fabfile/mail/postfixadmin.py.
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
    users = ", ".join(my_literal(a.user) for a in db_accounts(inv))
    return STATE_SQL.format(users=users, dbs=", ".join(map(my_literal, DATABASES)))


def sql_changes(inv: Inventory, state: str, password) -> list[tuple[str, str]]:
    """(statement, description) pairs that turn the accounts/databases described
    by ``state`` (STATE_SQL's output) into what `db_accounts()` wants. Empty when
    converged. ``password(secret_name)`` gives the generated passwords."""
    flav = flavour(inv)
    accounts = db_accounts(inv)
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
            out.append((f"CREATE DATABASE IF NOT EXISTS {my_ident(db)} "
                        "CHARACTER SET utf8mb4 COLLATE utf8mb4_unicode_ci", f"database {db}"))
    for (db, table), create in PRECREATED_TABLES.items():
        if (db, table) not in tables:
            out.append((create, f"table {db}.{table} with its primary key (pxc_strict_mode)"))
    managed = {a.user for a in accounts}
    wanted_hosts = {(a.user, h) for a in accounts for h in a.hosts}
    for (user, host) in sorted(users):
        if user in managed and (user, host) not in wanted_hosts:
            out.append((f"DROP USER {_account(user, host)}",
                        f"drop {user}@{host} (not a host this account may connect from)"))
    for a in accounts:
        pw_hash = mysql_native_hash(password(a.secret))
        for host in a.hosts:
            who = _account(a.user, host)
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
                if "." in schema and tuple(schema.split(".", 1)) not in tables:
                    continue  # a table grant waits for its table: table_grants_waiting() names it
                if missing:
                    on = _on(schema)
                    out.append((f"GRANT {', '.join(missing)} ON {on} TO {who}",
                                f"grant {', '.join(missing)} on {on} to {a.user}@{host}"))
            extra: dict[str, list[str]] = {}
            for schema, priv in sorted(have_privs - want_privs):
                extra.setdefault(schema, []).append(priv)
            for schema, privs in extra.items():
                on = _on(schema)
                out.append((f"REVOKE {', '.join(privs)} ON {on} FROM {who}",
                            f"revoke {', '.join(privs)} on {on} from {a.user}@{host}"))
    return out


def table_grants_waiting(inv: Inventory, state: str) -> list[str]:
    """"schema.table" grants of db_accounts() whose table does not exist yet (in
    STATE_SQL's output): MySQL refuses a grant on a missing table. The mail tier
    makes Postfixadmin's tables; deploy.mail runs the accounts step again after it."""
    tables = {tuple(line.split(" ")[1:3]) for line in state.splitlines()
              if line.startswith("table ") and len(line.split(" ")) == 3}
    return sorted({schema for a in db_accounts(inv) for schema in a.grants
                   if "." in schema and tuple(schema.split(".", 1)) not in tables})


NO_PK_SQL = """\
SELECT CONCAT(t.TABLE_SCHEMA, '.', t.TABLE_NAME) FROM information_schema.TABLES t
LEFT JOIN information_schema.TABLE_CONSTRAINTS c ON c.TABLE_SCHEMA = t.TABLE_SCHEMA
  AND c.TABLE_NAME = t.TABLE_NAME AND c.CONSTRAINT_TYPE = 'PRIMARY KEY'
WHERE t.TABLE_TYPE = 'BASE TABLE' AND t.TABLE_SCHEMA IN ({dbs}) AND c.CONSTRAINT_NAME IS NULL
"""


def tables_without_primary_key_sql() -> str:
    """Tables pxc_strict_mode=ENFORCING (and wsrep_mode=REQUIRED_PRIMARY_KEY)
    would refuse DML on; `inv pxc.status` lists them."""
    return NO_PK_SQL.format(dbs=", ".join(map(my_literal, DATABASES)))


