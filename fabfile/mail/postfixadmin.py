"""Postfixadmin's schema and rows: its upgrade.php made safe for Galera, the
rows the ops write (the same ones its web UI writes), the password hashes,
and the database reached through the DB proxy from a back end."""

from __future__ import annotations

import re
from typing import TYPE_CHECKING

from ..core import HostFailed, UserError, q, topology
from ..core.secrets import stable_bcrypt
from ..core.sql import my_literal, mysql, mysql_e

if TYPE_CHECKING:
    from ..core import HostSession

PFA_DIR = "/usr/share/postfixadmin"
PFA_CLIENT_CNF = "/etc/postfixadmin/hastack-client.cnf"
DB_NAME = topology.MAIL_DB

# --- Postfixadmin's primary keys under Galera -------------------------------------------
#
# Postfixadmin (Debian 12: 3.3.13) creates `domain_admins` and `log` without a
# primary key: upgrade_5_mysql() (upgrade_1..4_mysql return at once) runs
# CREATE TABLE IF NOT EXISTS with only a KEY; their `id` primary keys come much
# later, through _db_add_field() (upgrade_1839 for log, upgrade_1844 for
# domain_admins), which adds a column only when `SHOW COLUMNS ... LIKE` does
# not find it. Galera refuses that on both flavours:
# - MariaDB (wsrep_mode=REQUIRED_PRIMARY_KEY) checks the statement, not the
#   table: a CREATE TABLE without a primary key fails with ERROR 4165 "Galera
#   replication not supported" even with IF NOT EXISTS and the table already
#   there (tried on 10.11.19, Debian 12's). Writes to a table without a
#   primary key only get a warning there.
# - Percona (pxc_strict_mode=ENFORCING) lets the CREATE through and refuses
#   DML on the table ("prohibits use of DML command on a table ... without an
#   explicit primary key").
# So the schema step runs a copy of upgrade.php whose two CREATE TABLEs carry
# an `id` primary key (`patch_upgrade`): the only thing that gets MariaDB past
# upgrade_5, and on Percona the tables have their key before any row is
# written. The later _db_add_field('...', 'id') then find the column and skip.
# The pxc tier also creates both tables up front in the shape upgrade.php
# leaves them in (pxc PRECREATED_TABLES): the patched CREATE IF NOT EXISTS is
# then a no-op. Pre-creating alone would not do on MariaDB (the unpatched
# CREATE is refused although the table exists). The copy is made from the
# installed file each time (never an edited package file), and
# `patch_upgrade` refuses a file it does not recognise.
PK_TABLES = ("domain_admins", "log")
UPGRADE_COPY = "/var/lib/hastack/postfixadmin-upgrade.php"
_CREATE_RE = re.compile(r"""(CREATE TABLE \{IF_NOT_EXISTS\} " \. table_by_key\('(""" + "|".join(PK_TABLES)
                        + r""")'\) \. " \()\n""")


def patch_upgrade(php: str) -> str:
    """upgrade.php with an `id` primary key in the CREATE TABLEs of PK_TABLES."""
    out, n = _CREATE_RE.subn(lambda m: m[1] + "\n            `id` {AUTOINCREMENT} {PRIMARY},\n", php)
    if n != len(PK_TABLES):
        raise UserError(f"Postfixadmin's upgrade.php is not the one this task knows (found {n} of the "
                        f"{len(PK_TABLES)} CREATE TABLEs it gives a primary key); schema not touched")
    return out


NO_PK_SQL = (
    "SELECT t.TABLE_NAME FROM information_schema.TABLES t LEFT JOIN information_schema.TABLE_CONSTRAINTS c "
    "ON c.TABLE_SCHEMA = t.TABLE_SCHEMA AND c.TABLE_NAME = t.TABLE_NAME AND c.CONSTRAINT_TYPE = 'PRIMARY KEY' "
    f"WHERE t.TABLE_SCHEMA = {my_literal(DB_NAME)} AND t.TABLE_TYPE = 'BASE TABLE' AND c.CONSTRAINT_NAME IS NULL;"
)

