"""keepalived tier (XMPP service): the xmpp VIP on the DMZ follows a running
ejabberd.

Runbook (the ejabberd hosts):
1. The keepalived package.
2. The health check /usr/local/lib/hastack/check-ejabberd: the ejabberd unit is
   active and its c2s port answers on the host's own address.
3. /etc/keepalived/keepalived.conf, checked with `keepalived -t -f` before it
   replaces the old file: one VRRP instance, unicast between the ejabberd
   nodes' DMZ addresses (no multicast needed; the firewall accepts VRRP only
   from the peers), a generated VRRP password (8 characters, VRRP's limit),
   the VIP on the interface that holds the host's DMZ address, the check as a
   track script (failing -> FAULT -> the VIP moves). All nodes start as BACKUP
   with descending priorities and `nopreempt`: a node that comes back does not
   take the VIP away from a healthy one.
4. keepalived enabled and running; reloaded when its config changed.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from invoke import Collection

from .core import HostFailed, q, runbook, topology
from .core.secrets import token

if TYPE_CHECKING:
    from .core import HostSession, Run
    from .core.inventory import Inventory

ROLE = topology.EJABBERD
VIP_NAME = "xmpp"
PACKAGES = ["keepalived", "netcat-openbsd"]
CONFIG = "/etc/keepalived/keepalived.conf"
CHECK = "/usr/local/lib/hastack/check-ejabberd"
SECRET_AUTH = "keepalived_xmpp_auth"
BASE_PRIORITY = 150


def vrrp_password() -> str:
    return token(8)


def router_id(inv: Inventory) -> int:
    """A VRRP router id (1-255) from the VIP's last octet: stable and distinct per VIP of a network."""
    vip = inv.vips.get(VIP_NAME)
    return (int(str(vip.address).rsplit(".", 1)[1]) % 254) + 1 if vip else 51


def peers(inv: Inventory, host: str) -> list[str]:
    vip = inv.vips.get(VIP_NAME)
    if vip is None:
        return []
    return [str(inv.hosts[n].addresses[vip.network]) for n in inv.with_role(vip.role)
            if n != host and vip.network in inv.hosts[n].addresses]


def priority(inv: Inventory, host: str) -> int:
    holders = inv.with_role(ROLE)
    return BASE_PRIORITY - 10 * holders.index(host) if host in holders else 100


def template_vars(inv: Inventory, host: str, secret) -> dict:
    vip = inv.vips.get(VIP_NAME)
    net = vip.network if vip else inv.management_network
    me = inv.hosts[host].addresses
    prefix = inv.networks[net].cidr.prefixlen if net in inv.networks else 32
    return {
        "vrrp_interface": net,  # the lab names NICs after networks; converge passes the real one
        "vrrp_src": str(me.get(net, inv.management_address(host))),
        "vrrp_peers": peers(inv, host),
        "vrrp_vip": f"{vip.address}/{prefix}" if vip else "",
        "vrrp_router_id": router_id(inv),
        "vrrp_priority": priority(inv, host),
        "vrrp_password": secret(SECRET_AUTH)[:8],
        "vrrp_check": CHECK,
        "check_address": str(me.get(net, inv.management_address(host))),
    }


def converge(run: Run) -> None:
    hosts = run.hosts(ROLE)
    if VIP_NAME not in run.inv.vips:
        run.report.note(f"keepalived: the inventory has no vips.{VIP_NAME}; nothing to do")
        return
    run.secrets.get(SECRET_AUTH, vrrp_password)
    run.step("keepalived: the xmpp VIP follows ejabberd", hosts, _keepalived)


def _interface(h: HostSession, address: str) -> str:
    out = h.probe(f"ip -o -4 addr show to {q(address + '/32')}").stdout.split()
    if len(out) < 2:
        if h.run.check:
            return "?"
        raise HostFailed(f"no interface holds {address} on {h.name}")
    return out[1].split("@")[0]


def _keepalived(h: HostSession) -> None:
    tvars = h.tier_vars(template_vars)
    h.packages(PACKAGES)
    h.directory("/usr/local/lib/hastack", mode="0755")
    check_changed = h.template("keepalived/usr/local/lib/hastack/check-ejabberd.j2", CHECK, tvars, mode="0755",
                               validate="sh -n {}")
    conf_changed = h.template("keepalived/etc/keepalived/keepalived.conf.j2", CONFIG,
                              {**tvars, "detected_interface": _interface(h, tvars["vrrp_src"])},
                              mode="0640", validate="keepalived -t -f {}")
    # (The unit has ConditionFileNotEmpty on its config: installed before the config
    # existed, systemd skipped it; service() tries such a unit again.)
    h.service("keepalived", reload=conf_changed or check_changed)


@runbook(default=True)
def deploy(run):
    """Converge keepalived on the ejabberd nodes: the xmpp VIP follows a running ejabberd."""
    converge(run)


@runbook
def status(run):
    """Show which ejabberd node holds the xmpp VIP and each node's VRRP state."""
    vip = run.inv.vips.get(VIP_NAME)

    def one(h: HostSession) -> None:
        active = h.probe("systemctl is-active keepalived").stdout.strip()
        holds = vip is not None and h.probe(f"ip -o -4 addr show | grep -qw {q(vip.address)}").ok
        check = h.probe(CHECK).ok
        h.ok(f"keepalived {active}; health check {'passes' if check else 'FAILS'}; "
             + (f"holds the VIP {vip.address}" if holds else "does not hold the VIP"))

    run.step("keepalived: status", run.hosts(ROLE), one)


ns = Collection("keepalived", deploy, status)
