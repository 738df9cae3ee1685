"""ejabberd tier (XMPP service): Debian 12's ejabberd 23.01, two or more nodes in
one Erlang cluster, SQL auth and storage on the PostgreSQL primary, TLS from the
site CA.

Runbook:
1. Packages. ejabberd is installed with a policy-rc.d that forbids starting
   services, so it never starts under Debian's default node name: the node
   name `ejabberd@<host>` is in /etc/default/ejabberd (= ejabberdctl.cfg)
   before the first start, and no mnesia rename is ever needed.
2. Files: ejabberdctl.cfg (node name, distribution port window 4200-4210 on the
   host's service address), ejabberd.yml (domain, admins, SQL on the primary,
   the host's certificate from the site CA, c2s STARTTLS required), parsed as
   YAML before upload and re-checked by `ejabberdctl reload_config` on a
   running node (the old file comes back if it is refused), and the Erlang
   cookie (generated once, shared by the nodes, 0400 ejabberd). The ejabberd
   user joins ssl-cert to read its key in /etc/ssl/hastack.
3. The SQL schema (the shipped pg.sql), once: applied on the primary as the
   ejabberd role when its tables are missing.
4. Start (restart when a file changed) and wait until the node answers.
5. Cluster: every node but the first runs `join_cluster ejabberd@<first>`,
   skipped when `list_cluster` already shows both.

Ops tasks (register-user, unregister-user, change-password, list-users,
cluster-status) work against whichever ejabberd node answers.
"""

from __future__ import annotations

import getpass
import re
import shlex

import yaml
from invoke import Collection

from . import pki, postgres
from .base import service_address
from .core import HostFailed, HostSession, Run, UserError, runbook
from .core.templates import HEADER_MARK
from .core.inventory import Inventory

ROLE = "ejabberd"
PACKAGES = ["ejabberd", "erlang-p1-pgsql", "postgresql-client", "ssl-cert"]
CONFIG = "/etc/ejabberd/ejabberd.yml"
CTL_CONFIG = "/etc/default/ejabberd"  # /etc/ejabberd/ejabberdctl.cfg links here
COOKIE = "/var/lib/ejabberd/.erlang.cookie"
SCHEMA = "/usr/share/ejabberd/sql/pg.sql"
SECRET_COOKIE = "ejabberd_erlang_cookie"
POLICY_RC = "/usr/sbin/policy-rc.d"
DIST_PORTS = "4200-4210"
CTL = "ejabberdctl"
WAIT_STARTED = f"for i in $(seq 90); do {CTL} status >/dev/null 2>&1 && exit 0; sleep 1; done; exit 1"

# RFC 7622 localpart (nodeprep): no spaces, no "&'/:<>@ and no control characters.
LOCALPART = re.compile(r"^[^\s\"&'/:<>@\x00-\x1f\x7f]{1,1023}$")


# --- what the inventory says ------------------------------------------------------------


def nodes(inv: Inventory) -> list[str]:
    return inv.with_role(ROLE)


def node_name(host: str) -> str:
    return f"ejabberd@{host}"


def domain(inv: Inventory) -> str:
    if inv.xmpp is None:
        raise UserError(f"{inv.path}: the inventory has no 'xmpp' section")
    return inv.xmpp.domain


def admin_jids(inv: Inventory) -> list[str]:
    if inv.xmpp is None:
        return []
    dom = inv.xmpp.domain
    return [a if "@" in a else f"{a}@{dom}" for a in inv.xmpp.admins]


def parse_jid(inv: Inventory, user: str) -> tuple[str, str]:
    """(localpart, domain) of USER or USER@DOMAIN; a UserError names what is wrong."""
    dom = domain(inv)
    if not user or not user.strip():
        raise UserError("empty user name; give USER or USER@" + dom)
    local, at, host = user.partition("@")
    if at and "/" in host:
        raise UserError(f"{user!r} is not a bare JID (no /resource); give USER or USER@{dom}")
    if at and host.lower() != dom:
        raise UserError(f"{user!r}: domain {host!r} is not served here (the XMPP domain is {dom})")
    if not LOCALPART.match(local):
        raise UserError(f"{user!r} is not a valid JID: the user part may not be empty or contain spaces "
                        "or any of \" & ' / : < > @")
    return local.lower(), dom


