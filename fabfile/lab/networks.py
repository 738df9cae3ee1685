"""The lab's wires: one Linux bridge per inventory network (only the management
bridge has an address on this machine), one network namespace per host, and a
veth pair per NIC joining the host's namespace to its network's bridge."""

from __future__ import annotations

import contextlib
import ipaddress
import re
from pathlib import Path

from ..core import UserError
from .plan import Plan
from .system import ip_json, is_mount, run

NETNS_DIR = Path("/run/netns")


def link(name: str) -> dict | None:
    found = ip_json("-d", "link", "show", "dev", name) if link_exists(name) else []
    return found[0] if found else None


def link_exists(name: str) -> bool:
    return Path("/sys/class/net", name).exists()


def is_our_bridge(plan: Plan, link: dict) -> bool:
    kind = link.get("linkinfo", {}).get("info_kind")
    return kind == "bridge" and link.get("ifalias") == plan.marker


def check_machine(plan: Plan) -> None:
    """Bridge names free (or ours), no lab address already used on the machine."""
    for net, name in plan.bridges.items():
        found = link(name)
        if found is not None and not is_our_bridge(plan, found):
            kind = found.get("linkinfo", {}).get("info_kind") or "device"
            raise UserError(
                f"bridge name {name} (network {net}) is already in use on this machine by a {kind} "
                f"the lab did not make; remove it or choose another lab.bridge_prefix in {plan.inv.path}"
            )
    ours = set(plan.bridges.values())
    lab_nets = [n.cidr for n in plan.inv.networks.values()]
    for dev in ip_json("addr", "show"):
        if dev.get("ifname") in ours:
            continue
        for addr in dev.get("addr_info", []):
            if addr.get("family") != "inet":
                continue
            ip = ipaddress.IPv4Address(addr["local"])
            if any(ip in net for net in lab_nets):
                raise UserError(
                    f"address {ip} on {dev['ifname']} lies inside a lab network; the lab would clash "
                    f"with it (change the networks in {plan.inv.path} or remove that address)"
                )


def ensure_bridges(plan: Plan) -> list[str]:
    made = []
    for net, name in plan.bridges.items():
        if not link_exists(name):
            run(["ip", "link", "add", name, "type", "bridge", "mcast_snooping", "0"])
            run(["ip", "link", "set", "dev", name, "alias", plan.marker])
            made.append(name)
            # The bridges are the lab's wires; the machine takes no part in IPv6 on them.
            with contextlib.suppress(OSError):
                Path(f"/proc/sys/net/ipv6/conf/{name}/disable_ipv6").write_text("1")
        if net == plan.mgmt:
            iface = str(plan.bridge_interface)
            have = {f"{a['local']}/{a['prefixlen']}" for dev in ip_json("addr", "show", "dev", name)
                    for a in dev.get("addr_info", []) if a.get("family") == "inet"}
            if iface not in have:
                run(["ip", "addr", "add", iface, "dev", name])
        run(["ip", "link", "set", "dev", name, "up"])
    return made


def ensure_netns(plan: Plan, host: str) -> None:
    ns = plan.netns(host)
    if not (NETNS_DIR / ns).exists():
        if not is_mount(NETNS_DIR):
            (plan.state_dir / "made-run-netns").touch()
        run(["ip", "netns", "add", ns])
        # A new netns inherits the machine's IPv4 settings (devconf_inherit_init_net=0
        # means "inherit" for IPv4); a fresh host does not forward until the gateway tier says so.
        run(["ip", "netns", "exec", ns, "sysctl", "-q", "-w", "net.ipv4.ip_forward=0", "net.ipv6.conf.all.forwarding=0"])
    run(["ip", "-n", ns, "link", "set", "lo", "up"])
    inside = {dev["ifname"]: dev for dev in ip_json("-n", ns, "addr", "show")}
    for net, iface in plan.nics(host):
        if net not in inside:
            veth = plan.veths[(host, net)]
            if link_exists(veth):
                run(["ip", "link", "del", veth])
            run(["ip", "link", "add", veth, "type", "veth", "peer", "name", net, "netns", ns])
            run(["ip", "link", "set", "dev", veth, "master", plan.bridges[net], "up"])
            have = set()
        else:
            have = {f"{a['local']}/{a['prefixlen']}" for a in inside[net].get("addr_info", [])}
        if str(iface) not in have:
            run(["ip", "-n", ns, "addr", "add", str(iface), "dev", net])
        run(["ip", "-n", ns, "link", "set", "dev", net, "up"])


def remove_networks(plan: Plan, hosts: list[str]) -> list[str]:
    """Delete the hosts' namespaces (their veth ends go with them), stray veths and
    the lab's bridges; return what was removed, for the operator."""
    done = []
    namespaces = [host for host in hosts if (NETNS_DIR / plan.netns(host)).exists()]
    for host in namespaces:
        run(["ip", "netns", "del", plan.netns(host)], check=False)
    if namespaces:
        done.append(f"{len(namespaces)} namespaces")
    bridges = [dev["ifname"] for dev in ip_json("-d", "link", "show") if is_our_bridge(plan, dev)]
    veth_re = re.compile(rf"^{re.escape(plan.prefix)}\d+-")
    stray = [dev["ifname"] for dev in ip_json("-d", "link", "show")
             if dev.get("linkinfo", {}).get("info_kind") in ("veth", "tun")
             and (dev.get("master") in bridges or veth_re.match(dev["ifname"]))]
    for name in stray:
        run(["ip", "link", "del", name], check=False)
    if stray:
        done.append(f"{len(stray)} veths and taps")
    for name in bridges:
        run(["ip", "link", "del", name], check=False)
    if bridges:
        done.append(f"{len(bridges)} bridges")
    return done
