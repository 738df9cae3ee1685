"""Gateway tier: the gateway routes between the XMPP DMZ and the internal network.

Runs after the firewall tier (`deploy.common` orders them), which gives the
gateway its FORWARD chain: only the flows of the site's flow table that cross
the gateway (ejabberd -> PostgreSQL, monitoring scrapes, Bacula, ICMP echo)
pass; anything else between the segments is dropped.

Runbook:
1. On the gateway: IPv4 forwarding is on (the base tier persists it in
   /etc/sysctl.d/60-hastack.conf; here the live value is checked).
2. On every other host of a segment: a persistent route to each other segment
   through the gateway's address on its own segment (hastack-routes.service, a
   oneshot unit that runs `ip route replace`), applied at once as well.

Segments, routes and the FORWARD rules are derived from the inventory in
fabfile/core/flows.py (every non-management network the gateway has an address
on); nothing about "DMZ" or "internal" is hard-coded.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from invoke import Collection

from .core import q, runbook
from .core.flows import gateways, routes

if TYPE_CHECKING:
    from .core import HostSession, Run
    from .core.inventory import Inventory

UNIT = "hastack-routes.service"
UNIT_TEMPLATE = "gateway/etc/systemd/system/hastack-routes.service.j2"


def template_vars(inv: Inventory, host: str, secret) -> dict:
    return {"routes": routes(inv, host)}


# --- the steps -------------------------------------------------------------------


def _forwarding(h: HostSession) -> None:
    h.ensure("[ \"$(sysctl -n net.ipv4.ip_forward)\" = 1 ]", "sysctl -q -w net.ipv4.ip_forward=1",
             "IPv4 forwarding on (persisted by the base tier in /etc/sysctl.d/60-hastack.conf)")


def _routes(h: HostSession) -> None:
    changed = h.template(UNIT_TEMPLATE, f"/etc/systemd/system/{UNIT}", h.tier_vars(template_vars))
    if changed:
        h.sh("systemctl daemon-reload", message=f"systemctl daemon-reload ({UNIT} changed)")
    h.service(UNIT, restart=changed)
    for r in routes(h.inv, h.name):
        now = h.probe(f"ip -4 route show {q(r.network)}")
        if f"via {r.via} " in now.stdout + " ":
            h.ok(f"route {r.network} via {r.via} ({r.gateway})")
        else:
            h.sh(f"ip route replace {q(r.network)} via {q(r.via)}",
                 message=f"route {r.network} via {r.via} ({r.gateway})")


def converge(run: Run) -> None:
    gws = [g for g in run.hosts("gateway") if g in gateways(run.inv)]
    run.step("gateway: forwarding", gws, _forwarding)
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
