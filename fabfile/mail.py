"""Mail tier (seed 000, on the mail_backend hosts): postfix + dovecot on the
Postfixadmin schema, and Postfixadmin itself (nginx + php-fpm).

Runbook of `inv mail.deploy`:
1. Packages (debconf told first: no dbconfig-common database for
   Postfixadmin, no postfix wizard), the vmail user (fixed uid/gid 5000, the
   same on every node since they share the replicated mail store) and the mail
   root (the DRBD mountpoint in production, a plain directory with
   `mail.storage: none`).
2. postfix: main.cf, master.cf (submission 587: STARTTLS required, SMTP AUTH
   through dovecot's socket; smtpd 25 relays for nobody but localhost) and
   three mysql: maps on Postfixadmin's tables (domains, mailboxes, aliases)
   reached through the database proxy on this host's mail-network address.
   `postfix check` runs on the new files before they stay.
3. dovecot: one dovecot.conf (IMAP with STARTTLS and IMAPS with our CA's
   certificate, LMTP and auth sockets inside postfix's spool) and the SQL
   passdb/userdb file; `doveconf -n` checks the new file first.
4. Postfixadmin: its database settings, a setup password hash (bcrypt of a
   generated secret; the web setup page is not served at all), nginx + php-fpm.
5. Services: in a Pacemaker cluster (`crm_mon -1` answers) postfix and dovecot
   belong to Pacemaker and are only reloaded when running; otherwise they are
   enabled and started here.
6. Schema (once, on one back end): the two Postfixadmin tables that have no
   primary key upstream (domain_admins, log) are created first with one, so
   the schema works under pxc_strict_mode=ENFORCING / wsrep_mode=
   REQUIRED_PRIMARY_KEY; then Postfixadmin's own upgrade.php brings the schema
   to its version; then the mail domain and a superadmin (admin@DOMAIN, its
   password a generated secret `mail_postfixadmin_admin_password`).

Ops tasks (`mail.add-domain`, `add-mailbox`, `add-alias`, `set-password`,
`list`) write Postfixadmin's schema directly (the same rows its web UI writes,
passwords as dovecot `{BLF-CRYPT}` hashes), on the back end that holds the mail
VIP, or the first one that answers when no VIP is up. Every input is checked
before anything is written; a refused command changes nothing.
"""

from __future__ import annotations

import base64
import getpass
import hashlib
import re
import shlex
import sys
from dataclasses import dataclass

import bcrypt
from invoke import Collection

from . import dbproxy, pki
from .core import HostFailed, HostSession, Run, UserError, runbook
from .core.inventory import Inventory

ROLE = "mail_backend"
VMAIL_UID = 5000
MAIL_ROOT = "/var/vmail"
PFA_DIR = "/usr/share/postfixadmin"
PFA_CLIENT_CNF = "/etc/postfixadmin/hastack-client.cnf"
DB_NAME = "postfix"
PHP_FPM = "php8.2-fpm"
PACKAGES = [
    "postfix", "postfix-mysql",
    "dovecot-core", "dovecot-imapd", "dovecot-lmtpd", "dovecot-mysql",
    "nginx", "php-fpm", "php-cli", "php-mysql", "php-mbstring", "php-imap", "postfixadmin",
    "mariadb-client",
]
DEBCONF = [
    "postfixadmin postfixadmin/dbconfig-install boolean false",
    "postfix postfix/main_mailer_type select No configuration",
]
POSTFIX_MAPS = ("domains", "mailboxes", "aliases")
SECRETS = {
    "postfix": "mail_db_postfix",          # the same names fabfile/pxc.py gives the accounts
    "dovecot": "mail_db_dovecot",
    "postfixadmin": "mail_db_postfixadmin",
    "setup": "mail_postfixadmin_setup_password",
    "admin": "mail_postfixadmin_admin_password",
}