def check_password(password: str | None) -> str:
    if password is None or password == "":
        raise UserError("empty password refused; nothing was changed")
    if password != password.strip() or "\n" in password:
        raise UserError("the password may not start or end with white space or hold a newline")
    return password


def template_vars(inv: Inventory, host: str, secret) -> dict:
    prim = inv.with_role(postgres.PRIMARY_ROLE)
    return {
        "xmpp_domain": inv.xmpp.domain if inv.xmpp else inv.site.domain,
        "xmpp_admins": admin_jids(inv),
        "ejabberd_node": node_name(host),
        "ejabberd_dist_ports": DIST_PORTS,
        "ejabberd_dist_address": service_address(inv, host),
        "ejabberd_cert": pki.cert_path(host),
        "ejabberd_key": pki.key_path(host),
        "ejabberd_ca": pki.CA_FILE,
        "ejabberd_sql_server": service_address(inv, prim[0]) if prim else "",
        "ejabberd_sql_database": postgres.DB,
        "ejabberd_sql_user": postgres.DB_USER,
        "ejabberd_sql_password": secret(postgres.SECRET_DB),
        "ejabberd_cookie": secret(SECRET_COOKIE),
    }


def render_config(inv: Inventory, host: str, secret) -> str:
    """ejabberd.yml for ``host``, checked: valid YAML with the settings we rely on."""
    from .core import templates

    text = templates.render("ejabberd/etc/ejabberd/ejabberd.yml.j2", inv, host, secret)
    check_config(text, domain(inv))
    return text


def check_config(text: str, dom: str) -> dict:
    """Parse ejabberd.yml; a UserError says what is wrong."""
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise UserError(f"ejabberd.yml does not parse as YAML: {exc}") from None
    if not isinstance(data, dict):
        raise UserError("ejabberd.yml must be a YAML mapping")
    if data.get("hosts") != [dom]:
        raise UserError(f"ejabberd.yml: hosts must be [{dom}] (got {data.get('hosts')!r})")
    for key in ("sql_type", "sql_server", "sql_database", "sql_username", "sql_password", "certfiles", "listen"):
        if not data.get(key):
            raise UserError(f"ejabberd.yml: {key} is missing or empty")
    c2s = [lst for lst in data["listen"] if lst.get("module") == "ejabberd_c2s" and not lst.get("tls")]
    if not c2s or not all(lst.get("starttls_required") for lst in c2s):
        raise UserError("ejabberd.yml: every c2s listener must have starttls_required: true")
    return data


# --- converge ----------------------------------------------------------------------------------


def converge(run: Run) -> None:
    inv = run.inv
    hosts = run.hosts(ROLE)
    if not hosts:
        run.report.note("ejabberd: no hosts selected")
        return
    run.secret(SECRET_COOKIE)
    run.secret(postgres.SECRET_DB)
    run.step("ejabberd: packages (not started under a default node name)", hosts, _packages)
    changed: dict[str, bool] = {}
    run.step("ejabberd: configuration, certificate access, Erlang cookie", hosts,
             lambda h: changed.__setitem__(h.name, _configure(h)))
    prim = postgres.primary(inv)
    first = nodes(inv)[0]
    schema: dict[str, str] = {}
    if first in hosts or prim in run.hosts(postgres.PRIMARY_ROLE):
        run.step("ejabberd: SQL schema on the PostgreSQL primary (once)", [prim],
                 lambda h: _schema(h, run, first, schema))
    run.step("ejabberd: running", hosts, lambda h: _running(h, changed.get(h.name, False)))
    joiners = [h for h in hosts if h != first]
    run.step(f"ejabberd: cluster ({node_name(first)})", joiners, lambda h: _join(h, first))


