"""Who talks to whom on which port: the site's network flows, from the roles
of the inventory. The firewall tier turns them into every host's INPUT chain,
the gateway tier into the gateway's FORWARD chain and the routes through it.

The table ``TABLE`` (role -> port/proto/from) reads like the seeds' port lists;
the firewall template only formats what is compiled here.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable, Iterable, Union

from . import topology

if TYPE_CHECKING:
    from .inventory import Inventory

# --- the rule table --------------------------------------------------------------
#
# Sources: a tuple of roles (those hosts' addresses on the network they share
# with the target host, or, across the gateway, their own segment address), or
# one of these:
ANYONE = "anyone"  # no source restriction (public service ports)
MGMT = "management network"  # the inventory's management CIDR
LOCAL_NETS = "local networks"  # every non-management network the target host is on
WEBMAIL_CLIENTS = "webmail clients"  # webmail.client_networks of the inventory, else LOCAL_NETS
BACKUP_CLIENTS = "backup clients"  # the hosts backup.jobs names (Bacula's file daemons)

Ports = Union[str, Callable[["Inventory"], str]]


@dataclass(frozen=True)
class Allow:
    """One row: a host with the role accepts ``proto``/``ports`` from ``sources``."""

    proto: str  # tcp, udp, icmp, vrrp
    ports: Ports = ""  # "22", "4200:4210", "5222,5223"; "" = any port / no ports
    sources: tuple[str, ...] | str = ANYONE
    why: str = ""  # becomes the rule's iptables comment
    to_vip: str | None = None  # only to this VIP (inventory name), if the inventory has it
    when: Callable[[Inventory], bool] | None = None  # only for inventories where this holds
    on: Callable[[Inventory, str], bool] | None = None  # only on the hosts where this holds


def _ssh_port(inv: Inventory) -> str:
    return str(inv.ssh.port)


def _db_proxy_port(inv: Inventory) -> str:
    """The DB proxy's writer port and its reader port where that is another one ("3306,3307")."""
    return ",".join(dict.fromkeys(str(p) for p in (topology.db_proxy_port(inv), topology.db_proxy_reader_port(inv))))


def _haproxy(inv: Inventory) -> bool:
    return inv.mail is not None and inv.mail.db_proxy == "haproxy"


def _drbd(inv: Inventory) -> bool:
    return inv.mail is not None and inv.mail.storage == "drbd"


def _pgbackrest(inv: Inventory) -> bool:
    return topology.wal_archive(inv) == "pgbackrest"


def _nfs(inv: Inventory) -> bool:
    return topology.wal_archive(inv) == "nfs"


def _monitored(inv: Inventory) -> bool:
    return topology.monitoring_host(inv) is not None


def _grafana(inv: Inventory) -> bool:
    return _monitored(inv) and inv.monitoring.grafana


def _bacula_client(inv: Inventory, host: str) -> bool:
    return host in topology.backup_clients(inv)


POSTGRES = ("postgres_primary", "postgres_replica")

EVERY_HOST: list[Allow] = [
    Allow("icmp", "echo-request", ANYONE, "ping"),
    Allow("tcp", _ssh_port, MGMT, "SSH from the management network"),
    Allow("tcp", "9102", ("backup",), "bacula-fd from the director", on=_bacula_client),
]