# Postfixadmin's upgrade.php creates two tables without a primary key
# (domain_admins and log, in upgrade_5_mysql). Galera refuses them: Percona's
# pxc_strict_mode=ENFORCING refuses writes to them, MariaDB's
# wsrep_mode=REQUIRED_PRIMARY_KEY refuses the CREATE TABLE itself, even when the
# table exists. So the task runs a copy of upgrade.php in which those two
# CREATE TABLEs get an `id` primary key; the later ALTERs touch only the named
# columns and apply unchanged. The copy is made from the installed file each
# time (never an edited package file), and `patch_upgrade` refuses a file it
# does not recognise.
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


# --- addresses ----------------------------------------------------------------------------

LOCAL_RE = re.compile(r"^[a-z0-9!#$%&*+/=?^_`{|}~-]+(\.[a-z0-9!#$%&*+/=?^_`{|}~-]+)*$")
LABEL_RE = re.compile(r"^[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?$")
SAFE_LOCAL_RE = re.compile(r"^[a-z0-9._+-]+$")  # what we accept (a subset: no quoting in SQL or shells)


def check_domain(domain: str) -> str:
    """The domain in lower case; a UserError says what is wrong with it."""
    d = (domain or "").strip().lower().rstrip(".")
    if not d:
        raise UserError("empty domain name; nothing was changed")
    labels = d.split(".")
    if len(d) > 253 or len(labels) < 2 or not all(LABEL_RE.match(x) for x in labels) or labels[-1].isdigit():
        raise UserError(f"{domain!r} is not a valid domain name (labels of letters, digits and '-', "
                        "separated by dots, e.g. example.org); nothing was changed")
    return d


def parse_address(address: str) -> tuple[str, str]:
    """(local part, domain) of a mailbox or alias address, lower case; a
    UserError names what is wrong."""
    a = (address or "").strip()
    if a.count("@") != 1:
        raise UserError(f"{address!r} is not an e-mail address (LOCAL@DOMAIN); nothing was changed")
    local, domain = a.lower().split("@")
    if not local or len(local) > 64 or not SAFE_LOCAL_RE.match(local) or not LOCAL_RE.match(local):
        raise UserError(f"{address!r}: the part before '@' must be letters, digits and . _ + -, "
                        "not starting or ending with a dot nor holding '..'; nothing was changed")
    try:
        domain = check_domain(domain)
    except UserError:
        raise UserError(f"{address!r}: {domain!r} is not a valid domain name; nothing was changed") from None
    return local, domain


def check_password(password: str | None) -> str:
    if not password:
        raise UserError("empty password refused; nothing was changed")
    if password != password.strip() or "\n" in password:
        raise UserError("the password may not start or end with white space or hold a newline; nothing was changed")
    if len(password) < 8:
        raise UserError("the password needs at least 8 characters; nothing was changed")
    return password


# --- hashes -------------------------------------------------------------------------------

_BCRYPT_ALPHABET = "./ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789"


def _bcrypt_salt(seed: bytes, rounds: int = 10) -> bytes:
    raw = base64.b64encode(seed[:16]).decode().rstrip("=")
    std = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/"
    salt = raw.translate(str.maketrans(std, _BCRYPT_ALPHABET))[:22]
    # the last character carries only 2 bits: keep it canonical
    salt = salt[:21] + _BCRYPT_ALPHABET[_BCRYPT_ALPHABET.index(salt[21]) & 0x30]
    return f"$2b${rounds:02d}${salt}".encode()


def setup_password_hash(password: str) -> str:
    """PHP's password_hash() form of the setup password (bcrypt, $2y$), with a
    salt derived from the password so the rendered config is stable across runs."""
    salt = _bcrypt_salt(hashlib.sha256(b"postfixadmin-setup:" + password.encode()).digest())
    return bcrypt.hashpw(password.encode(), salt).decode().replace("$2b$", "$2y$", 1)


def mailbox_hash(password: str) -> str:
    """A mailbox/admin password as Postfixadmin stores it with
    encrypt=dovecot:BLF-CRYPT and dovecot verifies it: {BLF-CRYPT}$2y$..."""
    return "{BLF-CRYPT}" + bcrypt.hashpw(password.encode(), bcrypt.gensalt(10)).decode().replace("$2b$", "$2y$", 1)


# --- inventory ----------------------------------------------------------------------------


