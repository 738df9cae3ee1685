"""keepalived tier: the VIPs that follow a running service, one keepalived per
host for all of them.

The VIPs it serves (``VIPS``; each only when the inventory defines it):

| VIP     | role     | follows           | track script                          | VRRP password secret    |
|---------|----------|-------------------|---------------------------------------|-------------------------|
| xmpp    | ejabberd | ejabberd          | /usr/local/lib/hastack/check-ejabberd | keepalived_xmpp_auth    |
| webmail | webmail  | nginx and php-fpm | /usr/local/lib/hastack/check-webmail  | keepalived_webmail_auth |

Runbook (the hosts holding the role of any VIP converged):
0. Refused before any host is touched: a VIP of the table whose inventory role
   is not the table's, or two VIPs of one network that would share a VRRP
   router id (the id is the VIP's last octet % 254 + 1).
1. The keepalived package (and nc for the checks).
2. A health check per VIP the host serves, quick (`nc -z -w 2`):
   - check-ejabberd: the ejabberd unit is active and its c2s port (5222)
     answers on the host's own address on the VIP's network;
   - check-webmail: the nginx and php8.2-fpm units are active and HTTPS (443)
     answers on the host's own address on the VIP's network (no TLS handshake).
3. /etc/keepalived/keepalived.conf, checked with `keepalived -t -f` before it
   replaces the old file: one vrrp_script + vrrp_instance per VIP whose role the
   host has (a host with both roles gets both, with distinct router ids). Each
   instance: unicast to the other holders of that VIP's role on that VIP's
   network (no multicast needed; the firewall accepts VRRP only from the peers),
   a generated VRRP password (8 characters, VRRP's limit), the VIP on the
   interface that holds the host's address on that network, the check as a
   track script (failing -> FAULT -> the VIP moves). All nodes start as BACKUP
   with descending priorities (inventory order) and `nopreempt`: a node that
   comes back does not take the VIP away from a healthy one.
4. keepalived enabled and running; reloaded when its config or a check changed.

Every host renders its whole config (all of its VIPs), so converging one VIP
never drops another: `converge(run, vips=("xmpp",))` in the XMPP chain,
`converge(run, vips=("webmail",))` in the mail chain after the webmail tier;
`inv keepalived.deploy` converges all, `--vip NAME` one.
`inv keepalived.status` prints one line per host and VIP: keepalived active,
that VIP's check, whether the host holds the VIP.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Iterable

from invoke import Collection

from .core import HostFailed, UserError, q, runbook, topology
from .core.secrets import token

if TYPE_CHECKING:
    from .core import HostSession, Run
    from .core.inventory import Inventory

PACKAGES = ["keepalived", "netcat-openbsd"]
CONFIG = "/etc/keepalived/keepalived.conf"
LIB = "/usr/local/lib/hastack"
BASE_PRIORITY = 150


@dataclass(frozen=True)
class KeepalivedVip:
    """A VIP keepalived serves: the inventory's vips.<name>, carried by ``role``,
    following the service ``check`` tests."""

    name: str
    role: str
    follows: str  # what the VIP follows, for the config's comment and the step title
    check: str  # the track script on the host
    secret: str  # the secret holding the VRRP password

    @property
    def template(self) -> str:
        """The check's template, named after the path it lands on."""
        return f"keepalived{self.check}.j2"

    @property
    def script(self) -> str:
        """The vrrp_script's name: chk_ejabberd, chk_webmail."""
        return "chk_" + self.check.rsplit("/", 1)[1].removeprefix("check-")


VIPS: dict[str, KeepalivedVip] = {v.name: v for v in (
    # keepalived_xmpp_auth: the name the xmpp VIP's password always had (existing secrets keep working).
    KeepalivedVip("xmpp", topology.EJABBERD, "ejabberd", f"{LIB}/check-ejabberd", "keepalived_xmpp_auth"),
    KeepalivedVip("webmail", topology.WEBMAIL, "nginx and php-fpm", f"{LIB}/check-webmail", "keepalived_webmail_auth"),
)}


def vrrp_password() -> str:
    return token(8)


# --- which VIPs, router ids ---------------------------------------------------------------


def served(inv: Inventory) -> list[KeepalivedVip]:
    """The VIPs of the table that the inventory defines, in table order."""
    return [v for v in VIPS.values() if v.name in inv.vips]


def router_id(inv: Inventory, name: str) -> int:
    """A VRRP router id (1-255) from the VIP's last octet: stable; distinct per VIP
    of a network (``problems`` refuses two that would share one)."""
    return (int(str(inv.vips[name].address).rsplit(".", 1)[1]) % 254) + 1


