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

Read/write split (topology.db_proxy_reader_port, topology.DB_READ_ONLY_USERS):

- haproxy: the writer port (3306) sends everything to the one writer, the
  first node in inventory order that passes the Galera check. The reader port
  (3307) balances (leastconn: database sessions are long) over the nodes that
  are not that writer: one backend per possible writer, chosen by the same
  order (`srv_is_up` of the writer listener's servers), its servers tracking
  the writer listener's checks (no second set of checks). In steady state
  (writer node 1) reads go to nodes 2..N; when node 1 fails, the writer moves
  to node 2 and new reads go to nodes 3..N. The writer is the reader backend's
  backup: with no other node left (one node, or the others not Synced) reads
  fall back to the writer, and when a reader comes back the reads parked on
  the writer are cut so they reconnect to it. The reader port is for read-only
  accounts only: HAProxy does not look at statements, a write sent there would
  land on a non-writer (two writers, certification conflicts).
- proxysql: one port; query rules route `SELECT ... FOR UPDATE` (and share
  locks) to the writer hostgroup and the plain SELECTs of the read-only
  accounts to the reader hostgroup; everything else goes to the account's
  default hostgroup, the writer. writer_is_also_reader=1: the writer is a
  reader too. With 2 ProxySQL keeps the writer out of the readers but then
  leaves the reader hostgroup empty when the writer is the last node, and the
  lookups would fail; 1 keeps them answering, at the cost of the writer taking
  its weight's share of them.

Which client uses which: postfix's maps and dovecot's passdb/userdb are
read-only lookups (SELECT grants only, DB_READ_ONLY_USERS) that never read
their own writes: the reader path. Roundcube (reads and writes in one session;
its sessions table is written on every request) and Postfixadmin (an admin's
change must show on the next page) read what they just wrote: the writer
port, where every statement lands on the one writer. A read on another node
may run a few milliseconds behind the writer (Galera applies asynchronously
after certification), harmless for a lookup, wrong for read-your-writes.

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
BACKUP_WRITER_HOSTGROUP = 20
READER_HOSTGROUP = 30
OFFLINE_HOSTGROUP = 9999
# ProxySQL's admin interface: a changed /etc/proxysql.cnf is loaded into the
# running proxy table by table, then saved to its own database.
PROXYSQL_RELOAD = (
    "LOAD MYSQL SERVERS FROM CONFIG", "LOAD MYSQL SERVERS TO RUNTIME", "SAVE MYSQL SERVERS TO DISK",
    "LOAD MYSQL USERS FROM CONFIG", "LOAD MYSQL USERS TO RUNTIME", "SAVE MYSQL USERS TO DISK",
    "LOAD MYSQL VARIABLES FROM CONFIG", "LOAD MYSQL VARIABLES TO RUNTIME", "SAVE MYSQL VARIABLES TO DISK",
    "LOAD MYSQL QUERY RULES FROM CONFIG", "LOAD MYSQL QUERY RULES TO RUNTIME", "SAVE MYSQL QUERY RULES TO DISK",
)
NOT_PROXIED = ("sst", "monitor", "exporter")  # node-local and health-check accounts: never through the proxy


def query_rules(users) -> list[tuple[int, str | None, str, int, str]]:
    """ProxySQL's read/write split: (rule_id, username or None for any, match_digest,
    destination hostgroup, comment), in the order ProxySQL applies them (the
    first matching rule with apply=1 decides). Statements no rule matches go to
    the account's default hostgroup, the writer."""
    rules = [
        (100, None, "^SELECT .* FOR UPDATE", WRITER_HOSTGROUP, "locking reads: the writer"),
        (110, None, "^SELECT .* (FOR SHARE|LOCK IN SHARE MODE)", WRITER_HOSTGROUP, "locking reads: the writer"),
    ]
    readers = [u for u in users if u in topology.DB_READ_ONLY_USERS]
    rules += [(200 + i, u, "^SELECT", READER_HOSTGROUP, f"{u}: lookups on the readers")
              for i, u in enumerate(readers)]
    return rules


def template_vars(inv: Inventory, host: str, secret) -> dict:
    binds = topology.db_proxy_binds(inv, host)
    p = topology.db_proxy_port(inv)
    users = [(a.user, mysql_native_hash(secret(a.secret))) for a in topology.db_accounts(inv)
             if a.user not in NOT_PROXIED]
    flavour = inv.mail.galera_flavour if inv.mail else "percona"
    return {
        "bind_addresses": binds,
        "port": p,
        "reader_port": topology.db_proxy_reader_port(inv),
        "interfaces": ";".join(f"{a}:{p}" for a in binds),
        "servers": [(n, topology.galera_address(inv, n)) for n in topology.galera_nodes(inv)],
        "check_port": topology.GALERA_CHECK_PORT,
        "cluster_name": f"{inv.site.name}-mail",
        "writer_hostgroup": WRITER_HOSTGROUP,
        "backup_writer_hostgroup": BACKUP_WRITER_HOSTGROUP,
        "reader_hostgroup": READER_HOSTGROUP,
        "offline_hostgroup": OFFLINE_HOSTGROUP,
        "query_rules": query_rules([u for u, _ in users]),
        "monitor_password": secret(topology.account_secret(inv, "monitor")),
        "admin_password": secret(PROXYSQL_ADMIN_SECRET),
        "users": users,
        "server_version": "8.0.36" if flavour == "percona" else "10.11.0-MariaDB",
        "proxysql_key": PROXYSQL_KEY,
        "proxysql_repo": PROXYSQL_REPO,
        # HAProxy's own Prometheus endpoint, for the monitoring host only (its firewall rule).
        "metrics_bind": (f"{inv.vips['dbproxy'].address if 'dbproxy' in inv.vips else topology.scrape_address(inv, host)}"
                         f":{topology.HAPROXY_METRICS_PORT}"
                         if any(e.job == "haproxy" for e in topology.exporters(inv, host)) else ""),
    }


def converge(run: Run) -> None:
    if run.inv.mail is None:
        run.report.note("dbproxy: the inventory has no mail cluster, skipped")
        return
    hosts = [h for h in topology.db_proxy_hosts(run.inv) if h in run.hosts()]
    if not topology.galera_nodes(run.inv):
        raise UserError(f"{run.inv.path}: the database proxy needs Galera nodes (role galera)")
    if topology.db_proxy_kind(run.inv) == "haproxy":
        run.step("dbproxy: haproxy (one writer, a reader port, Galera-aware checks)", hosts, haproxy)
    else:
        run.step("dbproxy: proxysql (Galera hostgroups, one writer, read/write split)", hosts, proxysql)


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