# --- hashes -------------------------------------------------------------------------------

def setup_password_hash(password: str) -> str:
    """PHP's password_hash() form of the setup password (bcrypt, $2y$), with a
    salt derived from the password so the rendered config is stable across runs."""
    return stable_bcrypt(password, "postfixadmin-setup").replace("$2b$", "$2y$", 1)


def mailbox_hash(password: str) -> str:
    """A mailbox/admin password as Postfixadmin stores it with
    encrypt=dovecot:BLF-CRYPT and dovecot verifies it: {BLF-CRYPT}$2y$..."""
    import bcrypt  # here, not at the top: `inv --list` hashes nothing

    return "{BLF-CRYPT}" + bcrypt.hashpw(password.encode(), bcrypt.gensalt(10)).decode().replace("$2b$", "$2y$", 1)


# --- rows (what Postfixadmin's web UI writes) ----------------------------------------------


def admin_sql(admin: str, pw_hash: str) -> str:
    a = my_literal(admin)
    return (f"INSERT INTO admin (username, password, superadmin, created, modified, active) "
            f"VALUES ({a}, {my_literal(pw_hash)}, 1, NOW(), NOW(), 1) "
            f"ON DUPLICATE KEY UPDATE superadmin = 1, active = 1, modified = NOW();\n"
            f"INSERT INTO domain_admins (username, domain, created, active) SELECT {a}, 'ALL', NOW(), 1 "
            f"FROM DUAL WHERE NOT EXISTS (SELECT 1 FROM domain_admins WHERE username = {a} AND domain = 'ALL');")


def domain_sql(domain: str, description: str = "") -> str:
    return ("INSERT INTO domain (domain, description, aliases, mailboxes, maxquota, quota, transport, backupmx, "
            f"created, modified, active) VALUES ({my_literal(domain)}, {my_literal(description)}, 0, 0, 0, 0, "
            "'virtual', 0, NOW(), NOW(), 1);\n" + log_sql(domain, "create_domain", domain))


def mailbox_sql(local: str, domain: str, pw_hash: str, name: str = "") -> str:
    address = f"{local}@{domain}"
    a = my_literal(address)
    return (
        "INSERT INTO mailbox (username, password, name, maildir, quota, local_part, domain, created, modified, "
        f"active) VALUES ({a}, {my_literal(pw_hash)}, {my_literal(name)}, {my_literal(f'{domain}/{local}/')}, 0, "
        f"{my_literal(local)}, {my_literal(domain)}, NOW(), NOW(), 1);\n"
        f"INSERT INTO alias (address, goto, domain, created, modified, active) VALUES ({a}, {a}, "
        f"{my_literal(domain)}, NOW(), NOW(), 1);\n" + log_sql(domain, "create_mailbox", address))


def alias_sql(address: str, domain: str, goto: list[str]) -> str:
    return (f"INSERT INTO alias (address, goto, domain, created, modified, active) VALUES ({my_literal(address)}, "
            f"{my_literal(','.join(goto))}, {my_literal(domain)}, NOW(), NOW(), 1);\n"
            + log_sql(domain, "create_alias", f"{address} -> {','.join(goto)}"))


def alias_goto_sql(address: str, domain: str, goto: list[str]) -> str:
    """Point an existing alias elsewhere (and make it active)."""
    return (f"UPDATE alias SET goto = {my_literal(','.join(goto))}, active = 1, modified = NOW() "
            f"WHERE address = {my_literal(address)};\n"
            + log_sql(domain, "edit_alias", f"{address} -> {','.join(goto)}"))


def password_sql(address: str, domain: str, pw_hash: str) -> str:
    return (f"UPDATE mailbox SET password = {my_literal(pw_hash)}, modified = NOW() "
            f"WHERE username = {my_literal(address)};\n" + log_sql(domain, "edit_password", address))