def problems(inv: Inventory) -> list[str]:
    """What keeps keepalived from serving the inventory's VIPs, one message each."""
    out: list[str] = []
    taken: dict[tuple[str, int], str] = {}
    for v in served(inv):
        vip = inv.vips[v.name]
        if vip.role != v.role:
            out.append(f"{inv.path}: vips.{v.name}.role is {vip.role}, but keepalived's {v.name} VIP follows "
                       f"{v.follows} on the hosts of role {v.role}")
        rid = router_id(inv, v.name)
        other = taken.setdefault((vip.network, rid), v.name)
        if other != v.name:
            out.append(f"{inv.path}: vips.{other} ({inv.vips[other].address}) and vips.{v.name} ({vip.address}) "
                       f"would share VRRP router id {rid} on network {vip.network} (the id is the address's last "
                       f"octet % 254 + 1): give one of them another address")
    return out


def validate(inv: Inventory) -> None:
    found = problems(inv)
    if found:
        raise UserError("keepalived: " + "; ".join(found) + "; nothing was changed")


def select(inv: Inventory, vips: Iterable[str] | None) -> list[KeepalivedVip]:
    """The VIPs to converge: ``vips`` (names of the table; those the inventory does not
    define are left out), or every VIP the inventory defines. An unknown name is a
    UserError naming it and the known ones."""
    if vips is None:
        return served(inv)
    if isinstance(vips, str):
        vips = (vips,)
    names = list(vips)
    unknown = [n for n in names if n not in VIPS]
    if unknown:
        raise UserError(f"keepalived serves no VIP {', '.join(repr(n) for n in unknown)} "
                        f"(known: {', '.join(VIPS)}); nothing was changed")
    return [v for v in served(inv) if v.name in names]


def vips_of(inv: Inventory, host: str) -> list[KeepalivedVip]:
    """The VIPs ``host`` serves: those of the inventory whose role it has."""
    roles = set(inv.hosts[host].roles)
    return [v for v in served(inv) if inv.vips[v.name].role in roles]


def holders(inv: Inventory, name: str) -> list[str]:
    """The hosts that carry VIP ``name``: its role's hosts on its network, in inventory order."""
    vip = inv.vips[name]
    return [h for h in inv.with_role(vip.role) if vip.network in inv.hosts[h].addresses]


def peers(inv: Inventory, name: str, host: str) -> list[str]:
    """The unicast peers of ``host`` for VIP ``name``: the other holders' addresses on its network."""
    net = inv.vips[name].network
    return [str(inv.hosts[n].addresses[net]) for n in holders(inv, name) if n != host]


def priority(inv: Inventory, name: str, host: str) -> int:
    hosts = holders(inv, name)
    return BASE_PRIORITY - 10 * hosts.index(host) if host in hosts else 100


def _own_address(inv: Inventory, name: str, host: str) -> str:
    """The host's address on VIP ``name``'s network (its service address when it has none)."""
    vip = inv.vips.get(name)
    addrs = inv.hosts[host].addresses
    if vip is not None and vip.network in addrs:
        return str(addrs[vip.network])
    return inv.service_address(host)


def instance(inv: Inventory, v: KeepalivedVip, host: str, secret) -> dict:
    """One vrrp_instance (and its vrrp_script) of ``host``'s config."""
    vip = inv.vips[v.name]
    return {
        "name": v.name,
        "follows": v.follows,
        "interface": vip.network,  # the lab names NICs after networks; converge puts the real one
        "src": _own_address(inv, v.name, host),
        "peers": peers(inv, v.name, host),
        "vip": f"{vip.address}/{inv.networks[vip.network].cidr.prefixlen}",
        "router_id": router_id(inv, v.name),
        "priority": priority(inv, v.name, host),
        "password": secret(v.secret)[:8],
        "check": v.check,
        "script": v.script,
    }


def template_vars(inv: Inventory, host: str, secret) -> dict:
    """``vrrp_instances``: one per VIP the host serves (keepalived.conf);
    ``check_addresses``: per VIP of the table, the address its check connects to."""
    validate(inv)
    return {
        "vrrp_instances": [instance(inv, v, host, secret) for v in vips_of(inv, host)],
        "check_addresses": {name: _own_address(inv, name, host) for name in VIPS},
    }


# --- converge --------------------------------------------------------------------------------


def preflight(run: Run) -> None:
    validate(run.inv)


