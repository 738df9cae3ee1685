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
   certificate, LMTP with Sieve and auth sockets inside postfix's spool,
   ManageSieve on 4190 with STARTTLS for the webmail front ends; vacation
   replies go out through postfix's sendmail) and the SQL passdb/userdb file;
   `doveconf -n` checks the new file first.
4. Postfixadmin: its database settings, a setup password hash (bcrypt of a
   generated secret; the web setup page is not served at all), nginx + php-fpm.
5. Services: where Pacemaker owns postfix / dovecot (a resource of that name
   in the cluster's CIB) the unit is only reloaded where it runs (dovecot's
   reload opens new listeners, e.g. ManageSieve's); otherwise it is enabled
   and started here.
6. Schema (once, on one back end): Postfixadmin's own upgrade.php, in a copy
   whose two tables without a primary key upstream (domain_admins, log) get
   one, so the schema works under pxc_strict_mode=ENFORCING / wsrep_mode=
   REQUIRED_PRIMARY_KEY (why: `postfixadmin.py`), brings the schema to its
   version; then the mail domain, a superadmin (admin@DOMAIN, its password
   a generated secret `mail_postfixadmin_admin_password`) and the aliases
   postmaster@DOMAIN and abuse@DOMAIN to the inventory's `mail.postmaster`
   (none without it: the run says so).

Ops tasks (`mail.add-domain`, `add-mailbox`, `add-alias`, `set-password`,
`list`): `ops.py`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from invoke import Collection

from ..core import HostFailed, runbook, topology
from ..core.sql import my_literal
from .addresses import check_domain, check_password, parse_address  # noqa: F401 (the tier's validators)
from .ops import add_alias, add_domain, add_mailbox, list_, set_password
from .postfixadmin import (  # noqa: F401
    NO_PK_SQL, PFA_CLIENT_CNF, PFA_DIR, PK_TABLES, admin_sql, alias_goto_sql, alias_sql, client, db_host,
    domain_exists, domain_query, domain_sql, mailbox_hash, patch_upgrade, query, query_many, run_upgrade,
    schema_version,
    setup_password_hash, write,
)

if TYPE_CHECKING:
    from ..core import HostSession, Run
    from ..core.inventory import Inventory

ROLE = topology.MAIL_BACKEND
VMAIL = topology.VMAIL_USER
VMAIL_UID = topology.VMAIL_UID
MAIL_ROOT = topology.MAIL_STORE
PHP_FPM = "php8.2-fpm"
PACKAGES = [
    "postfix", "postfix-mysql",
    "dovecot-core", "dovecot-imapd", "dovecot-lmtpd", "dovecot-mysql", "dovecot-sieve", "dovecot-managesieved",
    "nginx", "php-fpm", "php-cli", "php-mysql", "php-mbstring", "php-imap", "postfixadmin",
    "mariadb-client",
]
DEBCONF = [
    "postfixadmin postfixadmin/dbconfig-install boolean false",
    "postfix postfix/main_mailer_type select No configuration",
]
POSTFIX_MAPS = ("domains", "mailboxes", "aliases")
ROLE_ALIASES = ("postmaster", "abuse")  # of the mail domain, to mail.postmaster
SETUP_SECRET = "mail_postfixadmin_setup_password"
ADMIN_SECRET = "mail_postfixadmin_admin_password"


# --- what the inventory says ---------------------------------------------------------------


def backends(inv: Inventory) -> list[str]:
    return inv.with_role(ROLE)


def mail_names(inv: Inventory) -> list[str]:
    vip = inv.vips.get("mail")
    return list(vip.names) if vip is not None else []


def mail_hostname(inv: Inventory, host: str) -> str:
    """The name postfix greets with: the mail VIP's first name, the same on every node."""
    names = mail_names(inv)
    return names[0] if names else inv.fqdn(host)


def template_vars(inv: Inventory, host: str, secret) -> dict:
    """What the mail templates see. postfix and dovecot are given every address
    of the DB proxy (topology.db_proxy_addresses) and skip one that does not answer."""
    vip = inv.vips.get("mail")
    db_hosts = topology.db_proxy_addresses(inv, host)
    port = topology.db_proxy_port(inv)
    reader = topology.db_proxy_reader_port(inv)
    return {
        "domain": inv.mail.domain,
        "myhostname": mail_hostname(inv, host),
        "vip_address": str(vip.address) if vip is not None else "",
        "db_hosts": db_hosts,
        "db_host": db_hosts[0],
        # postfix's and dovecot's lookups are read-only: the proxy's reader port
        # (the non-writer Galera nodes); Postfixadmin writes, on the writer port.
        "postfix_hosts": " ".join(f"inet:{a}:{reader}" for a in db_hosts),
        "db_port": port,
        "db_reader_port": reader,
        "db_name": topology.MAIL_DB,
        "db_password": {u: secret(topology.account_secret(inv, u)) for u in ("postfix", "dovecot", "postfixadmin")},
        "setup_hash": setup_password_hash(secret(SETUP_SECRET)),
        "cert": topology.cert_path(host),
        "key": topology.key_path(host),
        "ca": topology.CA_FILE,
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
    run.step("mail: packages, vmail user, mail root", hosts, install)
    changed: dict[str, dict[str, bool]] = {}
    run.step("mail: postfix and dovecot config", hosts, lambda h: changed.__setitem__(h.name, configure(h)))
    run.step("mail: Postfixadmin (config, nginx + php-fpm, no setup page)", hosts, web)
    run.step("mail: services", hosts, lambda h: services(h, changed.get(h.name, {})))
    if hosts:
        first = run.answering(hosts, what="mail back end")
        run.step("mail: Postfixadmin schema, domain, superadmin, postmaster@ and abuse@", [first.name], schema)


def install(h: HostSession) -> None:
    h.packages(PACKAGES, preseed=DEBCONF)
    have = h.probe(f"id -u {VMAIL} && id -g {VMAIL}")
    if have.ok and have.stdout.split() != [str(VMAIL_UID)] * 2:
        raise HostFailed(f"user {VMAIL} exists with uid/gid {'/'.join(have.stdout.split())}; the mail tier needs "
                         f"{VMAIL_UID}/{VMAIL_UID} on every back end (they share the mail store): fix it by hand")
    h.ensure(f"getent group {VMAIL} | grep -q ':{VMAIL_UID}:'", f"groupadd -g {VMAIL_UID} {VMAIL}",
             f"group {VMAIL} ({VMAIL_UID})")
    h.ensure(f"getent passwd {VMAIL} | grep -q ':{VMAIL_UID}:{VMAIL_UID}:'",
             f"useradd -r -u {VMAIL_UID} -g {VMAIL} -d {MAIL_ROOT} -s /usr/sbin/nologin -M {VMAIL}",
             f"user {VMAIL} ({VMAIL_UID})")
    h.directory(MAIL_ROOT, owner=VMAIL, group=VMAIL, mode="0770")


def configure(h: HostSession) -> dict[str, bool]:
    v = h.tier_vars(template_vars)
    pf = False
    for m in POSTFIX_MAPS:
        pf |= h.template(f"mail/etc/postfix/mysql-virtual-{m}.cf.j2", f"/etc/postfix/mysql-virtual-{m}.cf", v,
                         group="postfix", mode="0640")
    pf |= h.template("mail/etc/postfix/main.cf.j2", "/etc/postfix/main.cf", v, validate="postfix check")
    pf_master = h.template("mail/etc/postfix/master.cf.j2", "/etc/postfix/master.cf", v, validate="postfix check")
    # After main.cf: postfix installed unconfigured (no wizard) has none, and newaliases reads it.
    if h.template("mail/etc/aliases.j2", "/etc/aliases", v) or not h.probe("test /etc/aliases.db -nt /etc/aliases").ok:
        h.sh("newaliases", message="/etc/aliases.db rebuilt (newaliases)")
    dv = h.template("mail/etc/dovecot/dovecot-sql.conf.ext.j2", "/etc/dovecot/dovecot-sql.conf.ext", v,
                    group="dovecot", mode="0640")
    dv |= h.template("mail/etc/dovecot/dovecot.conf.j2", "/etc/dovecot/dovecot.conf", v,
                     validate="doveconf -n -c {} >/dev/null")
    return {"postfix": pf, "postfix_restart": pf_master, "dovecot": dv}


def web(h: HostSession) -> None:
    v = h.tier_vars(template_vars)
    cfg = h.template("mail/etc/postfixadmin/dbconfig.inc.php.j2", "/etc/postfixadmin/dbconfig.inc.php", v,
                     group="www-data", mode="0640", validate="php -l {} >/dev/null")
    cfg |= h.template("mail/etc/postfixadmin/config.local.php.j2", "/etc/postfixadmin/config.local.php", v,
                      group="www-data", mode="0640", validate="php -l {} >/dev/null")
    h.template("mail/etc/postfixadmin/hastack-client.cnf.j2", PFA_CLIENT_CNF, v, mode="0600")
    site = h.nginx_site("postfixadmin", "mail/etc/nginx/sites-available/postfixadmin.j2", v)
    h.ensure("test -d /var/cache/postfixadmin/templates_c && "
             "test \"$(stat -c %U /var/cache/postfixadmin/templates_c)\" = www-data",
             "install -d -o www-data -g www-data -m 0750 /var/cache/postfixadmin/templates_c",
             "/var/cache/postfixadmin/templates_c writable by php-fpm")
    h.service(PHP_FPM, restart=cfg)
    h.service("nginx", reload=site)


def services(h: HostSession, changed: dict[str, bool]) -> None:
    # Pacemaker runs systemd:postfix@- (the daemon; postfix.service is a
    # oneshot wrapper) and systemd:dovecot: where it owns them, only reload where it runs them.
    if topology.pacemaker_owns(h, "postfix"):
        _reload_where_running(h, "postfix", "postfix@-", changed.get("postfix") or changed.get("postfix_restart"))
    else:
        # Debian's postfix.service has ConditionPathExists=/etc/postfix/main.cf: at
        # install time (no main.cf yet) systemd skipped it, and HostSession.service
        # would take that for "does not apply here". main.cf exists now: start it.
        if not h.probe("systemctl is-active -q postfix").ok:
            h.sh("systemctl start postfix")
        h.service("postfix", restart=changed.get("postfix_restart", False), reload=changed.get("postfix", False))
    if topology.pacemaker_owns(h, "dovecot"):
        _reload_where_running(h, "dovecot", "dovecot", changed.get("dovecot"))
    else:
        # restart, not reload: dovecot makes its listeners in postfix's spool at start
        h.service("dovecot", restart=changed.get("dovecot", False))


def _reload_where_running(h: HostSession, name: str, unit: str, changed: bool | None) -> None:
    if changed and h.probe(f"systemctl is-active -q {unit}").ok:
        h.sh(f"systemctl reload {unit}", message=f"{name} reloaded (Pacemaker owns it)")
    else:
        h.ok(f"{name}: left to Pacemaker")


def schema(h: HostSession) -> None:
    if h.run.check and not h.probe(f"test -s {PFA_CLIENT_CNF} && test -f {PFA_DIR}/public/upgrade.php").ok:
        h.changed("would create Postfixadmin's schema (upgrade.php), the mail domain and the superadmin")
        return
    have, target = schema_version(h)
    if have is not None and have >= target:
        h.ok(f"Postfixadmin schema at version {have}")
    elif h.run.check:
        h.changed(f"would run: upgrade.php to schema version {target}")
    else:
        run_upgrade(h)
    domain = h.inv.mail.domain
    admin = f"admin@{domain}"
    # What the steps below decide on, read in one round trip (a dry run on a new database has no tables to read)
    pre = None if h.run.check and have is None else query_many(h, {
        "nopk": NO_PK_SQL, "domain": domain_query(domain),
        "admin": f"SELECT superadmin, active FROM admin WHERE username = {my_literal(admin)};",
        "alias": alias_query(role_addresses(domain))})
    if pre is not None and not h.run.check:
        bad = [row[0] for row in pre["nopk"]]
        if bad:
            raise HostFailed(f"tables without a primary key (Galera refuses writes to them): {', '.join(bad)}")
    ensure_domain(h, domain, description="the site's mail domain", exists=bool(pre["domain"]) if pre else None)
    rows = pre["admin"] if pre else []
    if rows and rows[0] == ["1", "1"]:
        h.ok(f"superadmin {admin}")
    else:
        pw = mailbox_hash(h.run.secret(ADMIN_SECRET))
        write(h, admin_sql(admin, pw), f"superadmin {admin} (password: secret {ADMIN_SECRET})")
    role_aliases(h, schema_missing=pre is None, rows=pre["alias"] if pre else None)


def role_addresses(domain: str) -> list[str]:
    return [f"{local}@{domain}" for local in ROLE_ALIASES]


def alias_query(addresses: list[str]) -> str:
    return ("SELECT address, goto, active FROM alias WHERE address IN ("
            + ", ".join(my_literal(a) for a in addresses) + ");")


def role_aliases(h: HostSession, schema_missing: bool = False, rows: list[list[str]] | None = None) -> None:
    """postmaster@ and abuse@ of the mail domain forward to mail.postmaster: added
    when missing, pointed there when they forward elsewhere; an address that is
    a mailbox of its own is left alone. Without mail.postmaster: none, and a note.
    ``rows``: the aliases' rows when already read (else they are read here)."""
    domain = h.inv.mail.domain
    target = h.inv.mail.postmaster_address
    addresses = role_addresses(domain)
    if target is None:
        h.note(f"mail.postmaster is not set in the inventory: no aliases {' and '.join(addresses)} created "
               "(set it to the mailbox that reads them)")
        return
    if rows is None:
        rows = [] if schema_missing else query(h, alias_query(addresses))
    rows = {row[0]: row[1:] for row in rows}
    sql, done = [], []
    for address in addresses:
        goto, active = (rows.get(address) or [None, None])[:2]
        if goto is None:
            sql.append(alias_sql(address, domain, [target]))
            done.append(f"{address} -> {target}")
        elif goto == address:
            h.note(f"{address} is a mailbox of its own: left alone (not forwarded to {target})")
        elif goto != target or active != "1":
            sql.append(alias_goto_sql(address, domain, [target]))
            done.append(f"{address} -> {target} (was {goto}{'' if active == '1' else ', inactive'})")
        else:
            h.ok(f"alias {address} -> {target}")
    if sql:
        write(h, "\n".join(sql), "alias " + ", ".join(done))


def ensure_domain(h: HostSession, domain: str, description: str = "", exists: bool | None = None) -> bool:
    """The domain in Postfixadmin's table; ``exists``: whether it is, when already read."""
    if exists is None and h.run.check and not h.probe(client(db_host(h)), stdin="SELECT 1 FROM domain LIMIT 0;").ok:
        h.changed(f"would add domain {domain}")
        return True
    if exists if exists is not None else domain_exists(h, domain):
        h.ok(f"domain {domain}")
        return False
    write(h, domain_sql(domain, description), f"domain {domain} added")
    return True


@runbook(default=True)
def deploy(run):
    """Converge postfix, dovecot and Postfixadmin on the mail back ends."""
    converge(run)


ns = Collection("mail", deploy, add_domain, add_mailbox, add_alias, set_password, list_)