def backends(inv: Inventory) -> list[str]:
    return inv.with_role(ROLE)


def mail_names(inv: Inventory) -> list[str]:
    vip = inv.vips.get("mail")
    return list(vip.names) if vip is not None else []


def mail_hostname(inv: Inventory, host: str) -> str:
    """The name postfix greets with: the mail VIP's first name, the same on every node."""
    names = mail_names(inv)
    return names[0] if names else inv.fqdn(host)


def db_addresses(inv: Inventory, host: str) -> list[str]:
    """Where this back end reaches the database proxy: the dbproxy VIP (where
    Pacemaker runs the proxy, maybe on another node) first, then the host's own
    address on that network (the proxy binds it too; before the cluster
    exists the proxy runs on every back end and the VIP is nowhere).
    postfix and dovecot are given both and skip the one that does not answer."""
    binds = dbproxy.bind_addresses(inv, host)  # [own, VIP] or [own]
    return list(dict.fromkeys(binds[1:] + binds[:1]))


def template_vars(inv: Inventory, host: str, secret) -> dict:
    vip = inv.vips.get("mail")
    return {
        "domain": inv.mail.domain,
        "myhostname": mail_hostname(inv, host),
        "vip_address": str(vip.address) if vip is not None else "",
        "db_hosts": db_addresses(inv, host),
        "db_host": db_addresses(inv, host)[0],
        "postfix_hosts": " ".join(f"inet:{a}:{dbproxy.port(inv)}" for a in db_addresses(inv, host)),
        "db_port": dbproxy.port(inv),
        "db_name": DB_NAME,
        "db_password": {k: secret(SECRETS[k]) for k in ("postfix", "dovecot", "postfixadmin")},
        "setup_hash": setup_password_hash(secret(SECRETS["setup"])),
        "cert": pki.cert_path(host),
        "key": pki.key_path(host),
        "ca": pki.CA_FILE,
        "mail_root": MAIL_ROOT,
        "vmail_uid": VMAIL_UID,
        "maps": POSTFIX_MAPS,
        "pfa_dir": PFA_DIR,
        "php_fpm_socket": f"/run/php/{PHP_FPM}.sock",
        "server_names": [inv.fqdn(host), host, *mail_names(inv)],
    }


# --- runbook ------------------------------------------------------------------------------


def converge(run: Run) -> None:
    if run.inv.mail is None:
        run.report.note("mail: the inventory has no mail cluster, skipped")
        return
    hosts = [h for h in backends(run.inv) if h in run.hosts()]
    run.step("mail: packages, vmail user, mail root", hosts, _install)
    changed: dict[str, dict[str, bool]] = {}
    run.step("mail: postfix and dovecot config", hosts, lambda h: changed.__setitem__(h.name, _configure(h)))
    run.step("mail: Postfixadmin (config, nginx + php-fpm, no setup page)", hosts, _postfixadmin)
    run.step("mail: services", hosts, lambda h: _services(h, changed.get(h.name, {})))
    if hosts:
        first = _answering(run, hosts)
        run.step("mail: Postfixadmin schema, domain and superadmin", [first.name], _schema)


def _install(h: HostSession) -> None:
    h.ensure(
        "debconf-show postfixadmin 2>/dev/null | grep -q 'dbconfig-install: false'",
        "printf '%s\\n' " + " ".join(shlex.quote(x) for x in DEBCONF) + " | debconf-set-selections",
        "debconf: no dbconfig-common database for Postfixadmin, no postfix wizard",
    )
    h.packages(PACKAGES)
    have = h.probe("id -u vmail && id -g vmail")
    if have.ok and have.stdout.split() != [str(VMAIL_UID)] * 2:
        raise HostFailed(f"user vmail exists with uid/gid {'/'.join(have.stdout.split())}; the mail tier needs "
                         f"{VMAIL_UID}/{VMAIL_UID} on every back end (they share the mail store): fix it by hand")
    h.ensure(f"getent group vmail | grep -q ':{VMAIL_UID}:'", f"groupadd -g {VMAIL_UID} vmail", f"group vmail ({VMAIL_UID})")
    h.ensure(f"getent passwd vmail | grep -q ':{VMAIL_UID}:{VMAIL_UID}:'",
             f"useradd -r -u {VMAIL_UID} -g vmail -d {MAIL_ROOT} -s /usr/sbin/nologin -M vmail",
             f"user vmail ({VMAIL_UID})")
    h.directory(MAIL_ROOT, owner="vmail", group="vmail", mode="0770")


