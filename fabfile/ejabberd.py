"""ejabberd tier (XMPP service): Debian 12's ejabberd 23.01, two or more nodes in
one Erlang cluster, SQL auth and storage on the PostgreSQL primary, TLS from the
site CA.

Runbook:
1. Packages, installed without starting any service (policy-rc.d), so
   ejabberd never starts under Debian's default node name: the node
   name `ejabberd@<host>` is in /etc/default/ejabberd (= ejabberdctl.cfg)
   before the first start, and no mnesia rename is ever needed.
2. Files: ejabberdctl.cfg (node name, distribution port window 4200-4210 on the
   host's service address), ejabberd.yml (domain, admins, SQL on the primary,
   the host's certificate from the site CA, c2s STARTTLS required, multi-user
   chat on conference.<domain>, publish-subscribe on pubsub.<domain>, MQTT on
   1883 over TLS for the same accounts; every module on SQL), parsed as
   YAML before upload and re-checked by `ejabberdctl reload_config` on a
   running node (the old file comes back if it is refused), and the Erlang
   cookie (generated once, shared by the nodes, 0400 ejabberd). The ejabberd
   user joins ssl-cert to read its key in /etc/ssl/hastack.
3. The SQL schema (the shipped pg.sql), once: applied on the primary as the
   ejabberd role when its tables are missing; a database that has the users
   table but not the tables of the modules we load (MUC, pubsub, MQTT) is
   reported, never half-loaded.
4. Start (restart when a file changed) and wait until the node runs ejabberd.
5. Cluster: every node but the first runs `join_cluster ejabberd@<first>`,
   skipped when the cluster's nodes, as both see them, already hold both.
   The deploy reads a node's state (started, the cluster's nodes, the admin
   accounts) with erl_call, a C client of the node's Erlang distribution
   (10 ms where each ejabberdctl call boots an Erlang VM, 0.4 s of CPU);
   every change still goes through ejabberdctl.
6. Admin accounts (xmpp.admins of the XMPP domain), on one node: registered
   once with a password generated into the secrets file (`ejabberd_admin_<name>`,
   on standard input); an existing account is left alone, and when its password
   is no longer the one in the secrets file (someone changed it) that is
   reported, not overwritten. `inv ejabberd.admin-password NAME` says where the
   password is.

Ops tasks (register-user, unregister-user, change-password, list-users,
cluster-status) work against whichever ejabberd node answers; admin-password
reads only the inventory and the secrets file. User names are checked (RFC 7622
localpart) before any connection and quoted on the command line; passwords (--password, --password-file FILE or -, else a hidden prompt)
reach ejabberdctl on standard input only.
"""

from __future__ import annotations

import re
from typing import TYPE_CHECKING

import yaml
from invoke import Collection

from .core import HostFailed, UserError, join, prompt, q, runbook, topology
from .core.sql import pg_ident, psql, psql_c
from .core.templates import HEADER_MARK

if TYPE_CHECKING:
    from .core import HostSession, Run
    from .core.inventory import Inventory

ROLE = topology.EJABBERD
PACKAGES = ["ejabberd", "erlang-p1-pgsql", "postgresql-client", "ssl-cert"]
CONFIG = "/etc/ejabberd/ejabberd.yml"
CTL_CONFIG = "/etc/default/ejabberd"  # /etc/ejabberd/ejabberdctl.cfg links here
COOKIE = "/var/lib/ejabberd/.erlang.cookie"
SCHEMA = "/usr/share/ejabberd/sql/pg.sql"
SECRET_COOKIE = "ejabberd_erlang_cookie"
SECRET_ADMIN = "ejabberd_admin_{}"  # one generated password per xmpp.admins entry of the domain
# The tables of pg.sql the modules we load use (auth, MUC, pubsub, MQTT): checked on the primary.
SCHEMA_TABLES = ("users", "muc_room", "muc_registered", "pubsub_node", "pubsub_item", "mqtt_pub")
DIST_PORTS = "4200-4210"
CTL = "ejabberdctl"
STATUS = f"{CTL} status"
START_TIMEOUT = 90
# The deploy reads a node's state with erl_call (erlang-base): a small C client of the
# node's Erlang distribution, about 10 ms, where every ejabberdctl call boots an Erlang
# VM of its own (0.4 s of CPU). The expression comes on standard input, the cookie from
# the ejabberd user's home (never on a command line); changes still go through ejabberdctl.
ERL_CALL = "runuser -u ejabberd -- env HOME=/var/lib/ejabberd erl_call -timeout 10 -sname {node} -e"
# {started | not_started, the cluster's nodes}: started = ejabberdctl status's test
# (the ejabberd application runs in the node).
NODE_STATE = ("{case catch ejabberd_admin:status() of {ok, _} -> started; _ -> not_started end, "
              "ejabberd_cluster:get_nodes()}.")

