"""Database proxy tier: the mail back ends reach the Galera cluster through a
proxy on the dbproxy VIP, chosen by `mail.db_proxy` in the inventory.

- `haproxy` (Debian's; the lab's): TCP proxy on 3306 with one active writer,
  the other Galera nodes as backups in inventory order, health-checked with the
  Galera-aware check the pxc tier installs on every node (HTTP on 9200: 200
  only when Primary and Synced).
- `proxysql` (the seed's; ProxySQL's repository): port 6033, Galera hostgroups
  with one writer (max_writers=1), the monitor user, the mail tier's users (as
  password hashes). The config is libconfig; ProxySQL has no checker of its
  own, so the fast tests parse the rendered file with libconfig itself.

Runbook: repository (proxysql), package, config (haproxy: checked with
`haproxy -c` before it replaces the old file), service enabled and running,
reloaded when the config changed. It binds the dbproxy VIP (non-local bind,
set by the base tier) and the host's own address on the VIP's network, so it
serves before and after Pacemaker moves the VIP.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from invoke import Collection

from .core import UserError, runbook, topology
from .core.sql import mysql_e, mysql_native_hash

if TYPE_CHECKING:
    from .core import HostSession, Run
    from .core.inventory import Inventory

HAPROXY_CFG = "/etc/haproxy/haproxy.cfg"
PROXYSQL_CFG = "/etc/proxysql.cnf"
PROXYSQL_KEY = "/etc/apt/keyrings/proxysql.asc"
PROXYSQL_SERIES = "2.6.x"
PROXYSQL_REPO = f"https://repo.proxysql.com/ProxySQL/proxysql-{PROXYSQL_SERIES}/bookworm/"
PROXYSQL_ADMIN_PORT = 6032
PROXYSQL_ADMIN_SECRET = "proxysql_admin_password"
WRITER_HOSTGROUP = 10
# ProxySQL's admin interface: a changed /etc/proxysql.cnf is loaded into the
# running proxy table by table, then saved to its own database.
PROXYSQL_RELOAD = (
    "LOAD MYSQL SERVERS FROM CONFIG", "LOAD MYSQL SERVERS TO RUNTIME", "SAVE MYSQL SERVERS TO DISK",
    "LOAD MYSQL USERS FROM CONFIG", "LOAD MYSQL USERS TO RUNTIME", "SAVE MYSQL USERS TO DISK",
    "LOAD MYSQL VARIABLES FROM CONFIG", "LOAD MYSQL VARIABLES TO RUNTIME", "SAVE MYSQL VARIABLES TO DISK",
)
NOT_PROXIED = ("sst", "monitor")  # node-local and health-check accounts: never through the proxy


def template_vars(inv: Inventory, host: str, secret) -> dict:
    binds = topology.db_proxy_binds(inv, host)
    p = topology.db_proxy_port(inv)
    users = [(a.user, mysql_native_hash(secret(a.secret))) for a in topology.db_accounts(inv)
             if a.user not in NOT_PROXIED]
    flavour = inv.mail.galera_flavour if inv.mail else "percona"
    return {
        "bind_addresses": binds,
        "port": p,
        "interfaces": ";".join(f"{a}:{p}" for a in binds),
        "servers": [(n, topology.galera_address(inv, n)) for n in topology.galera_nodes(inv)],
        "check_port": topology.GALERA_CHECK_PORT,
        "cluster_name": f"{inv.site.name}-mail",
        "writer_hostgroup": WRITER_HOSTGROUP,
        "monitor_password": secret(topology.account_secret(inv, "monitor")),
        "admin_password": secret(PROXYSQL_ADMIN_SECRET),
        "users": users,
        "server_version": "8.0.36" if flavour == "percona" else "10.11.0-MariaDB",
        "proxysql_key": PROXYSQL_KEY,
        "proxysql_repo": PROXYSQL_REPO,
    }


def converge(run: Run) -> None:
    if run.inv.mail is None:
        run.report.note("dbproxy: the inventory has no mail cluster, skipped")
        return
    hosts = [h for h in topology.db_proxy_hosts(run.inv) if h in run.hosts()]
    if not topology.galera_nodes(run.inv):
        raise UserError(f"{run.inv.path}: the database proxy needs Galera nodes (role galera)")
    if topology.db_proxy_kind(run.inv) == "haproxy":
        run.step("dbproxy: haproxy (one writer, Galera-aware checks)", hosts, haproxy)
    else:
        run.step("dbproxy: proxysql (Galera hostgroups, one writer)", hosts, proxysql)


def haproxy(h: HostSession) -> None:
    h.packages(["haproxy"])
    changed = h.template("dbproxy/etc/haproxy/haproxy.cfg.j2", HAPROXY_CFG, h.tier_vars(template_vars),
                         validate="haproxy -c -q -f {}")
    if topology.pacemaker_owns(h, "haproxy"):  # the cluster tier runs it on one node; systemd must not start it
        if changed and h.probe("systemctl is-active -q haproxy").ok:
            h.sh("systemctl reload haproxy", message="reload haproxy (Pacemaker runs it here)")
        else:
            h.ok("haproxy: Pacemaker owns it (cluster tier)")
        return
    h.service("haproxy", reload=changed)


def proxysql_admin(statements) -> str:
    """The mysql client on ProxySQL's local admin interface running ``statements``
    (quoted as one word); the admin credentials come on stdin as a client file."""
    return mysql_e("; ".join(statements), defaults_file="/dev/stdin", host="127.0.0.1", port=PROXYSQL_ADMIN_PORT)


def proxysql(h: HostSession) -> None:
    h.packages(["ca-certificates", "curl", "gnupg", "mariadb-client"])
    h.ensure(f"test -s {PROXYSQL_KEY}",
             f"install -d -m 0755 /etc/apt/keyrings && curl -fsSL {PROXYSQL_REPO}../repo_pub_key -o {PROXYSQL_KEY}",
             f"ProxySQL's signing key {PROXYSQL_KEY}")
    v = h.tier_vars(template_vars)
    if h.template("dbproxy/etc/apt/sources.list.d/proxysql.list.j2", "/etc/apt/sources.list.d/proxysql.list", v):
        h.apt_update()
    h.packages(["proxysql"])
    changed = h.template("dbproxy/etc/proxysql.cnf.j2", PROXYSQL_CFG, v, group="proxysql", mode="0640")
    was_running = h.probe("systemctl is-active -q proxysql").ok
    if not topology.pacemaker_owns(h, "proxysql"):
        h.service("proxysql")
    if changed and was_running:
        admin = h.run.secret(PROXYSQL_ADMIN_SECRET)
        h.sh(proxysql_admin(PROXYSQL_RELOAD), stdin=f"[client]\nuser=admin\npassword={admin}\n",
             message="load the changed config into the running ProxySQL")


@runbook(default=True)
def deploy(run):
    """Converge the database proxy (haproxy or proxysql) on the dbproxy VIP's hosts."""
    converge(run)


ns = Collection("dbproxy", deploy)