def _configure(h: HostSession) -> dict[str, bool]:
    pf = False
    for m in POSTFIX_MAPS:
        pf |= h.template(f"mail/etc/postfix/mysql-virtual-{m}.cf.j2", f"/etc/postfix/mysql-virtual-{m}.cf",
                         group="postfix", mode="0640")
    pf |= h.template("mail/etc/postfix/main.cf.j2", "/etc/postfix/main.cf", validate="postfix check")
    pf_master = h.template("mail/etc/postfix/master.cf.j2", "/etc/postfix/master.cf", validate="postfix check")
    # After main.cf: postfix installed unconfigured (no wizard) has none, and newaliases reads it.
    if h.template("mail/etc/aliases.j2", "/etc/aliases") or not h.probe("test /etc/aliases.db -nt /etc/aliases").ok:
        h.sh("newaliases", message="/etc/aliases.db rebuilt (newaliases)")
    dv = h.template("mail/etc/dovecot/dovecot-sql.conf.ext.j2", "/etc/dovecot/dovecot-sql.conf.ext",
                    group="dovecot", mode="0640")
    dv |= h.template("mail/etc/dovecot/dovecot.conf.j2", "/etc/dovecot/dovecot.conf",
                     validate="doveconf -n -c {} >/dev/null")
    return {"postfix": pf, "postfix_restart": pf_master, "dovecot": dv}


def _postfixadmin(h: HostSession) -> None:
    cfg = h.template("mail/etc/postfixadmin/dbconfig.inc.php.j2", "/etc/postfixadmin/dbconfig.inc.php",
                     group="www-data", mode="0640", validate="php -l {} >/dev/null")
    cfg |= h.template("mail/etc/postfixadmin/config.local.php.j2", "/etc/postfixadmin/config.local.php",
                      group="www-data", mode="0640", validate="php -l {} >/dev/null")
    h.template("mail/etc/postfixadmin/hastack-client.cnf.j2", PFA_CLIENT_CNF, mode="0600")
    site = h.template("mail/etc/nginx/sites-available/postfixadmin.j2", "/etc/nginx/sites-available/postfixadmin")
    h.ensure("test \"$(readlink /etc/nginx/sites-enabled/postfixadmin)\" = /etc/nginx/sites-available/postfixadmin",
             "ln -sfn /etc/nginx/sites-available/postfixadmin /etc/nginx/sites-enabled/postfixadmin",
             "nginx site postfixadmin enabled")
    h.ensure("! test -e /etc/nginx/sites-enabled/default", "rm -f /etc/nginx/sites-enabled/default",
             "nginx default site disabled")
    h.ensure("test -d /var/cache/postfixadmin/templates_c && "
             "test \"$(stat -c %U /var/cache/postfixadmin/templates_c)\" = www-data",
             "install -d -o www-data -g www-data -m 0750 /var/cache/postfixadmin/templates_c",
             "/var/cache/postfixadmin/templates_c writable by php-fpm")
    if site and not h.run.check:
        r = h.probe("nginx -t")
        if not r.ok:
            raise HostFailed(f"`nginx -t` refused the new site:\n{r.stderr.strip()}")
    h.service(PHP_FPM, restart=cfg)
    h.service("nginx", reload=site)


def in_cluster(h: HostSession) -> bool:
    """Pacemaker owns postfix and dovecot on a host that is in a cluster."""
    return h.probe("command -v crm_mon >/dev/null && crm_mon -1 >/dev/null 2>&1").ok