# RFC 7622 localpart (nodeprep): no spaces, no "&'/:<>@ and no control characters.
LOCALPART = re.compile(r"[^\s\"&'/:<>@\x00-\x1f\x7f]{1,1023}")


# --- what the inventory says ------------------------------------------------------------


def node_name(host: str) -> str:
    return f"ejabberd@{host}"


def erl_call(host: str) -> str:
    """The command evaluating the Erlang expression on its standard input in ``host``'s node."""
    return ERL_CALL.format(node=q(node_name(host)))


def started(host: str) -> str:
    """A command that succeeds once ``host``'s node runs ejabberd (awaited with h.wait_for)."""
    return f"printf '%s\\n' {q(NODE_STATE)} | {erl_call(host)} 2>/dev/null | grep -q '^{{ok, {{started,'"


def erl_binary(text: str) -> str:
    """An Erlang binary of ``text``'s UTF-8 bytes, written as numbers: nothing in it to escape."""
    return "<<" + ",".join(str(b) for b in text.encode()) + ">>"


def admin_jids(inv: Inventory) -> list[str]:
    if inv.xmpp is None:
        return []
    dom = inv.xmpp.domain
    return [a if "@" in a else f"{a}@{dom}" for a in inv.xmpp.admins]


def local_admins(inv: Inventory) -> list[str]:
    """The user parts of the admins that are accounts of the XMPP domain (the
    accounts this tier registers); an admin JID of another server is only in the ACL."""
    if inv.xmpp is None:
        return []
    dom = inv.xmpp.domain.lower()
    out: list[str] = []
    for jid in admin_jids(inv):
        local, _, host = jid.lower().partition("@")
        if host == dom and local not in out:
            out.append(local)
    return out


def admin_secret(local: str) -> str:
    """The secrets-file key of an admin's generated password."""
    return SECRET_ADMIN.format(local)


muc_host, pubsub_host = topology.muc_host, topology.pubsub_host


def parse_jid(inv: Inventory, user: str) -> tuple[str, str]:
    """(localpart, domain) of USER or USER@DOMAIN; a UserError names what is wrong."""
    dom = topology.xmpp_domain(inv)
    if not user or not user.strip():
        raise UserError("empty user name; give USER or USER@" + dom)
    local, at, host = user.partition("@")
    if at and "/" in host:
        raise UserError(f"{user!r} is not a bare JID (no /resource); give USER or USER@{dom}")
    if at and host.lower() != dom:
        raise UserError(f"{user!r}: domain {host!r} is not served here (the XMPP domain is {dom})")
    if not LOCALPART.fullmatch(local):
        raise UserError(f"{user!r} is not a valid JID: the user part may not be empty or contain spaces, "
                        "control characters or any of \" & ' / : < > @")
    return local.lower(), dom


def check_password(password: str | None) -> str:
    if password is None or password == "":
        raise UserError("empty password refused; nothing was changed")
    if password != password.strip() or "\n" in password:
        raise UserError("the password may not start or end with white space or hold a newline")
    return password


def template_vars(inv: Inventory, host: str, secret) -> dict:
    prim = inv.with_role(topology.PG_PRIMARY)
    dom = inv.xmpp.domain if inv.xmpp else inv.site.domain
    return {
        "xmpp_domain": dom,
        "xmpp_muc_host": muc_host(dom),
        "xmpp_pubsub_host": pubsub_host(dom),
        "xmpp_admins": admin_jids(inv),
        "ejabberd_node": node_name(host),
        "ejabberd_dist_ports": DIST_PORTS,
        "ejabberd_dist_address": inv.service_address(host),
        "ejabberd_cert": topology.cert_path(host),
        "ejabberd_key": topology.key_path(host),
        "ejabberd_ca": topology.CA_FILE,
        "ejabberd_sql_server": inv.service_address(prim[0]) if prim else "",
        "ejabberd_sql_database": topology.XMPP_DB,
        "ejabberd_sql_user": topology.XMPP_DB_USER,
        "ejabberd_sql_password": secret(topology.XMPP_DB_SECRET),
        "ejabberd_cookie": secret(SECRET_COOKIE),
    }


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
    # MQTT clients send the account's password in CONNECT: never in clear.
    for lst in data["listen"]:
        if lst.get("module") == "mod_mqtt" and lst.get("tls") is not True:
            raise UserError(f"ejabberd.yml: the MQTT listener on port {lst.get('port')} must have tls: true "
                            "(its clients log in with their XMPP password)")
    return data


