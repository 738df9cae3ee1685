"""Webmail tier (seed 000, on the webmail hosts): Roundcube (Debian 12's
roundcube 1.6) on nginx + php-fpm, the users' entry point, on the webmail VIP
that keepalived moves between the front ends.

Runbook of `inv webmail.deploy`:
1. Preflight (before any host is touched): the inventory has the mail VIP with
   a name (IMAP, SMTP and ManageSieve go there, verified against that name), a
   database proxy, and only plugins Debian ships (the inventory validator).
   On each front end, before any change: its certificate from our CA is there
   (`inv pki.deploy` makes it).
2. Packages (debconf told first: no dbconfig-common database, no web server
   reconfigured): nginx, php-fpm, roundcube-core/-mysql/-plugins and the
   mariadb client for the schema.
3. Roundcube's config (`php -l` checks each before it replaces the old one):
   - its database: Galera through the DB proxy (the dbproxy VIP, port of the
     proxy's writer), account `roundcube` with a generated password; sessions
     are stored there (Roundcube's default), so a user stays logged in when
     the VIP moves to the other front end; `des_key` (which encrypts the IMAP
     password in the session) is one generated secret, the same on both;
   - IMAP (993, TLS), SMTP submission (587, STARTTLS) and ManageSieve (4190,
     STARTTLS) on the mail VIP's name, each certificate verified against our
     CA for that name;
   - product name, default mail domain (users log in with their address or
     only its local part), support link: from the inventory;
   - plugins: `hastack_anonymous` (ours) keeps Roundcube's version off the
     login page; `password` writes a mailbox's new password into Postfixadmin's
     table with the hash `mail.set-password` uses ({BLF-CRYPT}, bcrypt cost 10)
     through its own account (`roundcube_password`: SELECT, UPDATE on
     postfix.mailbox only); `managesieve` edits dovecot sieve filters and the
     vacation reply.
4. nginx: HTTP redirects to HTTPS; HTTPS with the certificate our CA issued
   (host names, the webmail VIP and its names), HSTS, no server version, no
   X-Powered-By; only Roundcube's public_html is served (no installer, no
   config, no logs); PHP errors go to the log, never to the page.
5. Roundcube's schema, once (on one front end, through the proxy): created from
   Debian's mysql.initial.sql when the database is empty (every table has a
   primary key, as Galera's strict mode wants; checked after), else brought up
   to the shipped version by Roundcube's own updatedb.sh.

The webmail VIP itself is keepalived's (`inv keepalived.deploy`; deploy.mail
runs it after this tier): it follows a front end whose nginx and php-fpm answer.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from invoke import Collection

from .core import HostFailed, UserError, q, runbook, topology
from .core.secrets import token

if TYPE_CHECKING:
    from .core import HostSession, Run
    from .core.inventory import Inventory

ROLE = topology.WEBMAIL
PHP_FPM = "php8.2-fpm"
PACKAGES = ["nginx", "php-fpm", "php-mysql", "php-intl", "php-mbstring", "php-zip",
            "roundcube-core", "roundcube-mysql", "roundcube-plugins", "mariadb-client", "curl"]
DEBCONF = [
    "roundcube-core roundcube/dbconfig-install boolean false",
    "roundcube-core roundcube/reconfigure-webserver multiselect",
    "roundcube-core roundcube/restart-webserver boolean false",
]
RC_ETC = "/etc/roundcube"
RC_PUBLIC = "/var/lib/roundcube/public_html"
RC_SQL = "/usr/share/roundcube/SQL"
CLIENT_CNF = f"{RC_ETC}/hastack-client.cnf"
DES_KEY_SECRET = "webmail_roundcube_des_key"
PLUGIN_CONFIGS = ("password", "managesieve")  # plugins whose settings we write
PASSWORD_HASH_COST = 10  # the cost mail.set-password's bcrypt uses
# Our own plugin (configs/webmail/var/lib/roundcube/plugins/): the login page keeps Roundcube's version to itself.
OWN_PLUGIN = "hastack_anonymous"
OWN_PLUGIN_FILE = f"/var/lib/roundcube/plugins/{OWN_PLUGIN}/{OWN_PLUGIN}.php"


# --- what the inventory says ---------------------------------------------------------------


def front_ends(inv: Inventory) -> list[str]:
    return inv.with_role(ROLE)


def mail_name(inv: Inventory) -> str:
    """The name the front ends reach IMAP/SMTP/ManageSieve by (and verify): the mail VIP's first name."""
    vip = inv.vips.get("mail")
    return vip.names[0] if vip is not None and vip.names else ""