POSTGRES_ROWS = [
    Allow("tcp", "5432", ("ejabberd", "postgres_primary", "postgres_replica"),
          "PostgreSQL from ejabberd and the other PostgreSQL hosts"),
    Allow("tcp", "8432", ("backup",), "pgBackRest (TLS) from the backup host: base backups", when=_pgbackrest),
]
TABLE: dict[str, list[Allow]] = {
    # --- XMPP service (seed 004) ----------------------------------------------
    "ejabberd": [
        Allow("tcp", "5222,5223,5269,5280,5443,1883", ANYONE,
              "ejabberd c2s, c2s TLS, s2s, HTTP, HTTPS, MQTT"),
        Allow("tcp", "4369", ("ejabberd",), "Erlang epmd, cluster nodes only"),
        Allow("tcp", "4200:4210", ("ejabberd",), "Erlang distribution FIREWALL_WINDOW, cluster nodes only"),
        Allow("vrrp", "", ("ejabberd",), "keepalived VRRP between the xmpp VIP peers"),
        Allow("tcp", "5223", ("monitoring",), "XMPP (TLS) probe of the monitoring host (across the gateway)",
              to_vip="xmpp", when=_monitored),
    ],
    # The same rows for both roles: either host may be the primary after a
    # promotion (postgres.promote), and its firewall then needs no change.
    "postgres_primary": POSTGRES_ROWS,
    "postgres_replica": POSTGRES_ROWS,
    "gateway": [
    ],
    "backup": [
        # bconsole talks to the director on the host itself: 9101 stays closed.
        Allow("tcp", "9103", BACKUP_CLIENTS, "bacula-sd from the file daemons of the backup jobs"),
        Allow("tcp", "2049", POSTGRES, "NFSv4 WAL archive and base backups", when=_nfs),
        Allow("tcp", "8432", POSTGRES + ("spare",), "pgBackRest (TLS): WAL archive, base backups, restores",
              when=_pgbackrest),
    ],
    "monitoring": [
        Allow("tcp", "443", MGMT, "Prometheus and Alertmanager (nginx, HTTPS) for the operators", when=_monitored),
        Allow("tcp", "3000", MGMT, "Grafana for the operators", when=_grafana),
    ],
    "spare": [],
    # --- mail cluster (seed 000) ----------------------------------------------
    "webmail": [
        Allow("tcp", "80,443", WEBMAIL_CLIENTS, "Roundcube on the webmail VIP (HTTP redirects to HTTPS)",
              to_vip="webmail"),
        Allow("vrrp", "", ("webmail",), "keepalived VRRP between the webmail VIP peers"),
    ],
    "mail_backend": [
        Allow("tcp", "25,587,143,993", LOCAL_NETS, "SMTP, submission, IMAP, IMAPS"),
        Allow("tcp", "80,443", LOCAL_NETS, "Postfixadmin"),
        Allow("tcp", "4190", ("webmail",), "ManageSieve from the webmail front ends", to_vip="mail"),
        Allow("tcp", _db_proxy_port, ("webmail", "mail_backend"), "database proxy on the dbproxy VIP",
              to_vip="dbproxy"),
        Allow("udp", "5404:5406", ("mail_backend",), "corosync"),
        Allow("tcp", "2224", ("mail_backend",), "pcsd"),
        Allow("tcp", "7788:7799", ("mail_backend",), "DRBD replication", when=_drbd),
    ],
    "galera": [
        Allow("tcp", "3306,4444,4567,4568", ("galera",), "Galera: MySQL, SST, replication, IST"),
        Allow("tcp", "3306", ("mail_backend",), "MySQL from the DB proxy"),
        Allow("tcp", "9200", ("mail_backend",), "Galera health check for HAProxy", when=_haproxy),
    ],
}

# Every exporter's port, from the monitoring host only (topology.EXPORTERS).
for _e in topology.EXPORTERS:
    _row = Allow("tcp", str(_e.port), ("monitoring",), f"{_e.job} exporter for Prometheus", to_vip=_e.vip,
                 when=lambda inv, e=_e: _monitored(inv) and (e.when is None or e.when(inv)))
    for _role in _e.roles or ():
        TABLE[_role].append(_row)
    if _e.roles is None:
        EVERY_HOST.append(_row)

# --- compiling the table into rules ----------------------------------------------


@dataclass(frozen=True)
class Rule:
    """One iptables rule; the template formats it in iptables-save's own order,
    so the live table can be compared with the file."""

    chain: str
    proto: str
    ports: str = ""
    src: str | None = None
    dst: str | None = None
    comment: str = ""
    target: str = "ACCEPT"

    @property
    def multiport(self) -> bool:
        return "," in self.ports

    @property
    def icmp_type(self) -> str:
        return {"echo-request": "8", "": ""}.get(self.ports, self.ports)


def _cidr(address) -> str:
    return f"{address}/32"


def allowed_sources(inv: Inventory, target: str, allow: Allow) -> list[str | None]:
    """Source CIDRs of a row for one target host (None = anyone)."""
    if allow.sources == ANYONE:
        return [None]
    if allow.sources == MGMT:
        return [str(inv.networks[inv.management_network].cidr)]
    if allow.sources == WEBMAIL_CLIENTS and inv.webmail is not None and inv.webmail.client_networks:
        return [str(inv.networks[net].cidr) for net in inv.webmail.client_networks]
    if allow.sources in (LOCAL_NETS, WEBMAIL_CLIENTS):
        nets = inv.non_management(target) or {inv.management_network: None}
        return [str(inv.networks[net].cidr) for net in nets]
    out: list[str | None] = []
    for src in source_hosts(inv, allow) or []:
        if src != target:
            out += [a for a in inv.peer_addresses(src, target) if a not in out]
    return out


def resolve_ports(inv: Inventory, allow: Allow) -> str:
    return allow.ports(inv) if callable(allow.ports) else allow.ports