# --- converge ----------------------------------------------------------------------------------


def converge(run: Run) -> None:
    inv = run.inv
    hosts = run.hosts(ROLE)
    if not hosts:
        run.report.note("ejabberd: no hosts selected")
        return
    run.secret(SECRET_COOKIE)
    run.secret(topology.XMPP_DB_SECRET)
    run.step("ejabberd: packages (not started under a default node name)", hosts, _packages)
    changed: dict[str, bool] = {}
    run.step("ejabberd: configuration, certificate access, Erlang cookie", hosts,
             lambda h: changed.__setitem__(h.name, _configure(h)))
    prim = topology.pg_primary(inv)
    first = topology.ejabberd_nodes(inv)[0]
    if first in hosts or prim in run.hosts(topology.PG_PRIMARY):
        run.step("ejabberd: SQL schema on the PostgreSQL primary (once)", [prim], lambda h: _schema(h, first))
    run.step("ejabberd: running", hosts, lambda h: _running(h, changed.get(h.name, False)))
    members: list[str] | None = None
    if first in hosts:
        members = []
        run.step(f"ejabberd: the cluster as {first} sees it (members the inventory no longer has leave)", [first],
                 lambda h: members.extend(_cluster_view(h)))
    joiners = [h for h in hosts if h != first]
    run.step(f"ejabberd: cluster ({node_name(first)})", joiners, lambda h: _join(h, first, members))
    admins = local_admins(inv)
    for local in admins:
        run.secret(admin_secret(local))
    if admins:
        # Accounts live in SQL: one node registers them for the whole cluster.
        one = first if first in hosts else hosts[0]
        run.step("ejabberd: admin accounts (xmpp.admins)", [one], lambda h: _admins(h, admins))


def _packages(h: HostSession) -> None:
    # No service starts during the install: the package would start ejabberd (and
    # epmd) as ejabberd@localhost before our node name is in place.
    h.packages(PACKAGES, no_start=True)


def _configure(h: HostSession) -> bool:
    tvars = h.tier_vars(template_vars)
    dom = topology.xmpp_domain(h.inv)
    changed = False
    ours = h.probe(f"grep -qF {q(HEADER_MARK)} {CTL_CONFIG}").ok
    if not ours and h.probe("test -e /var/lib/ejabberd/schema.DAT").ok:
        # ejabberd ran before we named the node (installed by hand): its mnesia
        # schema belongs to another node name, and ejabberd@<host> would not start.
        raise HostFailed(
            "ejabberd already ran here under another node name (a mnesia schema is in /var/lib/ejabberd, "
            f"{CTL_CONFIG} is not ours); nothing was changed. Rename the node with the documented sequence "
            "(ejabberdctl backup, mnesia_change_nodename, install_fallback) or, if the node holds nothing "
            "(users and data are in PostgreSQL), stop ejabberd, remove /var/lib/ejabberd/*.DAT *.LOG *.DCD "
            "and deploy again")
    changed |= h.template("ejabberd/etc/default/ejabberd.j2", CTL_CONFIG, tvars, validate="sh -n {}")
    # ejabberd.yml is parsed here before upload (check_config); then `reload_config`
    # checks it, only against a running service: any ejabberdctl call starts an epmd
    # of its own when none listens, which would then keep epmd.socket from starting.
    running = "if systemctl is-active --quiet ejabberd; then ejabberdctl reload_config; fi"
    changed |= h.template("ejabberd/etc/ejabberd/ejabberd.yml.j2", CONFIG, tvars, owner="ejabberd", group="ejabberd",
                          mode="0600", validate=running, check=lambda text: check_config(text, dom))
    changed |= h.template("ejabberd/var/lib/ejabberd/.erlang.cookie.j2", COOKIE, tvars, owner="ejabberd",
                          group="ejabberd", mode="0400")
    changed |= topology.key_reader(h, "ejabberd", "ejabberd reads the host key")
    return changed


