"""Facts of the site that more than one tier needs, derived once from the
inventory: who runs what, on which address and port, with which database
accounts, which files and units are shared. Tiers read them here instead of
importing each other; only `fabfile/deploy.py` knows every tier.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Callable

from .errors import UserError
from .shell import q

if TYPE_CHECKING:
    from .inventory import Inventory

# --- roles ----------------------------------------------------------------------------

WEBMAIL, MAIL_BACKEND, GALERA = "webmail", "mail_backend", "galera"
EJABBERD, PG_PRIMARY, PG_REPLICA = "ejabberd", "postgres_primary", "postgres_replica"
GATEWAY, BACKUP, MONITORING, SPARE = "gateway", "backup", "monitoring", "spare"

# --- the site CA and host certificates (pki tier) ---------------------------------------

PKI_DIR = "/etc/ssl/hastack"
CA_FILE = f"{PKI_DIR}/ca.crt"
KEY_GROUP = "ssl-cert"  # the host key is root:ssl-cert 0640: its members may read it


def cert_path(host: str) -> str:
    return f"{PKI_DIR}/{host}.crt"


def key_path(host: str) -> str:
    return f"{PKI_DIR}/{host}.key"


def require_certificate(h) -> None:
    """The host's certificate and key from our CA are there (`inv pki.deploy` makes
    them) before a tier configures a service on them; ``h`` is a HostSession. In
    check mode a missing one is reported as what pki.deploy would do."""
    from .errors import HostFailed

    crt, key = cert_path(h.name), key_path(h.name)
    if not h.probe(f"test -s {q(crt)} && test -s {q(key)}").ok:
        if h.run.check:
            h.changed(f"{crt} is missing: `inv pki.deploy` would issue it")
            return
        raise HostFailed(f"{crt} or its key is missing: run `inv pki.deploy --hosts {h.name}` first "
                         "(nothing was changed)")
    h.ok(f"certificate {crt}")


def key_reader(h, user: str, why: str) -> bool:
    """``user`` (a service's account) joins the group that may read the host key;
    ``why`` says which daemon reads it. Returns changed (the service must restart
    to get the group)."""
    return h.in_group(user, KEY_GROUP, why)


# --- PostgreSQL (XMPP service) --------------------------------------------------------------

PG_VERSION = "15"
XMPP_DB = "ejabberd"  # the database and its owner role, used by ejabberd
XMPP_DB_USER = "ejabberd"
XMPP_DB_SECRET = "postgres_ejabberd_password"
PG_PORT = 5432


def pg_primary(inv: Inventory) -> str:
    hosts = inv.with_role(PG_PRIMARY)
    if len(hosts) != 1:
        raise UserError(f"{inv.path}: role {PG_PRIMARY} needs exactly 1 host (found {len(hosts)})")
    return hosts[0]


def pg_replicas(inv: Inventory) -> list[str]:
    return inv.with_role(PG_REPLICA)


def pg_hosts(inv: Inventory) -> list[str]:
    return inv.with_role(PG_PRIMARY, PG_REPLICA)


# --- ejabberd ----------------------------------------------------------------------------


# The WAL archive and base backups of the PostgreSQL hosts (tier walarchive; the
# postgres tier's archive hook ships each segment through it).
PG_STANZA = "xmpp"  # pgBackRest's name for the XMPP service's cluster
WAL_MOUNT = "/var/lib/postgresql/walarchive"  # nfs mode: the backup host's export, automounted


def backup_host(inv: Inventory) -> str | None:
    hosts = inv.with_role(BACKUP)
    return hosts[0] if hosts else None


def backup_clients(inv: Inventory) -> list[str]:
    """The hosts Bacula backs up (the clients of backup.jobs), in inventory order, when
    there is a backup host."""
    if backup_host(inv) is None:
        return []
    named = {job.client for job in inv.backup_jobs.values()}
    return [h for h in inv.hosts if h in named]


def wal_archive(inv: Inventory) -> str | None:
    """How the PostgreSQL hosts archive WAL: backup.wal_archive (pgbackrest, nfs) when
    there are PostgreSQL hosts and a backup host; None otherwise (archive_mode off)."""
    if not pg_hosts(inv) or backup_host(inv) is None:
        return None
    return inv.backup.wal_archive


def ejabberd_nodes(inv: Inventory) -> list[str]:
    return inv.with_role(EJABBERD)


def xmpp_domain(inv: Inventory) -> str:
    if inv.xmpp is None:
        raise UserError(f"{inv.path}: the inventory has no 'xmpp' section")
    return inv.xmpp.domain


def muc_host(dom: str) -> str:
    """ejabberd's multi-user chat service."""
    return f"conference.{dom}"


def pubsub_host(dom: str) -> str:
    return f"pubsub.{dom}"


def xmpp_service_hosts(inv: Inventory) -> list[str]:
    """The hosts ejabberd serves besides the domain (MUC, pubsub): other servers
    reach them over s2s and check that the certificate names them (pki)."""
    if inv.xmpp is None:
        return []
    return [muc_host(inv.xmpp.domain), pubsub_host(inv.xmpp.domain)]


# --- the mail cluster: Galera, the DB proxy, Pacemaker, the mail store ------------------

MAIL_DB = "postfix"  # Postfixadmin's schema, read by postfix and dovecot
ROUNDCUBE_DB = "roundcube"
DATABASES = (MAIL_DB, ROUNDCUBE_DB)
MAIL_STORE = "/var/vmail"  # the DRBD mountpoint in production
VMAIL_USER = "vmail"
VMAIL_UID = 5000  # the same on every back end: they share the mail store
GALERA_CHECK_PORT = 9200  # the Galera-aware health check the DB proxy asks
DB_PROXY_PORTS = {"haproxy": 3306, "proxysql": 6033}
# The DB proxy's reader path (fabfile/dbproxy.py): HAProxy has a second port that
# balances over the Galera nodes that are not the writer; ProxySQL splits on its
# one port with query rules (plain SELECTs of DB_READ_ONLY_USERS to the readers).
DB_PROXY_READER_PORTS = {"haproxy": 3307, "proxysql": 6033}
# The accounts whose reads may land on a non-writer node: lookups only (SELECT
# grants), which never need to read their own writes. Roundcube and
# Postfixadmin write and read back, so they stay on the writer.
DB_READ_ONLY_USERS = ("postfix", "dovecot")
FENCE_LAB_PORT = 1229  # the lab's power listener (fabfile/lab/fence.py)
FENCE_LAB_SECRET = "fence_lab_secret"


def galera_nodes(inv: Inventory) -> list[str]:
    return inv.with_role(GALERA)


def galera_address(inv: Inventory, host: str) -> str:
    """The address a Galera node talks to its peers and clients on."""
    return inv.service_address(host)


def cluster_nodes(inv: Inventory) -> list[str]:
    """The Pacemaker/Corosync nodes: the mail back ends."""
    return inv.with_role(MAIL_BACKEND)


def ring_address(inv: Inventory, host: str) -> str:
    """Corosync's (and DRBD's) address of a node: on the mail VIP's network, else its service address."""
    vip = inv.vips.get("mail")
    addrs = inv.hosts[host].addresses
    if vip is not None and vip.network in addrs:
        return str(addrs[vip.network])
    return inv.service_address(host)


def db_proxy_kind(inv: Inventory) -> str:
    return inv.mail.db_proxy if inv.mail else "proxysql"


def db_proxy_port(inv: Inventory) -> int:
    return DB_PROXY_PORTS[db_proxy_kind(inv)]


def db_proxy_reader_port(inv: Inventory) -> int:
    """Where the read-only lookups (DB_READ_ONLY_USERS) reach the DB proxy: the
    reader port (HAProxy: non-writer nodes), ProxySQL's one port (query rules)."""
    return DB_PROXY_READER_PORTS[db_proxy_kind(inv)]


def db_proxy_hosts(inv: Inventory) -> list[str]:
    """Where the proxy runs: the hosts that carry the dbproxy VIP (mail_backend)."""
    vip = inv.vips.get("dbproxy")
    return inv.with_role(vip.role if vip else MAIL_BACKEND)


def db_proxy_binds(inv: Inventory, host: str) -> list[str]:
    """What the proxy on ``host`` listens on: its own address on the dbproxy VIP's
    network and the VIP (non-local bind), so it serves before and after
    Pacemaker moves the VIP; without a VIP its service address."""
    vip = inv.vips.get("dbproxy")
    addrs = inv.hosts[host].addresses
    if vip is not None and vip.network in addrs:
        return [str(addrs[vip.network]), str(vip.address)]
    return [inv.service_address(host)]


def db_proxy_addresses(inv: Inventory, host: str) -> list[str]:
    """Where a back end reaches the database proxy: the dbproxy VIP (where
    Pacemaker runs the proxy, maybe on another node) first, then the host's own
    address on that network (the proxy binds it too; before the cluster exists
    the proxy runs on every back end and the VIP is nowhere)."""
    binds = db_proxy_binds(inv, host)
    return list(dict.fromkeys(binds[1:] + binds[:1]))


def db_proxy_endpoint(inv: Inventory) -> str:
    """Where a client that is not a proxy host (Roundcube on the front ends) reaches
    the database proxy: the dbproxy VIP, else the first proxy host's service address."""
    vip = inv.vips.get("dbproxy")
    if vip is not None:
        return str(vip.address)
    hosts = db_proxy_hosts(inv)
    return inv.service_address(hosts[0]) if hosts else ""


def client_addresses(inv: Inventory, roles: tuple[str, ...]) -> list[str]:
    """The addresses hosts with ``roles`` connect to the Galera nodes from."""
    galera = galera_nodes(inv)
    out: list[str] = []
    for host in inv.with_role(*roles):
        for cidr in (inv.peer_addresses(host, galera[0]) if galera else []):
            addr = cidr.split("/")[0]
            if addr not in out:
                out.append(addr)
    return out


APP_PRIVS = ("SELECT", "INSERT", "UPDATE", "DELETE", "CREATE", "DROP", "ALTER", "INDEX")


@dataclass(frozen=True)
class Account:
    """A MySQL account of the mail cluster: who connects from where, with what."""

    user: str
    hosts: tuple[str, ...]
    secret: str  # name of the generated secret holding its password
    grants: dict[str, tuple[str, ...]] = field(default_factory=dict)  # schema ("*" = global) -> privileges
    why: str = ""


def db_accounts(inv: Inventory) -> list[Account]:
    """Every MySQL account of the mail cluster, with the hosts it may connect from.
    The mail tier's clients go through the DB proxy, so the database sees the
    proxy hosts (mail_backend): Roundcube on the webmail hosts too. A grant's key is a
    schema ("*" = global) or "schema.table"."""
    backends = tuple(client_addresses(inv, (MAIL_BACKEND,)))
    out = []
    if inv.mail is not None and inv.mail.galera_flavour == "mariadb":  # PXC 8.0 manages its own SST user
        out.append(Account("sst", ("localhost",), "pxc_sst_password",
                           {"*": ("RELOAD", "PROCESS", "LOCK TABLES", "BINLOG MONITOR")},
                           "mariabackup SST on the donor"))
    out += [
        Account("monitor", ("localhost", *backends), "pxc_monitor_password", {},
                "health checks (galera-check, ProxySQL monitor): no privileges"),
        Account("postfixadmin", backends, "mail_db_postfixadmin", {MAIL_DB: APP_PRIVS},
                "Postfixadmin owns the postfix schema"),
        Account("postfix", backends, "mail_db_postfix", {MAIL_DB: ("SELECT",)}, "postfix lookups"),
        Account("dovecot", backends, "mail_db_dovecot", {MAIL_DB: ("SELECT",)}, "dovecot passdb/userdb"),
        Account("roundcube", backends, "mail_db_roundcube", {ROUNDCUBE_DB: APP_PRIVS},
                "Roundcube's own schema (it connects through the DB proxy, so Galera sees the proxy hosts)"),
        Account("roundcube_password", backends, "mail_db_roundcube_password",
                {f"{MAIL_DB}.mailbox": ("SELECT", "UPDATE")},
                "Roundcube's password plugin: a mailbox's own password, in Postfixadmin's table only"),
    ]
    if monitoring_host(inv) is not None:
        out.append(Account("exporter", ("localhost",), "pxc_exporter_password", {"*": ("PROCESS",)},
                           "Prometheus's mysqld exporter on each node (its socket): status and wsrep variables"))
    return out


def account_secret(inv: Inventory, user: str) -> str:
    """The name of the secret holding a mail-cluster MySQL account's password."""
    for a in db_accounts(inv):
        if a.user == user:
            return a.secret
    raise KeyError(user)


def pacemaker_owns(h, resource: str) -> bool:
    """Whether Pacemaker owns ``resource`` on this host's cluster: the tiers that
    configure its unit must then leave the unit alone (no enable, no start;
    reload only where it runs). ``h`` is a HostSession; answered once per run."""
    def ask() -> bool:
        return h.probe(f"command -v crm_resource >/dev/null && crm_resource --resource {q(resource)} "
                       "--query-xml >/dev/null 2>&1").ok
    return h.memo(("pacemaker_owns", resource), ask)


def slot_name(host: str) -> str:
    """A replica's physical replication slot: [a-z0-9_] only."""
    return "replica_" + re.sub(r"[^a-z0-9_]", "_", host.lower())


# --- the replicated mail store (drbd tier; the cluster tier's DrbdData / DrbdFS) --------

DRBD_RESOURCE = "mail"
DRBD_DEVICE = "/dev/drbd0"
# Postfix's queue lives on the mail store too (bind-mounted over its spool where the
# mail group runs): a message postfix acknowledged moves with the group, and is not
# left in the queue of a node that was fenced before it delivered it.
POSTFIX_SPOOL = "/var/spool/postfix"
POSTFIX_SPOOL_ON_STORE = f"{MAIL_STORE}/postfix-spool"
# The owners of the queue's files: the same ids on every back end, or a moved queue is unreadable.
POSTFIX_IDS = ("postfix", "postdrop")


# --- monitoring: who exports what, where Prometheus scrapes it --------------------------


@dataclass(frozen=True)
class Exporter:
    """A Prometheus exporter on the hosts with ``roles`` (None: every host). The
    monitoring tier installs it (``package``, or nothing when a service of another
    tier answers itself, like HAProxy's own endpoint); the firewall opens ``port``
    to the monitoring host only."""

    job: str
    port: int
    roles: tuple[str, ...] | None
    package: str | None
    unit: str | None = None
    when: Callable[[Inventory], bool] | None = None
    # Served on this VIP (by whichever host holds it), scraped there once, not per host.
    vip: str | None = None


def _haproxy_proxy(inv: Inventory) -> bool:
    return inv.mail is not None and inv.mail.db_proxy == "haproxy"


EXPORTERS = (
    Exporter("node", 9100, None, "prometheus-node-exporter"),
    Exporter("postgres", 9187, (PG_PRIMARY, PG_REPLICA), "prometheus-postgres-exporter"),
    Exporter("mysqld", 9104, (GALERA,), "prometheus-mysqld-exporter"),
    Exporter("hacluster", 9664, (MAIL_BACKEND,), "prometheus-hacluster-exporter", unit="ha_cluster_exporter"),
    Exporter("postfix", 9154, (MAIL_BACKEND,), "prometheus-postfix-exporter"),
    # HAProxy's own endpoint: HAProxy runs where Pacemaker put the dbproxy VIP
    Exporter("haproxy", 8405, (MAIL_BACKEND,), None, when=_haproxy_proxy, vip="dbproxy"),
    Exporter("nginx", 9113, (WEBMAIL,), "prometheus-nginx-exporter"),
)
HAPROXY_METRICS_PORT = 8405


def monitoring_host(inv: Inventory) -> str | None:
    hosts = inv.with_role(MONITORING) if inv.monitoring is not None else []
    return hosts[0] if hosts else None


def exporters(inv: Inventory, host: str) -> list[Exporter]:
    """The exporters ``host`` runs (none without a monitoring host)."""
    if monitoring_host(inv) is None:
        return []
    roles = set(inv.hosts[host].roles)
    return [e for e in EXPORTERS
            if (e.roles is None or roles & set(e.roles)) and (e.when is None or e.when(inv))]


def reach_address(inv: Inventory, src: str | None, host: str) -> str:
    """The address ``src`` reaches ``host`` at: ``host``'s address on a network
    they share, else its service address (across the gateway)."""
    theirs = inv.non_management(src) if src else {}
    for net, addr in inv.non_management(host).items():
        if net in theirs:
            return str(addr)
    return inv.service_address(host)


def scrape_address(inv: Inventory, host: str) -> str:
    """Where the monitoring host reaches ``host``'s exporters (and where they listen)."""
    return reach_address(inv, monitoring_host(inv), host)