def converge(run: Run, vips: Iterable[str] | None = None) -> None:
    """Converge keepalived for ``vips`` (names of ``VIPS``; default: every one the
    inventory defines) on the hosts holding their roles. Each host gets its whole
    config (all of its VIPs), so converging one VIP keeps the others."""
    chosen = select(run.inv, vips)
    if not chosen:
        asked = ", ".join(f"vips.{n}" for n in ((vips,) if isinstance(vips, str) else vips or VIPS))
        run.report.note(f"keepalived: the inventory has no {asked.replace(', ', ' or ')}; nothing to do")
        return
    validate(run.inv)
    hosts = run.hosts(*{run.inv.vips[v.name].role for v in chosen})
    for v in served(run.inv):  # every VIP these hosts render, not only the chosen ones
        if any(v in vips_of(run.inv, h) for h in hosts):
            run.secrets.get(v.secret, vrrp_password)
    title = ", ".join(f"the {v.name} VIP follows {v.follows}" for v in chosen)
    run.step(f"keepalived: {title}", hosts, _keepalived)


def _interface(h: HostSession, address: str) -> str:
    out = h.probe(f"ip -o -4 addr show to {q(address + '/32')}").stdout.split()
    if len(out) < 2:
        if h.run.check:
            return "?"
        raise HostFailed(f"no interface holds {address} on {h.name}")
    return out[1].split("@")[0]


def with_interfaces(tvars: dict, nics: dict[str, str]) -> dict:
    """``tvars`` with each instance on the NIC found on the host (``nics``: VIP name -> NIC)."""
    return {**tvars, "vrrp_instances": [{**i, "interface": nics.get(i["name"], i["interface"])}
                                        for i in tvars["vrrp_instances"]]}


def _keepalived(h: HostSession) -> None:
    tvars = h.tier_vars(template_vars)
    instances = tvars["vrrp_instances"]
    nics = {i["name"]: _interface(h, i["src"]) for i in instances}
    seen: dict[tuple[str, int], str] = {}
    for i in instances:  # two VIPs of different networks on one NIC: their ids must differ too
        other = seen.setdefault((nics[i["name"]], i["router_id"]), i["name"])
        if other != i["name"] and nics[i["name"]] != "?":
            raise HostFailed(f"the {other} and {i['name']} VIPs would share VRRP router id {i['router_id']} "
                             f"on {nics[i['name']]}: give one of them another address")
    h.packages(PACKAGES)
    h.directory(LIB, mode="0755")
    checks_changed = False
    for v in vips_of(h.inv, h.name):
        checks_changed |= h.template(v.template, v.check, tvars, mode="0755", validate="sh -n {}")
    conf_changed = h.template("keepalived/etc/keepalived/keepalived.conf.j2", CONFIG, with_interfaces(tvars, nics),
                              mode="0640", validate="keepalived -t -f {}")
    # (The unit has ConditionFileNotEmpty on its config: installed before the config
    # existed, systemd skipped it; service() tries such a unit again.)
    h.service("keepalived", reload=conf_changed or checks_changed)


# --- tasks -----------------------------------------------------------------------------------

VIP_HELP = f"only this VIP ({', '.join(VIPS)}); the hosts still get their whole config"


def _vip_arg(run: Run, vip: str | None) -> list[KeepalivedVip] | None:
    """--vip NAME, checked: a VIP of the table that the inventory defines."""
    if vip is None:
        return None
    if vip not in VIPS:
        raise UserError(f"--vip {vip!r}: keepalived serves no such VIP (known: {', '.join(VIPS)}); "
                        "nothing was changed")
    if vip not in run.inv.vips:
        raise UserError(f"--vip {vip}: {run.inv.path} has no vips.{vip}; nothing was changed")
    return [VIPS[vip]]


@runbook(default=True, help={"vip": VIP_HELP})
def deploy(run, vip=None):
    """Converge keepalived: each VIP (xmpp, webmail) follows its running service."""
    chosen = _vip_arg(run, vip)
    converge(run, vips=None if chosen is None else [v.name for v in chosen])


@runbook(readonly=True, help={"vip": "only this VIP (" + ", ".join(VIPS) + ")"})
def status(run, vip=None):
    """Per host and VIP it serves: keepalived active, the VIP's check, whether it holds the VIP."""
    chosen = _vip_arg(run, vip) or served(run.inv)
    roles = {run.inv.vips[v.name].role for v in chosen}

    def one(h: HostSession) -> None:
        active = h.probe("systemctl is-active keepalived").stdout.strip() or "unknown"
        for v in vips_of(h.inv, h.name):
            if v not in chosen:
                continue
            address = str(h.inv.vips[v.name].address)
            holds = bool(h.probe(f"ip -o -4 addr show to {q(address + '/32')}").stdout.strip())
            check = h.probe(q(v.check)).ok
            h.ok(f"{v.name}: keepalived {active}; {v.script} check {'passes' if check else 'FAILS'}; "
                 + (f"holds the VIP {address}" if holds else f"does not hold the VIP {address}"))

    if not chosen:
        run.report.note(f"keepalived: the inventory has none of the VIPs {', '.join(VIPS)}; nothing to show")
        return
    run.step("keepalived: status", run.hosts(*roles), one)


ns = Collection("keepalived", deploy, status)