def _packages(h: HostSession) -> None:
    have = h.probe("dpkg-query -W -f='${db:Status-Status}' ejabberd").stdout.strip()
    if have != "installed":
        if h.probe(f"test -e {POLICY_RC}").ok and not h.probe(f"grep -q hastack {POLICY_RC}").ok:
            raise HostFailed(f"{POLICY_RC} exists and is not ours; refusing to replace it to install ejabberd")
        # A policy-rc.d (exit 101) keeps the package from starting ejabberd (and
        # epmd) as ejabberd@localhost before our node name is in place.
        h.sh(f"printf '#!/bin/sh\\n# hastack: no service starts while ejabberd is installed\\nexit 101\\n' "
             f"> {POLICY_RC} && chmod 0755 {POLICY_RC}",
             message=f"{POLICY_RC}: no service starts during the install")
        try:
            h.packages(PACKAGES)
        finally:
            h.sh(f"rm -f {POLICY_RC}", message=f"remove {POLICY_RC}")
    else:
        h.packages(PACKAGES)


def _configure(h: HostSession) -> bool:
    inv = h.inv
    changed = False
    ours = h.probe(f"grep -qF '{HEADER_MARK}' {CTL_CONFIG}").ok
    if not ours and h.probe("test -e /var/lib/ejabberd/schema.DAT").ok:
        # ejabberd ran before we named the node (installed by hand): its mnesia
        # schema belongs to another node name, and ejabberd@<host> would not start.
        raise HostFailed(
            "ejabberd already ran here under another node name (a mnesia schema is in /var/lib/ejabberd, "
            f"{CTL_CONFIG} is not ours); nothing was changed. Rename the node with the documented sequence "
            "(ejabberdctl backup, mnesia_change_nodename, install_fallback) or, if the node holds nothing "
            "(users and data are in PostgreSQL), stop ejabberd, remove /var/lib/ejabberd/*.DAT *.LOG *.DCD "
            "and deploy again")
    changed |= h.template("ejabberd/etc/default/ejabberd.j2", CTL_CONFIG, validate="sh -n {}")
    text = render_config(inv, h.name, h.run.secret)
    # Only against a running service: any ejabberdctl call starts an epmd of its own
    # when none listens, which would then keep epmd.socket from starting.
    running = "if systemctl is-active --quiet ejabberd; then ejabberdctl reload_config; fi"
    changed |= h.put(text, CONFIG, owner="ejabberd", group="ejabberd", mode="0600", validate=running)
    changed |= h.template("ejabberd/var/lib/ejabberd/.erlang.cookie.j2", COOKIE, owner="ejabberd",
                          group="ejabberd", mode="0400")
    if h.probe("id -nG ejabberd | tr ' ' '\\n' | grep -qx ssl-cert").ok:
        h.ok("user ejabberd in group ssl-cert (reads its key)")
    else:
        h.sh("usermod -a -G ssl-cert ejabberd", message="user ejabberd joins group ssl-cert (reads its key)")
        changed = True
    return changed


def _schema(h: HostSession, run: Run, first: str, out: dict) -> None:
    present = h.probe(postgres._sql("SELECT to_regclass('public.users') IS NOT NULL", postgres.DB))
    if present.ok and present.stdout.strip() == "t":
        h.ok(f"ejabberd schema present in database {postgres.DB}")
        return
    if run.check:
        h.changed(f"would load {SCHEMA} (from {first}) into database {postgres.DB} as {postgres.DB_USER}")
        return
    sql = run.session(first).read(f"cat {SCHEMA}")
    if "CREATE TABLE users" not in sql:
        raise HostFailed(f"{first}:{SCHEMA} does not look like ejabberd's PostgreSQL schema")
    stdin = f'SET ROLE "{postgres.DB_USER}";\nBEGIN;\n{sql}\nCOMMIT;\n'
    h.sh(f"{postgres.PSQL} -d {postgres.DB} -f -", stdin=stdin,
         message=f"load ejabberd's {SCHEMA} into {postgres.DB} (tables owned by {postgres.DB_USER})")