def _services(h: HostSession, changed: dict[str, bool]) -> None:
    if in_cluster(h):
        # Pacemaker runs systemd:postfix@- (the daemon; postfix.service is a
        # oneshot wrapper) and systemd:dovecot: reload where it runs them.
        for name, unit in (("postfix", "postfix@-"), ("dovecot", "dovecot")):
            if (changed.get(name) or changed.get(f"{name}_restart")) and h.probe(f"systemctl is-active -q {unit}").ok:
                h.sh(f"systemctl reload {unit}", message=f"{name} reloaded (Pacemaker owns it)")
            else:
                h.ok(f"{name}: left to Pacemaker")
        return
    # Debian's postfix.service has ConditionPathExists=/etc/postfix/main.cf: at
    # install time (no main.cf yet) systemd skipped it, and HostSession.service
    # would take that for "does not apply here". main.cf exists now: start it.
    if not h.probe("systemctl is-active -q postfix").ok:
        h.sh("systemctl start postfix")
    h.service("postfix", restart=changed.get("postfix_restart", False), reload=changed.get("postfix", False))
    # restart, not reload: dovecot makes its listeners in postfix's spool at start
    h.service("dovecot", restart=changed.get("dovecot", False))


# --- database helpers (run on a back end, through the proxy) ---------------------------------


def sql_quote(value: str) -> str:
    return "'" + value.replace("\\", "\\\\").replace("'", "\\'") + "'"


def mysql_cmd(database: str = DB_NAME, host: str | None = None) -> str:
    where = f" -h {host}" if host else ""
    return f"mysql --defaults-extra-file={PFA_CLIENT_CNF}{where} --connect-timeout=5 -NB {database}"


_DB_HOST: dict[tuple[int, str], str] = {}


def db_host(h: HostSession) -> str:
    """The first of db_addresses whose proxy answers now (asked once per run and host)."""
    key = (id(h.run), h.name)
    if key not in _DB_HOST:
        candidates = db_addresses(h.inv, h.name)
        for addr in candidates:
            if h.probe(f"{mysql_cmd(host=addr)} -e 'SELECT 1'").ok:
                _DB_HOST[key] = addr
                break
        else:
            raise HostFailed("the database proxy answers on none of " + ", ".join(candidates)
                             + " (is `inv dbproxy.deploy` done, is the Galera cluster up?)")
    return _DB_HOST[key]


def db(h: HostSession) -> str:
    return mysql_cmd(host=db_host(h))


def query(h: HostSession, sql: str) -> list[list[str]]:
    r = h.probe(db(h), stdin=sql)
    if not r.ok:
        raise HostFailed(f"query on the Postfixadmin database failed: {(r.stderr or r.stdout).strip()}")
    return [line.split("\t") for line in r.stdout.splitlines() if line]


def write(h: HostSession, sql: str, message: str) -> None:
    h.sh(db(h), stdin="START TRANSACTION;\n" + sql + "\nCOMMIT;\n", message=message)


def schema_version(h: HostSession) -> tuple[int | None, int]:
    """(version in the database or None, the version Postfixadmin's upgrade.php brings it to)."""
    target = h.read(f"grep -o 'function upgrade_[0-9]*' {PFA_DIR}/public/upgrade.php | cut -d_ -f2 | sort -n | tail -1")
    r = h.probe(db(h), stdin="SELECT value FROM config WHERE name = 'version';")
    have = int(r.stdout.strip()) if r.ok and r.stdout.strip().isdigit() else None
    return have, int(target.strip())


NO_PK_SQL = (
    "SELECT t.TABLE_NAME FROM information_schema.TABLES t LEFT JOIN information_schema.TABLE_CONSTRAINTS c "
    "ON c.TABLE_SCHEMA = t.TABLE_SCHEMA AND c.TABLE_NAME = t.TABLE_NAME AND c.CONSTRAINT_TYPE = 'PRIMARY KEY' "
    f"WHERE t.TABLE_SCHEMA = '{DB_NAME}' AND t.TABLE_TYPE = 'BASE TABLE' AND c.CONSTRAINT_NAME IS NULL;"
)