def product_name(inv: Inventory) -> str:
    if inv.webmail is not None and inv.webmail.product_name:
        return inv.webmail.product_name
    return f"{inv.site.name} webmail"


def plugins(inv: Inventory) -> list[str]:
    return list(inv.webmail.plugins) if inv.webmail is not None else ["password", "managesieve"]


def server_names(inv: Inventory, host: str) -> list[str]:
    vip = inv.vips.get("webmail")
    return list(dict.fromkeys([*(vip.names if vip else []), inv.fqdn(host), host]))


def template_vars(inv: Inventory, host: str, secret) -> dict:
    db = topology.db_proxy_endpoint(inv)
    port = topology.db_proxy_port(inv)
    name = mail_name(inv)
    rc_pw = secret(topology.account_secret(inv, "roundcube"))
    pw_pw = secret(topology.account_secret(inv, "roundcube_password"))
    webmail = inv.webmail
    return {
        "product_name": product_name(inv),
        "support_url": webmail.support_url if webmail and webmail.support_url else "",
        "mail_domain": inv.mail.domain,
        "db_host": db,
        "db_port": port,
        "db_name": topology.ROUNDCUBE_DB,
        "db_password": rc_pw,
        "db_dsnw": f"mysql://roundcube:{rc_pw}@{db}:{port}/{topology.ROUNDCUBE_DB}",
        "password_dsn": f"mysql://roundcube_password:{pw_pw}@{db}:{port}/{topology.MAIL_DB}",
        "password_cost": PASSWORD_HASH_COST,
        "des_key": secret(DES_KEY_SECRET),
        "imap_host": f"ssl://{name}:993",
        "smtp_host": f"tls://{name}:587",
        "managesieve_host": f"tls://{name}:4190",
        "mail_name": name,
        "ca": topology.CA_FILE,
        "cert": topology.cert_path(host),
        "key": topology.key_path(host),
        "plugins": [*plugins(inv), OWN_PLUGIN],
        "public_dir": RC_PUBLIC,
        "php_fpm_socket": f"/run/php/{PHP_FPM}.sock",
        "server_names": server_names(inv, host),
    }


# --- runbook ------------------------------------------------------------------------------


def preflight(run: Run) -> None:
    """Checked before any host is touched (deploy.all asks every tier first)."""
    inv = run.inv
    if not front_ends(inv):
        return
    if inv.mail is None:
        raise UserError(f"{inv.path}: hosts have role webmail but the inventory has no 'mail' section")
    if "mail" not in inv.vips:
        raise UserError(f"{inv.path}: vips.mail is missing: Roundcube reaches IMAP and SMTP on the mail VIP")
    if not mail_name(inv):
        raise UserError(f"{inv.path}: vips.mail.names is empty: Roundcube verifies the mail servers' "
                        "certificate against the mail VIP's name")
    if not topology.db_proxy_endpoint(inv):
        raise UserError(f"{inv.path}: no database proxy (vips.dbproxy or a mail_backend host) for "
                        "Roundcube's database")


def converge(run: Run) -> None:
    hosts = [h for h in front_ends(run.inv) if h in run.hosts()]
    if not hosts:
        return
    preflight(run)
    run.secrets.get(DES_KEY_SECRET, lambda: token(24))
    run.step("webmail: certificate present", hosts, topology.require_certificate)
    run.step("webmail: packages", hosts, _packages)
    run.step("webmail: Roundcube, nginx, php-fpm", hosts, configure)
    first = run.answering(hosts, what="webmail front end")
    run.step("webmail: Roundcube's database schema", [first.name], schema)


def install(run: Run, among: set[str] | None = None) -> None:
    """Only the packages (nothing here needs the other tiers), on the selected
    hosts ``among`` these: `deploy.all` runs this beside the systems, so that the
    front ends are not idle until the mail cluster stands; converge() finds them
    installed then."""
    hosts = [h for h in front_ends(run.inv) if h in run.hosts() and (among is None or h in among)]
    if hosts:
        run.step("webmail: packages", hosts, _packages)


def _packages(h: HostSession) -> None:
    h.packages(PACKAGES, preseed=DEBCONF)