def log_sql(domain: str, action: str, data: str) -> str:
    return ("INSERT INTO log (timestamp, username, domain, action, data) VALUES "
            f"(NOW(), 'hastack (inv mail)', {my_literal(domain)}, {my_literal(action)}, {my_literal(data)});")


# --- the database, from a back end through the proxy ----------------------------------------


def client(host: str | None = None) -> str:
    """The mysql client as Postfixadmin's account (its client file), on the postfix schema."""
    return mysql(defaults_file=PFA_CLIENT_CNF, host=host, database=DB_NAME, timeout=5)


def db_host(h: HostSession) -> str:
    """The first of the proxy's addresses that answers now (asked once per run and host)."""
    def find() -> str:
        candidates = topology.db_proxy_addresses(h.inv, h.name)
        for addr in candidates:
            if h.probe(mysql_e("SELECT 1", defaults_file=PFA_CLIENT_CNF, host=addr, database=DB_NAME,
                               timeout=5)).ok:
                return addr
        raise HostFailed("the database proxy answers on none of " + ", ".join(candidates)
                         + " (is `inv dbproxy.deploy` done, is the Galera cluster up?)")
    return h.memo("mail_db_host", find)


def query(h: HostSession, sql: str) -> list[list[str]]:
    r = h.probe(client(db_host(h)), stdin=sql)
    if not r.ok:
        raise HostFailed(f"query on the Postfixadmin database failed: {(r.stderr or r.stdout).strip()}")
    return [line.split("\t") for line in r.stdout.splitlines() if line]


def query_many(h: HostSession, queries: dict[str, str]) -> dict[str, list[list[str]]]:
    """Several SELECTs in one round trip: each row comes back under its query's name."""
    sql = "\n".join(f"SELECT {my_literal(name)}, hastack_q.* FROM ({text.strip().rstrip(';')}) AS hastack_q;"
                    for name, text in queries.items())
    found: dict[str, list[list[str]]] = {name: [] for name in queries}
    for row in query(h, sql):
        if row[0] in found:
            found[row[0]].append(row[1:])
    return found


def write(h: HostSession, sql: str, message: str) -> None:
    h.sh(client(db_host(h)), stdin="START TRANSACTION;\n" + sql + "\nCOMMIT;\n", message=message)


def domain_query(domain: str) -> str:
    return f"SELECT domain FROM domain WHERE domain = {my_literal(domain)};"


def domain_exists(h: HostSession, domain: str) -> bool:
    return bool(query(h, domain_query(domain)))


def schema_version(h: HostSession) -> tuple[int | None, int]:
    """(version in the database or None, the version Postfixadmin's upgrade.php brings it to)."""
    target = h.read(f"grep -o 'function upgrade_[0-9]*' {PFA_DIR}/public/upgrade.php | cut -d_ -f2 | sort -n | tail -1")
    r = h.probe(client(db_host(h)), stdin="SELECT value FROM config WHERE name = 'version';")
    have = int(r.stdout.strip()) if r.ok and r.stdout.strip().isdigit() else None
    return have, int(target.strip())


def run_upgrade(h: HostSession) -> None:
    """The patched copy of upgrade.php, run once; a HostFailed when it stops short."""
    patched = patch_upgrade(h.read(f"cat {PFA_DIR}/public/upgrade.php"))
    h.directory("/var/lib/hastack", mode="0755")
    h.put(patched, UPGRADE_COPY, mode="0644")
    # upgrade.php's require_once('common.php') resolves from the working directory
    r = h.probe(f"cd {PFA_DIR}/public && HASTACK_DB_HOST={q(db_host(h))} php {UPGRADE_COPY}")
    have, target = schema_version(h)
    if not r.ok or have != target or "Invalid query" in r.stdout:
        raise HostFailed(f"Postfixadmin's upgrade.php stopped at version {have} of {target}:\n"
                         + (r.stdout + r.stderr).strip()[-1500:])
    h.changed(f"Postfixadmin schema upgraded to version {target} (upgrade.php)")