def _epmd(h: HostSession) -> None:
    """epmd from its systemd socket (ejabberd.service requires epmd.service)."""
    if h.probe("systemctl is-active --quiet epmd.socket").ok:
        h.ok("epmd.socket listening")
        return
    if h.probe("epmd -names").ok:
        # An epmd started by some erl command (not by systemd) holds port 4369.
        h.sh("epmd -kill", message="stop an epmd started outside systemd, so that epmd.socket can listen")
    h.sh("systemctl reset-failed epmd.socket epmd.service; systemctl start epmd.socket",
         message="start epmd.socket")


def _running(h: HostSession, changed: bool) -> None:
    _epmd(h)
    h.service("ejabberd", restart=changed and not h.run.check)
    if h.run.check:
        return
    if not h.probe(WAIT_STARTED).ok:
        log = h.probe("tail -n 20 /var/log/ejabberd/error.log /var/log/ejabberd/ejabberd.log 2>/dev/null")
        raise HostFailed(f"ejabberd did not start within 90 s on {node_name(h.name)}:\n{log.stdout.strip()}")
    running = h.read(f"{CTL} status").strip().splitlines()
    h.ok(running[0] if running else f"{node_name(h.name)} started")


def cluster_members(text: str) -> list[str]:
    """Node names in `ejabberdctl list_cluster` output (one per line, maybe quoted)."""
    return [m for m in re.findall(r"ejabberd@[A-Za-z0-9_.-]+", text)]


def _join(h: HostSession, first: str) -> None:
    want = node_name(first)
    have = h.probe(f"{CTL} list_cluster")
    if have.ok and want in cluster_members(have.stdout):
        h.ok(f"in the cluster: {', '.join(cluster_members(have.stdout))}")
        return
    # join_cluster restarts the ejabberd application inside the node, which tells
    # systemd STOPPING=1: the unit would hang in "deactivating" until its stop
    # timeout. So the node is stopped cleanly (`ejabberdctl stop` + `stopped`: the
    # unit ends with status 0) and started again by systemd; mnesia keeps the
    # membership.
    h.sh(f"{CTL} --no-timeout join_cluster {want} && {CTL} stop && {CTL} stopped "
         f"&& systemctl start ejabberd && {WAIT_STARTED}",
         message=f"join_cluster {want}, then restart the unit cleanly", timeout=300)
    if not h.run.check:
        after = h.read(f"{CTL} list_cluster")
        if want not in cluster_members(after):
            raise HostFailed(f"join_cluster {want} returned but list_cluster shows: {after.strip()}")
        h.ok(f"cluster now: {', '.join(cluster_members(after))}")


# --- ops: against whichever node answers ---------------------------------------------------------


def _answering(run: Run) -> HostSession:
    """The first ejabberd node (inventory order, narrowed by --hosts) whose ejabberd answers."""
    tried = []
    for host in run.hosts(ROLE):
        try:
            h = run.session(host)
            h.open()
        except UserError as exc:
            tried.append(str(exc))
            continue
        r = h.probe(f"{CTL} status")
        if r.ok:
            return h
        last = ((r.stdout or r.stderr).strip().splitlines() or ["no answer"])[-1]
        tried.append(f"{host}: ejabberd not running ({last})")
    raise UserError("no ejabberd node answers, nothing was changed (" + "; ".join(tried or ["no ejabberd hosts"])
                    + ")")


def _exists(h: HostSession, user: str, dom: str) -> bool:
    return h.probe(f"{CTL} check_account {shlex.quote(user)} {shlex.quote(dom)}").ok


def _account_step(run: Run, title: str, action) -> None:
    h = _answering(run)
    run.report.step(title, [h.name])
    try:
        action(h)
    except HostFailed as exc:
        run.report.result(h.name, "failed", str(exc))
        raise UserError(f"{h.name}: {exc}") from None


def _ask_password(password: str | None) -> str:
    if password is None:
        password = getpass.getpass("password: ")
        if password and getpass.getpass("again: ") != password:
            raise UserError("the passwords differ; nothing was changed")
    return check_password(password)


