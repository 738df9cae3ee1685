"""Firewall tier: default-DROP iptables on every host, generated from its roles.

Runbook:
1. Before any host is touched, render every selected host's rule set and check
   it: the INPUT chain must accept SSH from the management network before
   anything could drop it. A rule set that would lock us out is refused,
   naming the host, and nothing is changed.
2. Install iptables-persistent without letting it save the running rules
   (debconf preseed autosave_v4/v6 = false).
3. Render /etc/iptables/rules.v4 and rules.v6, each checked with
   `iptables-restore --test` before it replaces the old file.
4. Compare the live filter table with the file; when they differ, load the
   file with `iptables-restore` (one atomic swap of the table: never
   flush-then-add, so a host is never half-filtered and SSH never drops).
5. Enable netfilter-persistent, which loads both files at boot.

What each role accepts is the table ``TABLE`` below (role -> port/proto/from),
read like the seeds' port lists; the template only formats it. Every host also
accepts loopback, ESTABLISHED/RELATED, ICMP echo and SSH from the management
network. IPv6 has no management: inbound is dropped except loopback,
ESTABLISHED/RELATED and ICMPv6 neighbour discovery. The gateway's FORWARD
chain comes from the same table (see fabfile/gateway.py).
"""

from __future__ import annotations

import ipaddress
import re
import shlex
from dataclasses import dataclass
from typing import Callable, Iterable, Union

from invoke import Collection

from .core import HostSession, Run, UserError, runbook
from .core import templates
from .core.inventory import Inventory

RULES_V4 = "/etc/iptables/rules.v4"
RULES_V6 = "/etc/iptables/rules.v6"
TEMPLATE_V4 = "firewall/etc/iptables/rules.v4.j2"
TEMPLATE_V6 = "firewall/etc/iptables/rules.v6.j2"
PACKAGES = ["iptables", "iptables-persistent", "netfilter-persistent", "netbase"]
# Answered before the install, so the package does not save the running rules.
PRESEED = (
    "iptables-persistent iptables-persistent/autosave_v4 boolean false\n"
    "iptables-persistent iptables-persistent/autosave_v6 boolean false\n"
)

# --- the rule table --------------------------------------------------------------
#
# Sources: a tuple of roles (those hosts' addresses on the network they share
# with the target host, or, across the gateway, their own segment address), or
# one of these:
ANYONE = "anyone"  # no source restriction (public service ports)
MGMT = "management network"  # the inventory's management CIDR
LOCAL_NETS = "local networks"  # every non-management network the target host is on

Ports = Union[str, Callable[[Inventory], str]]


@dataclass(frozen=True)
class Allow:
    """One row: a host with the role accepts ``proto``/``ports`` from ``sources``."""

    proto: str  # tcp, udp, icmp, vrrp
    ports: Ports = ""  # "22", "4200:4210", "5222,5223"; "" = any port / no ports
    sources: tuple[str, ...] | str = ANYONE
    why: str = ""  # becomes the rule's iptables comment
    to_vip: str | None = None  # only to this VIP (inventory name), if the inventory has it
    when: Callable[[Inventory], bool] | None = None  # only for inventories where this holds


def _ssh_port(inv: Inventory) -> str:
    return str(inv.ssh.port)


def _db_proxy_port(inv: Inventory) -> str:
    return {"proxysql": "6033", "haproxy": "3306"}[inv.mail.db_proxy] if inv.mail else "6033"


def _haproxy(inv: Inventory) -> bool:
    return inv.mail is not None and inv.mail.db_proxy == "haproxy"


def _drbd(inv: Inventory) -> bool:
    return inv.mail is not None and inv.mail.storage == "drbd"


# Hosts that carry a Bacula file daemon, and hosts with a node exporter (seed 004).
BACULA_CLIENTS = ("ejabberd", "postgres_primary", "postgres_replica", "monitoring")
POSTGRES = ("postgres_primary", "postgres_replica")

EVERY_HOST: list[Allow] = [
    Allow("icmp", "echo-request", ANYONE, "ping"),
    Allow("tcp", _ssh_port, MGMT, "SSH from the management network"),
]

