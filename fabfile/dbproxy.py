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

from invoke import Collection

from . import pxc
from .core import HostSession, Run, UserError, runbook
from .core.inventory import Inventory

PORTS = {"haproxy": 3306, "proxysql": 6033}
HAPROXY_CFG = "/etc/haproxy/haproxy.cfg"
PROXYSQL_CFG = "/etc/proxysql.cnf"
PROXYSQL_KEY = "/etc/apt/keyrings/proxysql.asc"
PROXYSQL_SERIES = "2.6.x"
PROXYSQL_REPO = f"https://repo.proxysql.com/ProxySQL/proxysql-{PROXYSQL_SERIES}/bookworm/"
WRITER_HOSTGROUP = 10
# ProxySQL's admin interface: a changed /etc/proxysql.cnf is loaded into the
# running proxy table by table, then saved to its own database.
PROXYSQL_RELOAD = (
    "LOAD MYSQL SERVERS FROM CONFIG", "LOAD MYSQL SERVERS TO RUNTIME", "SAVE MYSQL SERVERS TO DISK",
    "LOAD MYSQL USERS FROM CONFIG", "LOAD MYSQL USERS TO RUNTIME", "SAVE MYSQL USERS TO DISK",
    "LOAD MYSQL VARIABLES FROM CONFIG", "LOAD MYSQL VARIABLES TO RUNTIME", "SAVE MYSQL VARIABLES TO DISK",
)


def kind(inv: Inventory) -> str:
    return inv.mail.db_proxy if inv.mail else "proxysql"


def port(inv: Inventory) -> int:
    return PORTS[kind(inv)]


def proxy_hosts(inv: Inventory) -> list[str]:
    """Where the proxy runs: the hosts that carry the dbproxy VIP (mail_backend)."""
    vip = inv.vips.get("dbproxy")
    return inv.with_role(vip.role if vip else "mail_backend")


def bind_addresses(inv: Inventory, host: str) -> list[str]:
    vip = inv.vips.get("dbproxy")
    addrs = inv.hosts[host].addresses
    out = []
    if vip is not None and vip.network in addrs:
        out.append(str(addrs[vip.network]))
        out.append(str(vip.address))
    else:
        from .base import service_address

        out.append(service_address(inv, host))
    return out


def template_vars(inv: Inventory, host: str, secret) -> dict:
    binds = bind_addresses(inv, host)
    p = PORTS[kind(inv)]
    users = [(a.user, pxc.native_hash(secret(a.secret))) for a in pxc.accounts(inv)
             if a.user not in ("sst", "monitor")]
    return {
        "bind_addresses": binds,
        "port": p,
        "interfaces": ";".join(f"{a}:{p}" for a in binds),
        "servers": [(n, pxc.cluster_address(inv, n)) for n in pxc.nodes(inv)],
        "check_port": pxc.CHECK_PORT,
        "cluster_name": f"{inv.site.name}-mail",
        "writer_hostgroup": WRITER_HOSTGROUP,
        "monitor_password": secret("pxc_monitor_password"),
        "admin_password": secret("proxysql_admin_password"),
        "users": users,
        "server_version": "8.0.36" if pxc.flavour(inv).name == "percona" else "10.11.0-MariaDB",
        "proxysql_key": PROXYSQL_KEY,
        "proxysql_repo": PROXYSQL_REPO,
    }


def converge(run: Run) -> None:
    if run.inv.mail is None:
        run.report.note("dbproxy: the inventory has no mail cluster, skipped")
        return
    hosts = [h for h in proxy_hosts(run.inv) if h in run.hosts()]
    if not pxc.nodes(run.inv):
        raise UserError(f"{run.inv.path}: the database proxy needs Galera nodes (role galera)")
    if kind(run.inv) == "haproxy":
        run.step("dbproxy: haproxy (one writer, Galera-aware checks)", hosts, _haproxy)
    else:
        run.step("dbproxy: proxysql (Galera hostgroups, one writer)", hosts, _proxysql)


def _haproxy(h: HostSession) -> None:
    h.packages(["haproxy"])
    changed = h.template("dbproxy/etc/haproxy/haproxy.cfg.j2", HAPROXY_CFG, validate="haproxy -c -q -f {}")
    if _pacemaker_owns(h, "haproxy"):  # the cluster tier runs it on one node; systemd must not start it
        if changed and h.probe("systemctl is-active -q haproxy").ok:
            h.sh("systemctl reload haproxy", message="reload haproxy (Pacemaker runs it here)")
        else:
            h.ok("haproxy: Pacemaker owns it (cluster tier)")
        return
    h.service("haproxy", reload=changed)


def _pacemaker_owns(h: HostSession, resource: str) -> bool:
    from .cluster import owned

    return owned(h, resource)


def proxysql_admin(statements) -> str:
    sql = "; ".join(statements)
    return ("mysql --defaults-extra-file=/dev/stdin -h 127.0.0.1 -P 6032 -NB -e " + f'"{sql}"')


def _proxysql(h: HostSession) -> None:
    h.packages(["ca-certificates", "curl", "gnupg", "mariadb-client"])
    h.ensure(f"test -s {PROXYSQL_KEY}",
             f"install -d -m 0755 /etc/apt/keyrings && curl -fsSL {PROXYSQL_REPO}../repo_pub_key -o {PROXYSQL_KEY}",
             f"ProxySQL's signing key {PROXYSQL_KEY}")
    if h.template("dbproxy/etc/apt/sources.list.d/proxysql.list.j2", "/etc/apt/sources.list.d/proxysql.list"):
        h.apt_update()
    h.packages(["proxysql"])
    changed = h.template("dbproxy/etc/proxysql.cnf.j2", PROXYSQL_CFG, group="proxysql", mode="0640")
    was_running = h.probe("systemctl is-active -q proxysql").ok
    if not _pacemaker_owns(h, "proxysql"):
        h.service("proxysql")
    if changed and was_running:
        admin = h.run.secret("proxysql_admin_password")
        h.sh(proxysql_admin(PROXYSQL_RELOAD), stdin=f"[client]\nuser=admin\npassword={admin}\n",
             message="load the changed config into the running ProxySQL")


@runbook(default=True)
def deploy(run):
    """Converge the database proxy (haproxy or proxysql) on the dbproxy VIP's hosts."""
    converge(run)


ns = Collection("dbproxy", deploy)