@runbook(positional=["user", "password"],
         help={"user": "USER or USER@DOMAIN (the inventory's xmpp.domain)",
               "password": "the password (asked for when not given; prefer the prompt: arguments land in "
                           "the shell history)",
               "update": "set the password of an existing user instead of refusing"})
def register_user(run, user, password=None, update=False):
    """Register an XMPP user (refuses an existing one unless --update)."""
    local, dom = parse_jid(run.inv, user)
    password = _ask_password(password)
    jid = f"{local}@{dom}"

    def act(h: HostSession) -> None:
        if _exists(h, local, dom):
            if not update:
                raise UserError(f"{jid} is already registered (use --update to set its password)")
            h.sh(f'{CTL} change_password {local} {dom} "$(cat)"', stdin=password,
                 message=f"{jid}: password changed")
            return
        h.sh(f'{CTL} register {local} {dom} "$(cat)"', stdin=password, message=f"registered {jid}")

    _account_step(run, f"ejabberd: register {jid}", act)


@runbook(help={"user": "USER or USER@DOMAIN"})
def unregister_user(run, user):
    """Remove an XMPP user (nothing to do when it does not exist)."""
    local, dom = parse_jid(run.inv, user)
    jid = f"{local}@{dom}"

    def act(h: HostSession) -> None:
        if not _exists(h, local, dom):
            h.ok(f"{jid} is not registered")
            return
        h.sh(f"{CTL} unregister {local} {dom}", message=f"unregistered {jid}")

    _account_step(run, f"ejabberd: unregister {jid}", act)


@runbook(positional=["user", "password"], help={"user": "USER or USER@DOMAIN",
               "password": "the new password (asked for when not given)"})
def change_password(run, user, password=None):
    """Set a registered XMPP user's password."""
    local, dom = parse_jid(run.inv, user)
    password = _ask_password(password)
    jid = f"{local}@{dom}"

    def act(h: HostSession) -> None:
        if not _exists(h, local, dom):
            raise UserError(f"{jid} is not registered; nothing was changed")
        h.sh(f'{CTL} change_password {local} {dom} "$(cat)"', stdin=password, message=f"{jid}: password changed")

    _account_step(run, f"ejabberd: change the password of {jid}", act)


@runbook
def list_users(run):
    """List the registered users of the XMPP domain."""
    dom = domain(run.inv)

    def act(h: HostSession) -> None:
        users = h.read(f"{CTL} registered_users {dom}").split()
        h.ok(f"{len(users)} user(s) on {dom}" + (": " + ", ".join(f"{u}@{dom}" for u in users) if users else ""))
        for u in users:
            print(f"{u}@{dom}")

    _account_step(run, f"ejabberd: users of {dom}", act)


def _node_status(h: HostSession, vip: str | None) -> None:
    up = h.probe(f"{CTL} status")
    holds = bool(vip) and h.probe(f"ip -o -4 addr show | grep -qw {shlex.quote(vip)}").ok
    vip_text = f"holds the VIP {vip}" if holds else "no VIP"
    if not up.ok:
        h.run.report.result(h.name, "failed", f"{node_name(h.name)} not running; {vip_text}")
        return
    members = cluster_members(h.probe(f"{CTL} list_cluster").stdout)
    sessions = h.probe(f"{CTL} connected_users_number").stdout.strip() or "?"
    h.ok(f"{node_name(h.name)} running; cluster: {', '.join(members) or '?'}; {sessions} session(s); {vip_text}")


@runbook
def cluster_status(run):
    """Show each ejabberd node: running, cluster members, sessions, who holds the VIP."""
    vip = run.inv.vips.get("xmpp")
    address = str(vip.address) if vip else None
    run.step("ejabberd: cluster status", run.hosts(ROLE), lambda h: _node_status(h, address))


@runbook(default=True)
def deploy(run):
    """Converge ejabberd: packages, config, cookie, schema, start, cluster."""
    converge(run)


ns = Collection("ejabberd", deploy, register_user, unregister_user, change_password, list_users, cluster_status)