def _schema(h: HostSession) -> None:
    if h.run.check and not h.probe(f"test -s {PFA_CLIENT_CNF} && test -f {PFA_DIR}/public/upgrade.php").ok:
        h.changed("would create Postfixadmin's schema (upgrade.php), the mail domain and the superadmin")
        return
    inv = h.inv
    have, target = schema_version(h)
    if have is not None and have >= target:
        h.ok(f"Postfixadmin schema at version {have}")
    else:
        if not h.run.check:
            patched = patch_upgrade(h.read(f"cat {PFA_DIR}/public/upgrade.php"))
            h.directory("/var/lib/hastack", mode="0755")
            h.put(patched, UPGRADE_COPY, mode="0644")
            # upgrade.php's require_once('common.php') resolves from the working directory
            r = h.probe(f"cd {PFA_DIR}/public && HASTACK_DB_HOST={db_host(h)} php {UPGRADE_COPY}")
            have, target = schema_version(h)
            if not r.ok or have != target or "Invalid query" in r.stdout:
                raise HostFailed(f"Postfixadmin's upgrade.php stopped at version {have} of {target}:\n"
                                 + (r.stdout + r.stderr).strip()[-1500:])
            h.changed(f"Postfixadmin schema upgraded to version {target} (upgrade.php)")
        else:
            h.changed(f"would run: upgrade.php to schema version {target}")
    if not h.run.check:
        bad = [row[0] for row in query(h, NO_PK_SQL)]
        if bad:
            raise HostFailed(f"tables without a primary key (Galera refuses writes to them): {', '.join(bad)}")
    dom = inv.mail.domain
    _ensure_domain(h, dom, description="the site's mail domain")
    admin = f"admin@{dom}"
    rows = query(h, f"SELECT superadmin, active FROM admin WHERE username = {sql_quote(admin)};") \
        if not (h.run.check and have is None) else []
    if rows and rows[0] == ["1", "1"]:
        h.ok(f"superadmin {admin}")
    else:
        pw = mailbox_hash(h.run.secret(SECRETS["admin"]))
        write(h, _admin_sql(admin, pw), f"superadmin {admin} (password: secret {SECRETS['admin']})")


def _admin_sql(admin: str, pw_hash: str) -> str:
    a = sql_quote(admin)
    return (f"INSERT INTO admin (username, password, superadmin, created, modified, active) "
            f"VALUES ({a}, {sql_quote(pw_hash)}, 1, NOW(), NOW(), 1) "
            f"ON DUPLICATE KEY UPDATE superadmin = 1, active = 1, modified = NOW();\n"
            f"INSERT INTO domain_admins (username, domain, created, active) SELECT {a}, 'ALL', NOW(), 1 "
            f"FROM DUAL WHERE NOT EXISTS (SELECT 1 FROM domain_admins WHERE username = {a} AND domain = 'ALL');")


def domain_sql(domain: str, description: str = "") -> str:
    return ("INSERT INTO domain (domain, description, aliases, mailboxes, maxquota, quota, transport, backupmx, "
            f"created, modified, active) VALUES ({sql_quote(domain)}, {sql_quote(description)}, 0, 0, 0, 0, "
            "'virtual', 0, NOW(), NOW(), 1);\n" + _log_sql(domain, "create_domain", domain))


def mailbox_sql(local: str, domain: str, pw_hash: str, name: str = "") -> str:
    address = f"{local}@{domain}"
    a = sql_quote(address)
    return (
        "INSERT INTO mailbox (username, password, name, maildir, quota, local_part, domain, created, modified, "
        f"active) VALUES ({a}, {sql_quote(pw_hash)}, {sql_quote(name)}, {sql_quote(f'{domain}/{local}/')}, 0, "
        f"{sql_quote(local)}, {sql_quote(domain)}, NOW(), NOW(), 1);\n"
        f"INSERT INTO alias (address, goto, domain, created, modified, active) VALUES ({a}, {a}, "
        f"{sql_quote(domain)}, NOW(), NOW(), 1);\n" + _log_sql(domain, "create_mailbox", address))


def alias_sql(address: str, domain: str, goto: list[str]) -> str:
    return (f"INSERT INTO alias (address, goto, domain, created, modified, active) VALUES ({sql_quote(address)}, "
            f"{sql_quote(','.join(goto))}, {sql_quote(domain)}, NOW(), NOW(), 1);\n"
            + _log_sql(domain, "create_alias", f"{address} -> {','.join(goto)}"))