def rows(inv: Inventory, host: str, table: dict[str, list[Allow]] | None = None,
         every_host: Iterable[Allow] | None = None) -> list[Allow]:
    """The rows that apply to ``host``: every host's, then each of its roles'."""
    table = TABLE if table is None else table
    out = list(EVERY_HOST if every_host is None else every_host)
    for role in inv.hosts[host].roles:
        out += table.get(role, [])
    return [a for a in out if (a.when is None or a.when(inv)) and (a.on is None or a.on(inv, host))]


def source_hosts(inv: Inventory, allow: Allow) -> list[str] | None:
    """The hosts a row's sources name (roles, or the backup clients); None for a
    source that is a network or anyone."""
    if isinstance(allow.sources, tuple):
        return inv.with_role(*allow.sources)
    if allow.sources == BACKUP_CLIENTS:
        return topology.backup_clients(inv)
    return None


def input_rules(inv: Inventory, host: str, table: dict[str, list[Allow]] | None = None,
                every_host: Iterable[Allow] | None = None) -> list[Rule]:
    rules: list[Rule] = []
    for allow in rows(inv, host, table, every_host):
        dst = None
        if allow.to_vip and allow.to_vip in inv.vips:
            dst = _cidr(inv.vips[allow.to_vip].address)
        for src in allowed_sources(inv, host, allow):
            rule = Rule("INPUT", allow.proto, resolve_ports(inv, allow), src, dst, allow.why)
            if rule not in rules:
                rules.append(rule)
    return rules


def ruleset(inv: Inventory, host: str, table: dict[str, list[Allow]] | None = None,
            every_host: Iterable[Allow] | None = None) -> dict[str, list[Rule]]:
    return {
        "input": input_rules(inv, host, table, every_host),
        "forward": forward_rules(inv, host, table),
    }


# --- across the gateway ---------------------------------------------------------------


@dataclass(frozen=True)
class Route:
    network: str  # CIDR of the other segment
    via: str  # the gateway's address on this host's segment
    gateway: str  # its inventory name


def segments(inv: Inventory, gw: str) -> list[str]:
    """The networks a gateway routes between: its non-management networks."""
    return list(inv.non_management(gw))


def gateways(inv: Inventory) -> list[str]:
    """Hosts with role gateway that route between at least two segments."""
    return [g for g in inv.with_role("gateway") if len(segments(inv, g)) >= 2]


def routes(inv: Inventory, host: str) -> list[Route]:
    """The routes ``host`` needs: to every segment of a gateway it is not on,
    via that gateway's address on a segment it is on."""
    out: list[Route] = []
    mine = inv.hosts[host].addresses
    for gw in gateways(inv):
        if gw == host:
            continue
        segs = segments(inv, gw)
        on = [s for s in segs if s in mine]
        if not on:
            continue
        via = str(inv.hosts[gw].addresses[on[0]])
        for other in segs:
            cidr = str(inv.networks[other].cidr)
            if other not in mine and cidr not in [r.network for r in out]:
                out.append(Route(cidr, via, gw))
    return out


def forward_rules(inv: Inventory, gw: str, table=None) -> list[Rule]:
    """The gateway's FORWARD chain: every flow of the firewall table (rows whose
    sources are roles) between hosts on different segments of this gateway,
    plus ICMP echo between the segments. Empty for any other host."""
    if gw not in gateways(inv):
        return []
    table = TABLE if table is None else table
    segs = segments(inv, gw)
    on = {name: [s for s in segs if s in h.addresses] for name, h in inv.hosts.items()}
    routers = set(inv.with_role("gateway"))
    rules: list[Rule] = []
    for target in inv.hosts:
        if target in routers or not on[target]:
            continue
        for allow in rows(inv, target, table):
            sources = source_hosts(inv, allow)
            if sources is None:
                continue  # anyone / management / local nets: not routed through here
            dst = str(inv.hosts[target].addresses[on[target][0]]) + "/32"
            vip = inv.vips.get(allow.to_vip) if allow.to_vip else None
            if vip is not None and vip.network in segs:
                dst = f"{vip.address}/32"
            for src in sources:
                if src in (target, *routers) or not on[src] or set(on[src]) & set(on[target]):
                    continue
                addr = f"{inv.hosts[src].addresses[on[src][0]]}/32"
                rule = Rule("FORWARD", allow.proto, resolve_ports(inv, allow),
                                     addr, dst, f"{src} to {target}: {allow.why}")
                if rule not in rules:
                    rules.append(rule)
    for a in segs:
        for b in segs:
            if a != b:
                rules.append(Rule("FORWARD", "icmp", "echo-request", str(inv.networks[a].cidr),
                                           str(inv.networks[b].cidr), f"ping from {a} to {b}"))
    return rules