TABLE: dict[str, list[Allow]] = {
    # --- XMPP service (seed 004) ----------------------------------------------
    "ejabberd": [
        Allow("tcp", "5222,5223,5269,5280,5443,1883", ANYONE,
              "ejabberd c2s, c2s TLS, s2s, HTTP, HTTPS, MQTT"),
        Allow("tcp", "4369", ("ejabberd",), "Erlang epmd, cluster nodes only"),
        Allow("tcp", "4200:4210", ("ejabberd",), "Erlang distribution FIREWALL_WINDOW, cluster nodes only"),
        Allow("vrrp", "", ("ejabberd",), "keepalived VRRP between the xmpp VIP peers"),
        Allow("tcp", "9100", ("monitoring",), "node exporter"),
        Allow("tcp", "9102", ("backup",), "bacula-fd from the director"),
    ],
    "postgres_primary": [
        Allow("tcp", "5432", ("ejabberd", "postgres_replica"), "PostgreSQL from ejabberd and the replica"),
        Allow("tcp", "9100", ("monitoring",), "node exporter"),
        Allow("tcp", "9187", ("monitoring",), "postgres exporter"),
        Allow("tcp", "9102", ("backup",), "bacula-fd from the director"),
    ],
    "postgres_replica": [
        # ejabberd too: after a promotion this host is the one ejabberd uses.
        Allow("tcp", "5432", ("ejabberd", "postgres_primary"), "PostgreSQL from ejabberd and the primary"),
        Allow("tcp", "9100", ("monitoring",), "node exporter"),
        Allow("tcp", "9187", ("monitoring",), "postgres exporter"),
        Allow("tcp", "9102", ("backup",), "bacula-fd from the director"),
    ],
    "gateway": [
        Allow("tcp", "9100", ("monitoring",), "node exporter"),
    ],
    "backup": [
        Allow("tcp", "9101", BACULA_CLIENTS, "bacula-dir from its clients"),
        Allow("tcp", "9103", BACULA_CLIENTS, "bacula-sd from its clients"),
        Allow("tcp", "2049", POSTGRES, "NFSv4 WAL archive and base backups"),
        Allow("tcp", "9100", ("monitoring",), "node exporter"),
    ],
    "monitoring": [
        Allow("tcp", "3000,9090", MGMT, "Grafana and Prometheus for the operators"),
        Allow("tcp", "9102", ("backup",), "bacula-fd from the director"),
    ],
    "spare": [],
    # --- mail cluster (seed 000) ----------------------------------------------
    "webmail": [
        Allow("tcp", "80,443", LOCAL_NETS, "Roundcube"),
        Allow("vrrp", "", ("webmail",), "keepalived VRRP between the webmail VIP peers"),
    ],
    "mail_backend": [
        Allow("tcp", "25,587,143,993", LOCAL_NETS, "SMTP, submission, IMAP, IMAPS"),
        Allow("tcp", "80,443", LOCAL_NETS, "Postfixadmin"),
        Allow("tcp", _db_proxy_port, ("webmail", "mail_backend"), "database proxy on the dbproxy VIP",
              to_vip="dbproxy"),
        Allow("udp", "5404:5406", ("mail_backend",), "corosync"),
        Allow("tcp", "2224", ("mail_backend",), "pcsd"),
        Allow("tcp", "7788:7799", ("mail_backend",), "DRBD replication", when=_drbd),
    ],
    "galera": [
        Allow("tcp", "3306,4444,4567,4568", ("galera",), "Galera: MySQL, SST, replication, IST"),
        Allow("tcp", "3306", ("mail_backend", "webmail"), "MySQL from the DB proxy and Roundcube"),
        Allow("tcp", "9200", ("mail_backend",), "Galera health check for HAProxy", when=_haproxy),
    ],
}

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


def non_management(inv: Inventory, host: str) -> dict[str, ipaddress.IPv4Address]:
    mgmt = inv.management_network
    return {net: a for net, a in inv.hosts[host].addresses.items() if net != mgmt}


def peer_addresses(inv: Inventory, src: str, target: str) -> list[str]:
    """The addresses ``src`` talks to ``target`` from: its address on a
    (non-management) network they share; across the gateway its own segment
    address(es); the management address for a host with no other."""
    mine, theirs = non_management(inv, src), non_management(inv, target)
    shared = [a for net, a in mine.items() if net in theirs]
    if shared:
        return [_cidr(a) for a in shared]
    if mine:
        return [_cidr(a) for a in mine.values()]
    return [_cidr(inv.management_address(src))]


def allowed_sources(inv: Inventory, target: str, allow: Allow) -> list[str | None]:
    """Source CIDRs of a row for one target host (None = anyone)."""
    if allow.sources == ANYONE:
        return [None]
    if allow.sources == MGMT:
        return [str(inv.networks[inv.management_network].cidr)]
    if allow.sources == LOCAL_NETS:
        nets = non_management(inv, target) or {inv.management_network: None}
        return [str(inv.networks[net].cidr) for net in nets]
    out: list[str | None] = []
    for src in inv.with_role(*allow.sources):
        if src != target:
            out += [a for a in peer_addresses(inv, src, target) if a not in out]
    return out


def resolve_ports(inv: Inventory, allow: Allow) -> str:
    return allow.ports(inv) if callable(allow.ports) else allow.ports