def password_sql(address: str, domain: str, pw_hash: str) -> str:
    return (f"UPDATE mailbox SET password = {sql_quote(pw_hash)}, modified = NOW() "
            f"WHERE username = {sql_quote(address)};\n" + _log_sql(domain, "edit_password", address))


def _log_sql(domain: str, action: str, data: str) -> str:
    return ("INSERT INTO log (timestamp, username, domain, action, data) VALUES "
            f"(NOW(), 'hastack (inv mail)', {sql_quote(domain)}, {sql_quote(action)}, {sql_quote(data)});")


def _ensure_domain(h: HostSession, domain: str, description: str = "") -> bool:
    if h.run.check and not h.probe(db(h), stdin="SELECT 1 FROM domain LIMIT 0;").ok:
        h.changed(f"would add domain {domain}")
        return True
    if query(h, f"SELECT domain FROM domain WHERE domain = {sql_quote(domain)};"):
        h.ok(f"domain {domain}")
        return False
    write(h, domain_sql(domain, description), f"domain {domain} added")
    return True


# --- ops: on the node holding the mail VIP ----------------------------------------------------


def _answering(run: Run, hosts: list[str] | None = None) -> HostSession:
    """The back end holding the mail VIP; without a VIP up, the first one (inventory
    order, narrowed by --hosts) that is reachable."""
    hosts = hosts if hosts is not None else run.hosts(ROLE)
    vip = run.inv.vips.get("mail")
    reachable, tried = [], []
    for host in hosts:
        try:
            h = run.session(host)
            h.open()
        except UserError as exc:
            tried.append(str(exc))
            continue
        reachable.append(h)
        if vip is not None and h.probe(f"ip -o -4 addr show | grep -qw 'inet {vip.address}'").ok:
            return h
    if reachable:
        return reachable[0]
    raise UserError("no mail back end answers, nothing was changed (" + "; ".join(tried or ["no mail_backend hosts"])
                    + ")")


def _op(run: Run, title: str, action) -> None:
    if run.inv.mail is None:
        raise UserError(f"{run.inv.path}: no 'mail' section: the inventory has no mail cluster")
    h = _answering(run)
    run.report.step(title, [h.name])
    try:
        action(h)
    except HostFailed as exc:
        run.report.result(h.name, "failed", str(exc))
        raise UserError(f"{h.name}: {exc}") from None


def _ask_password(password: str | None) -> str:
    if password is None:
        if not sys.stdin or not sys.stdin.isatty():
            raise UserError("no password given and no terminal to ask on: pass --password "
                            "(or run it from a terminal); nothing was changed")
        password = getpass.getpass("password: ")
        if getpass.getpass("again: ") != password:
            raise UserError("the passwords differ; nothing was changed")
    return check_password(password)


def _domain_exists(h: HostSession, domain: str) -> bool:
    return bool(query(h, f"SELECT domain FROM domain WHERE domain = {sql_quote(domain)};"))


@runbook(positional=["domain"], help={"domain": "the domain to receive mail for, e.g. example.org",
                                      "description": "a note shown in Postfixadmin"})
def add_domain(run, domain, description=""):
    """Add a mail domain (refuses one that exists)."""
    domain = check_domain(domain)

    def act(h: HostSession) -> None:
        if _domain_exists(h, domain):
            raise UserError(f"domain {domain} exists already; nothing was changed")
        write(h, domain_sql(domain, description), f"domain {domain} added")

    _op(run, f"mail: add domain {domain}", act)


@runbook(positional=["address"],
         help={"address": "LOCAL@DOMAIN; the domain must have been added (mail.add-domain)",
               "password": "the password (asked for when not given; arguments land in the shell history)",
               "name": "the owner's name"})