def _schema(h: HostSession, first: str) -> None:
    db, owner = topology.XMPP_DB, topology.XMPP_DB_USER
    tables = ", ".join(f"'{t}'" for t in SCHEMA_TABLES)
    present = h.probe(psql_c(f"SELECT t FROM unnest(ARRAY[{tables}]) AS t "
                             "WHERE to_regclass('public.' || t) IS NULL", db))
    missing = present.stdout.split() if present.ok else list(SCHEMA_TABLES)
    if not missing:
        h.ok(f"ejabberd schema present in database {db} ({', '.join(SCHEMA_TABLES)})")
        return
    if "users" not in missing:
        # pg.sql creates every table at once: loading it again would fail on the first one.
        raise HostFailed(f"database {db} has ejabberd's users table but not {', '.join(missing)} "
                         f"(a schema older than {SCHEMA}): create them from that file as {owner}; "
                         "nothing was changed")
    if h.run.check:
        h.changed(f"would load {SCHEMA} (from {first}) into database {db} as {owner}")
        return
    sql = h.run.session(first).read(f"cat {SCHEMA}")
    if "CREATE TABLE users" not in sql:
        raise HostFailed(f"{first}:{SCHEMA} does not look like ejabberd's PostgreSQL schema")
    stdin = f"SET ROLE {pg_ident(owner)};\nBEGIN;\n{sql}\nCOMMIT;\n"
    h.sh(f"{psql(db)} -f -", stdin=stdin, message=f"load ejabberd's {SCHEMA} into {db} (tables owned by {owner})")


def _admins(h: HostSession, admins: list[str]) -> None:
    """Each admin account registered once with its generated password (on stdin).
    An existing account is left as it is; a password that is not the one in the
    secrets file is reported, not overwritten: someone set or changed it on
    purpose, and overwriting it would lock out whoever uses it. Whether each
    account exists and has its password is one erl_call (the passwords inside
    the expression on its standard input, as numbers)."""
    dom = topology.xmpp_domain(h.inv)
    where = h.run.secrets.path
    states = _admin_states(h, dom, admins)
    for local, (exists, same) in zip(admins, states):
        jid, key = f"{local}@{dom}", admin_secret(local)
        if not exists:
            _set_password(h, "register", local, dom, h.run.secret(key),
                          f"registered admin {jid} (password: {key} in {where})")
        elif same:
            h.ok(f"admin {jid} registered, password as in {key}")
        else:
            h.ok(f"admin {jid} registered; its password is not the one in {key}: left as it is")
            h.note(f"{jid}: the account's password was set by hand or changed since; {key} in {where} "
                   "does not hold it. Keep it so, or set the generated one again with "
                   f"`inv ejabberd.change-password {jid} --password-file FILE`")


def _admin_states(h: HostSession, dom: str, admins: list[str]) -> list[tuple[bool, bool]]:
    """(registered, password is the secrets file's) of each admin, read in the node."""
    accounts = ", ".join(f"{{{erl_binary(local)}, {erl_binary(h.run.secret(admin_secret(local)))}}}"
                         for local in admins)
    expr = (f"S = {erl_binary(dom)}, [{{ejabberd_auth:user_exists(U, S), ejabberd_auth:check_password(U, <<>>, S, P)}}"
            f" || {{U, P}} <- [{accounts}]].\n")
    r = h.probe(erl_call(h.name), stdin=expr)
    states = re.findall(r"\{(true|false), ?(true|false)\}", r.stdout) if r.ok and r.stdout.startswith("{ok,") else []
    if len(states) == len(admins):
        return [(exists == "true", same == "true") for exists, same in states]
    if h.run.check:  # a fresh site: ejabberd is not even installed yet, it would be registered
        return [(False, False)] * len(admins)
    said = (r.stdout or r.stderr).strip()
    raise HostFailed(f"reading the admin accounts in {node_name(h.name)} (erl_call) failed, exit {r.exited}: "
                     f"{said[:200] or 'no output'}; nothing was changed")


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
    try:
        h.wait_for(started(h.name), timeout=START_TIMEOUT, what=f"ejabberd started as {node_name(h.name)}")
    except HostFailed as exc:
        log = h.probe("tail -n 20 /var/log/ejabberd/error.log /var/log/ejabberd/ejabberd.log 2>/dev/null")
        raise HostFailed(f"{exc}:\n{log.stdout.strip()}") from None
    h.ok(f"{node_name(h.name)} started, ejabberd running")


def node_members(h: HostSession) -> list[str] | None:
    """The cluster's nodes as ``h``'s node lists them (erl_call); None when it does not answer."""
    r = h.probe(erl_call(h.name), stdin=NODE_STATE + "\n")
    return cluster_members(r.stdout) if r.ok and r.stdout.startswith("{ok,") else None


