"""Gateway tier: the gateway routes between the XMPP DMZ and the internal network.

Runbook:
1. On the gateway: IPv4 forwarding is on (the base tier persists it in
   /etc/sysctl.d/60-hastack.conf; here the live value is checked), and its
   firewall is in place: the same rules.v4 the firewall tier writes, whose
   FORWARD chain passes only the flows of the firewall table that cross the
   gateway (ejabberd -> PostgreSQL, monitoring scrapes, Bacula, ICMP echo);
   anything else between the segments is dropped.
2. On every other host of a segment: a persistent route to each other segment
   through the gateway's address on its own segment (hastack-routes.service, a
   oneshot unit that runs `ip route replace`), applied at once as well.

Segments are derived from the inventory: every non-management network the
gateway has an address on. Nothing about "DMZ" or "internal" is hard-coded.
"""

from __future__ import annotations

from dataclasses import dataclass

from invoke import Collection

from . import firewall
from .core import HostSession, Run, runbook
from .core.inventory import Inventory

UNIT = "hastack-routes.service"
UNIT_TEMPLATE = "gateway/etc/systemd/system/hastack-routes.service.j2"


@dataclass(frozen=True)
class Route:
    network: str  # CIDR of the other segment
    via: str  # the gateway's address on this host's segment
    gateway: str  # its inventory name


def segments(inv: Inventory, gw: str) -> list[str]:
    """The networks a gateway routes between: its non-management networks."""
    return list(firewall.non_management(inv, gw))


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


def forward_rules(inv: Inventory, gw: str, table=None) -> list[firewall.Rule]:
    """The gateway's FORWARD chain: every flow of the firewall table (rows whose
    sources are roles) between hosts on different segments of this gateway,
    plus ICMP echo between the segments. Empty for any other host."""
    if gw not in gateways(inv):
        return []
    table = firewall.TABLE if table is None else table
    segs = segments(inv, gw)
    on = {name: [s for s in segs if s in h.addresses] for name, h in inv.hosts.items()}
    routers = set(inv.with_role("gateway"))
    rules: list[firewall.Rule] = []
    for target in inv.hosts:
        if target in routers or not on[target]:
            continue
        for allow in firewall.rows(inv, target, table, every_host=()):
            if not isinstance(allow.sources, tuple):
                continue  # anyone / management / local nets: not routed through here
            dst = str(inv.hosts[target].addresses[on[target][0]]) + "/32"
            vip = inv.vips.get(allow.to_vip) if allow.to_vip else None
            if vip is not None and vip.network in segs:
                dst = f"{vip.address}/32"
            for src in inv.with_role(*allow.sources):
                if src in (target, *routers) or not on[src] or set(on[src]) & set(on[target]):
                    continue
                addr = f"{inv.hosts[src].addresses[on[src][0]]}/32"
                rule = firewall.Rule("FORWARD", allow.proto, firewall.resolve_ports(inv, allow),
                                     addr, dst, f"{src} to {target}: {allow.why}")
                if rule not in rules:
                    rules.append(rule)
    for a in segs:
        for b in segs:
            if a != b:
                rules.append(firewall.Rule("FORWARD", "icmp", "echo-request", str(inv.networks[a].cidr),
                                           str(inv.networks[b].cidr), f"ping from {a} to {b}"))
    return rules


def template_vars(inv: Inventory, host: str, secret) -> dict:
    return {"routes": routes(inv, host)}


# --- the steps -------------------------------------------------------------------


def _gateway(h: HostSession) -> None:
    h.ensure("[ \"$(sysctl -n net.ipv4.ip_forward)\" = 1 ]", "sysctl -q -w net.ipv4.ip_forward=1",
             "IPv4 forwarding on (persisted by the base tier in /etc/sysctl.d/60-hastack.conf)")
    firewall.install(h)
    firewall.apply_rules(h)


def _routes(h: HostSession) -> None:
    changed = h.template(UNIT_TEMPLATE, f"/etc/systemd/system/{UNIT}")
    if changed:
        h.sh("systemctl daemon-reload", message=f"systemctl daemon-reload ({UNIT} changed)")
    h.service(UNIT, restart=changed)
    for r in routes(h.inv, h.name):
        now = h.probe(f"ip -4 route show {r.network}")
        if f"via {r.via} " in now.stdout + " ":
            h.ok(f"route {r.network} via {r.via} ({r.gateway})")
        else:
            h.sh(f"ip route replace {r.network} via {r.via}", message=f"route {r.network} via {r.via} ({r.gateway})")


def converge(run: Run) -> None:
    gws = [g for g in run.hosts("gateway") if g in gateways(run.inv)]
    firewall.preflight(run, gws)
    run.step("gateway: forwarding and its firewall", gws, _gateway)
    run.step("gateway: routes through the gateway", [h for h in run.hosts() if routes(run.inv, h)], _routes)


@runbook(default=True)
def deploy(run):
    """Converge the gateway (forwarding, FORWARD rules) and the routes to it."""
    converge(run)


@runbook
def routes_only(run):
    """Only converge the routes of the segment hosts through the gateway."""
    run.step("gateway: routes through the gateway", [h for h in run.hosts() if routes(run.inv, h)], _routes)


ns = Collection("gateway", deploy, routes_only)