def add_mailbox(run, address, password=None, name=""):
    """Add a mailbox (refuses a malformed address, an unknown domain, an existing address)."""
    local, domain = parse_address(address)
    address = f"{local}@{domain}"
    if "'" in name or "\\" in name or "\n" in name:
        raise UserError("the name may not hold quotes, backslashes or newlines; nothing was changed")
    password = _ask_password(password)

    def act(h: HostSession) -> None:
        if not _domain_exists(h, domain):
            raise UserError(f"domain {domain} is not served here (add it with `inv mail.add-domain {domain}`); "
                            "nothing was changed")
        if query(h, f"SELECT username FROM mailbox WHERE username = {sql_quote(address)};"):
            raise UserError(f"mailbox {address} exists already (use mail.set-password); nothing was changed")
        if query(h, f"SELECT address FROM alias WHERE address = {sql_quote(address)};"):
            raise UserError(f"{address} is an alias already; nothing was changed")
        write(h, mailbox_sql(local, domain, mailbox_hash(password), name), f"mailbox {address} added")

    _op(run, f"mail: add mailbox {address}", act)


@runbook(positional=["address", "goto"],
         help={"address": "the alias LOCAL@DOMAIN (its domain must have been added)",
               "goto": "where its mail goes: one address or several separated by commas"})
def add_alias(run, address, goto):
    """Add an alias forwarding ADDRESS to GOTO (refuses an existing address)."""
    local, domain = parse_address(address)
    address = f"{local}@{domain}"
    targets = []
    for t in (goto or "").split(","):
        if t.strip():
            tl, td = parse_address(t)
            targets.append(f"{tl}@{td}")
    if not targets:
        raise UserError("no target address given (GOTO); nothing was changed")

    def act(h: HostSession) -> None:
        if not _domain_exists(h, domain):
            raise UserError(f"domain {domain} is not served here (add it with `inv mail.add-domain {domain}`); "
                            "nothing was changed")
        if query(h, f"SELECT address FROM alias WHERE address = {sql_quote(address)};"):
            raise UserError(f"{address} exists already (a mailbox or an alias); nothing was changed")
        write(h, alias_sql(address, domain, targets), f"alias {address} -> {', '.join(targets)} added")

    _op(run, f"mail: add alias {address}", act)


@runbook(positional=["address", "password"],
         help={"address": "the mailbox LOCAL@DOMAIN",
               "password": "the new password (asked for when not given)"})
def set_password(run, address, password=None):
    """Set a mailbox's password."""
    local, domain = parse_address(address)
    address = f"{local}@{domain}"
    password = _ask_password(password)

    def act(h: HostSession) -> None:
        if not query(h, f"SELECT username FROM mailbox WHERE username = {sql_quote(address)};"):
            raise UserError(f"no mailbox {address}; nothing was changed")
        write(h, password_sql(address, domain, mailbox_hash(password)), f"{address}: password changed")

    _op(run, f"mail: set password of {address}", act)


@dataclass
class Listing:
    domains: list[list[str]]
    mailboxes: list[list[str]]
    aliases: list[list[str]]


@runbook(name="list")
def list_(run):
    """Domains, mailboxes and aliases in the Postfixadmin database."""
    out: dict[str, Listing] = {}

    def act(h: HostSession) -> None:
        out["l"] = Listing(
            query(h, "SELECT domain, active FROM domain WHERE domain <> 'ALL' ORDER BY domain;"),
            query(h, "SELECT username, active FROM mailbox ORDER BY domain, username;"),
            query(h, "SELECT address, goto, active FROM alias WHERE address <> goto ORDER BY domain, address;"),
        )
        h.ok("read")

    _op(run, "mail: list", act)
    lst = out["l"]
    con = run.report.console
    for d, active in lst.domains:
        con.print(f"domain  {d}" + ("" if active == "1" else "  (inactive)"), highlight=False)
    for m, active in lst.mailboxes:
        con.print(f"mailbox {m}" + ("" if active == "1" else "  (inactive)"), highlight=False)
    for a, goto, active in lst.aliases:
        con.print(f"alias   {a} -> {goto}" + ("" if active == "1" else "  (inactive)"), highlight=False)


@runbook(default=True)
def deploy(run):
    """Converge postfix, dovecot and Postfixadmin on the mail back ends."""
    converge(run)


ns = Collection("mail", deploy, add_domain, add_mailbox, add_alias, set_password, list_)