def cluster_members(text: str) -> list[str]:
    """Node names in `ejabberdctl list_cluster` output (one per line, maybe quoted)."""
    return [m for m in re.findall(r"ejabberd@[A-Za-z0-9_.-]+", text)]


def _cluster_view(h: HostSession) -> list[str]:
    """The members the first node lists; a member that is no node of the inventory
    (retired by `inv rescue.replace`, or taken out of the inventory) is removed from
    the cluster here (`leave_cluster` works for a node that is down too)."""
    members = node_members(h) or [node_name(h.name)]
    wanted = {node_name(n) for n in topology.ejabberd_nodes(h.inv)}
    stale = [m for m in members if m not in wanted]
    for m in stale:
        h.sh(f"{CTL} leave_cluster {q(m)}", message=f"leave_cluster {m}: not an ejabberd node of the inventory",
             timeout=120)
    if not stale:
        h.ok(f"cluster: {', '.join(members)}")
    return [m for m in members if m not in stale]


def _join(h: HostSession, first: str, members: list[str] | None = None) -> None:
    """``h`` in the cluster of ``first``: as ``first`` sees it (``members``, when it was
    read), and as ``h`` itself sees it (a node that comes back after it was removed
    may still list the cluster it was taken out of)."""
    want = node_name(first)
    mine = node_members(h) or []
    if want in mine and (members is None or node_name(h.name) in members):
        h.ok(f"in the cluster: {', '.join(mine)}")
        return
    # join_cluster restarts the ejabberd application inside the node, which tells
    # systemd STOPPING=1: the unit would hang in "deactivating" until its stop
    # timeout. So the node is stopped cleanly (`ejabberdctl stop` + `stopped`: the
    # unit ends with status 0) and started again by systemd; mnesia keeps the
    # membership.
    h.sh(f"{CTL} --no-timeout join_cluster {q(want)} && {CTL} stop && {CTL} stopped && systemctl start ejabberd",
         message=f"join_cluster {want}, then restart the unit cleanly", timeout=300)
    h.wait_for(started(h.name), timeout=START_TIMEOUT,
               what=f"ejabberd started again as {node_name(h.name)} after the join")
    if not h.run.check:
        after = h.read(f"{CTL} list_cluster")
        if want not in cluster_members(after):
            raise HostFailed(f"join_cluster {want} returned but list_cluster shows: {after.strip()}")
        h.ok(f"cluster now: {', '.join(cluster_members(after))}")


# --- ops: against whichever node answers ---------------------------------------------------------


def _node(run: Run) -> HostSession:
    """The first ejabberd node (inventory order, narrowed by --hosts) that answers."""
    return run.answering(run.hosts(ROLE), what="ejabberd node", probe=STATUS)


def _exists(h: HostSession, user: str, dom: str) -> bool:
    return h.probe(join(CTL, "check_account", user, dom)).ok


def _set_password(h: HostSession, verb: str, user: str, dom: str, password: str, message: str) -> None:
    """`ejabberdctl register|change_password USER DOMAIN PASSWORD`, the password read from stdin."""
    h.sh(join(CTL, verb, user, dom) + ' "$(cat)"', stdin=password, message=message)


def _password(password: str | None, password_file: str | None) -> str:
    return prompt.password(password, file=password_file, check=check_password)


PASSWORD_HELP = {
    "user": "USER or USER@DOMAIN (the inventory's xmpp.domain)",
    "password": "the password (asked for, hidden, when not given; prefer the prompt or --password-file: "
                "arguments land in the shell history)",
    "password_file": "read the password from the first line of this file (- = standard input)",
}


@runbook(positional=["user"], help={**PASSWORD_HELP,
                                    "update": "set the password of an existing user instead of refusing"})
def register_user(run, user, password=None, password_file=None, update=False):
    """Register an XMPP user (refuses an existing one unless --update)."""
    local, dom = parse_jid(run.inv, user)
    jid = f"{local}@{dom}"
    password = _password(password, password_file)

    def act(h: HostSession) -> None:
        if _exists(h, local, dom):
            if not update:
                raise UserError(f"{jid} is already registered (use --update to set its password)")
            _set_password(h, "change_password", local, dom, password, f"{jid}: password changed")
            return
        _set_password(h, "register", local, dom, password, f"registered {jid}")

    run.on_one(f"ejabberd: register {jid}", _node(run), act)