def configure(h: HostSession) -> None:
    v = h.tier_vars(template_vars)
    php = "php -l {} >/dev/null"
    h.directory(f"/var/lib/roundcube/plugins/{OWN_PLUGIN}")
    h.template(f"webmail{OWN_PLUGIN_FILE}.j2", OWN_PLUGIN_FILE, v, validate=php)
    h.template("webmail/etc/roundcube/config.inc.php.j2", f"{RC_ETC}/config.inc.php", v,
               group="www-data", mode="0640", validate=php)
    for plugin in PLUGIN_CONFIGS:
        h.template(f"webmail/etc/roundcube/plugins/{plugin}/config.inc.php.j2",
                   f"{RC_ETC}/plugins/{plugin}/config.inc.php", v, group="www-data", mode="0640", validate=php)
    h.template("webmail/etc/roundcube/hastack-client.cnf.j2", CLIENT_CNF, v, mode="0600")
    fpm = h.template("webmail/etc/php/8.2/fpm/conf.d/90-hastack.ini.j2", "/etc/php/8.2/fpm/conf.d/90-hastack.ini", v)
    site = h.nginx_site("roundcube", "webmail/etc/nginx/sites-available/roundcube.j2", v)
    h.service(PHP_FPM, restart=fpm)
    h.service("nginx", reload=site)


def _mysql(sql_file: str | None = None) -> str:
    cmd = f"mysql --defaults-extra-file={CLIENT_CNF} --batch --skip-column-names {topology.ROUNDCUBE_DB}"
    return cmd + (f" < {q(sql_file)}" if sql_file else "")


def schema_version(h: HostSession) -> str | None:
    """Roundcube's schema version in the database (its `system` table), None when there is no schema."""
    r = h.probe(_mysql(), stdin="SELECT value FROM `system` WHERE name = 'roundcube-version';")
    if not r.ok:
        if "doesn't exist" in r.stderr:
            return None
        raise HostFailed(f"cannot read Roundcube's schema through the DB proxy: {r.stderr.strip()}")
    return r.stdout.strip() or None


def shipped_version(h: HostSession) -> str:
    """The schema version Debian's package ships (the last `mysql/` update, or the initial one)."""
    out = h.read(f"grep -ho \"'roundcube-version', '[0-9]*'\" {RC_SQL}/mysql.initial.sql | tail -1")
    return out.strip().rsplit("'", 2)[-2]


NO_PK_SQL = ("SELECT t.TABLE_NAME FROM information_schema.TABLES t LEFT JOIN information_schema.TABLE_CONSTRAINTS c "
             "ON c.TABLE_SCHEMA = t.TABLE_SCHEMA AND c.TABLE_NAME = t.TABLE_NAME AND c.CONSTRAINT_TYPE = 'PRIMARY KEY' "
             f"WHERE t.TABLE_SCHEMA = '{topology.ROUNDCUBE_DB}' AND t.TABLE_TYPE = 'BASE TABLE' "
             "AND c.CONSTRAINT_NAME IS NULL;")


def schema(h: HostSession) -> None:
    if h.run.check and not h.probe(f"test -s {CLIENT_CNF}").ok:
        h.changed(f"would create Roundcube's schema from {RC_SQL}/mysql.initial.sql")
        return
    have, target = schema_version(h), shipped_version(h)
    if have is None:
        h.sh(_mysql(f"{RC_SQL}/mysql.initial.sql"), message=f"Roundcube schema created (version {target})")
    elif have < target:
        h.sh(f"/usr/share/roundcube/bin/updatedb.sh --package=roundcube --dir={RC_SQL}",
             message=f"Roundcube schema updated from {have}")
    else:
        h.ok(f"Roundcube schema at version {have}")
    if not h.run.check:
        r = h.probe(_mysql(), stdin=NO_PK_SQL)
        bad = r.stdout.split() if r.ok else ["(the check failed: " + r.stderr.strip() + ")"]
        if bad:
            raise HostFailed(f"Roundcube tables without a primary key (Galera refuses writes to them): {', '.join(bad)}")


@runbook(default=True)
def deploy(run):
    """Converge Roundcube (nginx + php-fpm) on the webmail front ends; the VIP is keepalived's."""
    converge(run)


@runbook(readonly=True)
def status(run):
    """Per front end: nginx and php-fpm, Roundcube's login page over HTTPS, its schema version."""
    def one(h: HostSession) -> None:
        units = {u: h.probe(f"systemctl is-active {u}").stdout.strip() for u in ("nginx", PHP_FPM)}
        addr = h.inv.service_address(h.name)
        code = h.probe(f"curl -s -o /dev/null -w '%{{http_code}}' --cacert {topology.CA_FILE} "
                       f"--resolve {q(h.inv.fqdn(h.name) + ':443:' + addr)} {q('https://' + h.inv.fqdn(h.name) + '/')}"
                       ).stdout.strip()
        version = schema_version(h) if h.probe(f"test -s {CLIENT_CNF}").ok else None
        h.ok(", ".join(f"{u} {s}" for u, s in units.items()) + f"; login page HTTP {code or '-'}; "
             f"schema {version or 'none'}")

    run.step("webmail: status", run.hosts(ROLE), one)


ns = Collection("webmail", deploy, status)