def rows(inv: Inventory, host: str, table: dict[str, list[Allow]] | None = None,
         every_host: Iterable[Allow] | None = None) -> list[Allow]:
    """The rows that apply to ``host``: every host's, then each of its roles'."""
    table = TABLE if table is None else table
    out = list(EVERY_HOST if every_host is None else every_host)
    for role in inv.hosts[host].roles:
        out += [a for a in table.get(role, []) if a.when is None or a.when(inv)]
    return out


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
    from . import gateway  # the gateway's FORWARD chain is derived from the same table

    return {
        "input": input_rules(inv, host, table, every_host),
        "forward": gateway.forward_rules(inv, host, table),
    }


def template_vars(inv: Inventory, host: str, secret) -> dict:
    rs = ruleset(inv, host)
    return {"input_rules": rs["input"], "forward_rules": rs["forward"], "roles": inv.hosts[host].roles}


def render_v4(inv: Inventory, host: str, secret, **extra) -> str:
    return templates.render(TEMPLATE_V4, inv, host, secret, **extra)


# --- the SSH lock-out guard ------------------------------------------------------


def check_ssh_kept(text: str, inv: Inventory, host: str) -> None:
    """Refuse (UserError naming the host) an iptables-restore file whose INPUT
    chain could drop a new SSH connection from the management network before a
    rule accepts all of them."""
    cidr = inv.networks[inv.management_network].cidr
    port = inv.ssh.port
    where = f"{host}: firewall rules refused, they would lock out SSH from the management network {cidr}"
    policy = "ACCEPT"
    table = None
    for n, raw in enumerate(text.splitlines(), 1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if line.startswith("*"):
            table = line[1:]
            continue
        if table != "filter":
            continue
        if line.startswith(":INPUT "):
            policy = line.split()[1]
            continue
        words = line.split()
        if "INPUT" in words[1:2] and words[0] != "-A":  # -I, -R, -D, -P ...: order unclear
            raise UserError(f"{where}: cannot check line {n} (only -A INPUT is understood): {line}")
        if words[:2] != ["-A", "INPUT"]:
            continue
        rule = _parse(line)
        if rule is None:  # something this guard does not understand: be careful
            raise UserError(f"{where}: cannot check line {n}: {line}")
        if rule.accepts_all(cidr, port, inv.management_address(host)):
            return
        if rule.may_block(cidr, port, inv.management_address(host)):
            raise UserError(f"{where}: line {n} comes before any rule accepting tcp/{port} from {cidr}: {line}")
    if policy != "ACCEPT":
        raise UserError(f"{where}: no INPUT rule accepts tcp/{port} from {cidr} and the policy is {policy}")


@dataclass
class _Parsed:
    """One INPUT rule as far as the guard needs it; each match is (value, negated)."""

    src: tuple | None = None
    dst: tuple | None = None
    iface: tuple | None = None
    proto: tuple | None = None
    ports: tuple | None = None
    states: tuple | None = None
    other_match: bool = False
    target: str = ""

    def _decide(self, cidr, port: int, address: str, *, every: bool) -> bool:
        """Does the rule match a new tcp/``port`` connection to ``address`` from
        every (``every``) / some address of ``cidr``, arriving on a non-loopback NIC?"""
        checks = []
        if self.src:
            net, neg = self.src
            if every:
                checks.append(not net.overlaps(cidr) if neg else cidr.subnet_of(net))
            else:
                checks.append(not cidr.subnet_of(net) if neg else net.overlaps(cidr))
        if self.dst:
            net, neg = self.dst
            checks.append((ipaddress.ip_address(address) in net) != neg)
        if self.iface:
            name, neg = self.iface
            # The management NIC's name is unknown here: only "not lo" matches every packet.
            checks.append(neg and name == "lo" if every else (neg or name != "lo"))
        if self.proto:
            name, neg = self.proto
            checks.append((name in ("tcp", "6", "all")) != neg)
        if self.ports:
            ranges, neg = self.ports
            checks.append(any(lo <= port <= hi for lo, hi in ranges) != neg)
        if self.states:
            states, neg = self.states
            checks.append(("NEW" in states) != neg)
        if self.other_match:
            checks.append(not every)
        return all(checks)

    def accepts_all(self, cidr, port: int, address: str) -> bool:
        return self.target == "ACCEPT" and self._decide(cidr, port, address, every=True)

    def may_block(self, cidr, port: int, address: str) -> bool:
        if self.target in ("", "ACCEPT", "LOG", "RETURN"):
            return False
        return self._decide(cidr, port, address, every=False)


def _ports(spec: str) -> list[tuple[int, int]]:
    out = []
    for part in spec.split(","):
        lo, sep, hi = part.partition(":")
        low = int(lo) if lo else 0
        out.append((low, int(hi) if hi else (65535 if sep else low)))
    return out


_MATCHES_KNOWN = ("tcp", "udp", "multiport", "comment", "conntrack", "state", "icmp")


def _parse(line: str) -> _Parsed | None:
    try:
        words = shlex.split(line)[2:]
    except ValueError:
        return None
    p = _Parsed()
    neg = False
    i = 0
    try:
        while i < len(words):
            w = words[i]
            if w == "!":
                neg = True
                i += 1
                continue
            arg = words[i + 1] if i + 1 < len(words) else ""
            if w in ("-s", "--source"):
                p.src = (ipaddress.ip_network(arg, strict=False), neg)
            elif w in ("-d", "--destination"):
                p.dst = (ipaddress.ip_network(arg, strict=False), neg)
            elif w in ("-i", "--in-interface"):
                p.iface = (arg, neg)
            elif w in ("-p", "--protocol"):
                p.proto = (arg.lower(), neg)
            elif w in ("--dport", "--destination-port", "--dports", "--destination-ports"):
                p.ports = (_ports(arg), neg)
            elif w in ("--ctstate", "--state"):
                p.states = (set(arg.upper().split(",")), neg)
            elif w in ("-j", "--jump", "-g", "--goto"):
                p.target = arg
            elif w in ("-m", "--match"):
                p.other_match |= arg not in _MATCHES_KNOWN
            elif w in ("--comment", "--icmp-type", "--reject-with"):
                pass
            else:
                return None
            neg = False
            i += 2
    except ValueError:
        return None
    return p


# --- the steps -------------------------------------------------------------------


def preflight(run: Run, hosts: list[str]) -> None:
    """Render and check every host's rules before any host is touched."""
    problems = []
    for host in hosts:
        try:
            check_ssh_kept(render_v4(run.inv, host, run.secret), run.inv, host)
        except UserError as exc:
            problems.append(str(exc))
    if problems:
        raise UserError("nothing was changed:\n  " + "\n  ".join(problems))


def install(h: HostSession) -> None:
    """iptables-persistent, preseeded so that installing it saves nothing."""
    listed = h.probe("dpkg-query -W -f='${db:Status-Status}' iptables-persistent")
    if listed.stdout.strip() != "installed":
        h.sh("debconf-set-selections", stdin=PRESEED,
             message="preseed iptables-persistent: do not save the running rules")
    h.packages(PACKAGES)


def apply_rules(h: HostSession) -> None:
    """Put rules.v4/rules.v6 (validated) and make the live tables match them."""
    v4 = render_v4(h.inv, h.name, h.run.secret)
    check_ssh_kept(v4, h.inv, h.name)
    v6 = templates.render(TEMPLATE_V6, h.inv, h.name, h.run.secret)
    h.directory("/etc/iptables")
    h.put(v4, RULES_V4, mode="0640", validate="iptables-restore --test {}")
    h.put(v6, RULES_V6, mode="0640", validate="ip6tables-restore --test {}")
    _load(h, "iptables", RULES_V4, v4)
    _load(h, "ip6tables", RULES_V6, v6)
    h.service("netfilter-persistent")


def _load(h: HostSession, tool: str, path: str, text: str) -> None:
    live = h.probe(f"{tool}-save -t filter")
    if live.ok and canonical(live.stdout) == canonical(text):
        h.ok(f"live {tool} filter table matches {path}")
        return
    h.sh(f"{tool}-restore {path}", message=f"load {path} ({tool}-restore: one atomic swap of the filter table)")


_COUNTERS = re.compile(r"\s*\[\d+:\d+\]$")


def canonical(text: str) -> list[tuple[str, ...]]:
    """An iptables-restore file or iptables-save output as the kernel holds it:
    without comments, blank lines, counters, and with quoting undone."""
    out = []
    for line in text.splitlines():
        line = _COUNTERS.sub("", line.strip())
        if line and not line.startswith("#"):
            try:
                out.append(tuple(shlex.split(line)))
            except ValueError:
                out.append((line,))
    return out


def converge(run: Run) -> None:
    hosts = run.hosts()
    preflight(run, hosts)
    run.step("firewall: iptables-persistent", hosts, install)
    run.step("firewall: rules", hosts, apply_rules)


@runbook(default=True)
def deploy(run):
    """Converge default-DROP iptables rules on every host (or --hosts)."""
    converge(run)


@runbook
def show(run):
    """Print the rules.v4 each host would get (read-only, no SSH)."""
    for name in run.hosts():
        text = render_v4(run.inv, name, run.secret)
        check_ssh_kept(text, run.inv, name)
        run.report.console.print(f"[bold]# {name}[/]")
        run.report.console.print(text, markup=False)


ns = Collection("firewall", deploy, show)