@runbook(positional=["user"], help={"user": "USER or USER@DOMAIN"})
def unregister_user(run, user):
    """Remove an XMPP user (nothing to do when it does not exist)."""
    local, dom = parse_jid(run.inv, user)
    jid = f"{local}@{dom}"

    def act(h: HostSession) -> None:
        if not _exists(h, local, dom):
            h.ok(f"{jid} is not registered")
            return
        h.sh(join(CTL, "unregister", local, dom), message=f"unregistered {jid}")

    run.on_one(f"ejabberd: unregister {jid}", _node(run), act)


@runbook(positional=["user"], help={**PASSWORD_HELP, "password": "the new password (asked for, hidden, when "
                                    "not given; prefer the prompt or --password-file)"})
def change_password(run, user, password=None, password_file=None):
    """Set a registered XMPP user's password."""
    local, dom = parse_jid(run.inv, user)
    jid = f"{local}@{dom}"
    password = _password(password, password_file)

    def act(h: HostSession) -> None:
        if not _exists(h, local, dom):
            raise UserError(f"{jid} is not registered; nothing was changed")
        _set_password(h, "change_password", local, dom, password, f"{jid}: password changed")

    run.on_one(f"ejabberd: change the password of {jid}", _node(run), act)


@runbook(readonly=True)
def list_users(run):
    """List the registered users of the XMPP domain."""
    dom = topology.xmpp_domain(run.inv)

    def act(h: HostSession) -> None:
        users = h.read(join(CTL, "registered_users", dom)).split()
        h.ok(f"{len(users)} user(s) on {dom}" + (": " + ", ".join(f"{u}@{dom}" for u in users) if users else ""))
        for u in users:
            print(f"{u}@{dom}")

    run.on_one(f"ejabberd: users of {dom}", _node(run), act)


def _node_status(h: HostSession, vip: str | None) -> None:
    up = h.probe(STATUS)
    holds = bool(vip) and h.probe(f"ip -o -4 addr show | grep -qw {q(vip)}").ok
    vip_text = f"holds the VIP {vip}" if holds else "no VIP"
    if not up.ok:
        h.run.report.result(h.name, "failed", f"{node_name(h.name)} not running; {vip_text}")
        return
    members = cluster_members(h.probe(f"{CTL} list_cluster").stdout)
    sessions = h.probe(f"{CTL} connected_users_number").stdout.strip() or "?"
    h.ok(f"{node_name(h.name)} running; cluster: {', '.join(members) or '?'}; {sessions} session(s); {vip_text}")


@runbook(readonly=True)
def cluster_status(run):
    """Show each ejabberd node: running, cluster members, sessions, who holds the VIP."""
    vip = run.inv.vips.get("xmpp")
    address = str(vip.address) if vip else None
    run.step("ejabberd: cluster status", run.hosts(ROLE), lambda h: _node_status(h, address))


@runbook(readonly=True, positional=["name"],
         help={"name": "an admin of the inventory's xmpp.admins: NAME or NAME@DOMAIN"})
def admin_password(run, name):
    """Say where an XMPP admin's generated password is (secrets file and key); never prints it."""
    dom = topology.xmpp_domain(run.inv)
    jid = (name or "").lower()
    jid = jid if "@" in jid else f"{jid}@{dom}"
    admins = [a.lower() for a in admin_jids(run.inv)]
    if not name or jid not in admins:
        raise UserError(f"{name!r} is not an admin of this site (xmpp.admins: {', '.join(admins) or 'none'}); "
                        "nothing was read or changed")
    local, _, host = jid.partition("@")
    if host != dom.lower():
        raise UserError(f"{jid} is an admin from another server: its password is not kept here")
    key, where = admin_secret(local), run.secrets.path
    if key not in run.secrets:
        raise UserError(f"{jid}: no password generated yet ({key} is not in {where}); "
                        "`inv ejabberd.deploy` generates it and registers the account")
    run.report.log(f"{jid}: password in {where}, key {key}")
    # Where it is, not what it is: the file is mode 0600 and the operator reads it
    # there; printed here it would stay in terminal scrollback and CI logs.
    print(f"{jid}: the password is in {where}, key {key}")
    print(f"  read it with: grep {q('^' + key + ':')} {q(str(where))}")


@runbook(default=True)
def deploy(run):
    """Converge ejabberd: packages, config, cookie, schema, start, cluster, admin accounts."""
    converge(run)


ns = Collection("ejabberd", deploy, register_user, unregister_user, change_password, list_users, cluster_status,
                admin_password)
