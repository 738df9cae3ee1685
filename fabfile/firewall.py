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

What each role accepts is the site's flow table (``fabfile/core/flows.py``:
role -> port/proto/from, read like the seeds' port lists); the template only
formats it. Every host also
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
from typing import TYPE_CHECKING

from invoke import Collection

from .core import UserError, flows, q, runbook, templates

if TYPE_CHECKING:
    from .core import HostSession, Run
    from .core.inventory import Inventory

RULES_V4 = "/etc/iptables/rules.v4"
RULES_V6 = "/etc/iptables/rules.v6"
TEMPLATE_V4 = "firewall/etc/iptables/rules.v4.j2"
TEMPLATE_V6 = "firewall/etc/iptables/rules.v6.j2"
PACKAGES = ["iptables", "iptables-persistent", "netfilter-persistent", "netbase"]
# Answered before the install, so the package does not save the running rules.
PRESEED = [
    "iptables-persistent iptables-persistent/autosave_v4 boolean false",
    "iptables-persistent iptables-persistent/autosave_v6 boolean false",
]

def template_vars(inv: Inventory, host: str, secret) -> dict:
    rs = flows.ruleset(inv, host)
    return {"input_rules": rs["input"], "forward_rules": rs["forward"], "roles": inv.hosts[host].roles}


def render_v4(inv: Inventory, host: str, secret) -> str:
    return templates.render(TEMPLATE_V4, inv, host, secret, **template_vars(inv, host, secret))


def _vars(run: Run, host: str) -> dict:
    """The host's compiled rules, once per run (the preflight, rules.v4 and rules.v6 share them)."""
    return run.memo(("firewall vars", host), lambda: template_vars(run.inv, host, run.secret))


def _v4(run: Run, host: str) -> str:
    """rules.v4 of ``host``, rendered once per run (the preflight and the step share it)."""
    return run.memo(("rules.v4", host),
                    lambda: templates.render(TEMPLATE_V4, run.inv, host, run.secret, **_vars(run, host)))


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


def preflight(run: Run, hosts: list[str] | None = None) -> None:
    """Render and check every host's rules before any host is touched."""
    hosts = run.hosts() if hosts is None else hosts
    problems = []
    for host in hosts:
        try:
            check_ssh_kept(_v4(run, host), run.inv, host)
        except UserError as exc:
            problems.append(str(exc))
    if problems:
        raise UserError("nothing was changed:\n  " + "\n  ".join(problems))


def install(h: HostSession) -> None:
    """iptables-persistent, preseeded so that installing it saves nothing."""
    h.packages(PACKAGES, preseed=PRESEED)


def apply_rules(h: HostSession) -> None:
    """Put rules.v4/rules.v6 (validated) and make the live tables match them."""
    v4 = _v4(h.run, h.name)
    check_ssh_kept(v4, h.inv, h.name)
    v6 = templates.render(TEMPLATE_V6, h.inv, h.name, h.run.secret, **_vars(h.run, h.name))
    h.directory("/etc/iptables")
    h.put(v4, RULES_V4, mode="0640", validate="iptables-restore --test {}")
    h.put(v6, RULES_V6, mode="0640", validate="ip6tables-restore --test {}")
    live = _live_tables(h)
    _load(h, "iptables", RULES_V4, v4, live.get("iptables"))
    _load(h, "ip6tables", RULES_V6, v6, live.get("ip6tables"))
    h.service("netfilter-persistent")


_TABLES_MARK = "==hastack-ip6tables=="
LIVE_TABLES = f"iptables-save -t filter && echo {_TABLES_MARK} && ip6tables-save -t filter"


def _live_tables(h: HostSession) -> dict[str, str]:
    """Both live filter tables in one round trip; a table that could not be read is absent."""
    r = h.probe(LIVE_TABLES)
    if not r.ok:
        return {}
    v4, mark, v6 = r.stdout.partition(f"{_TABLES_MARK}\n")
    return {"iptables": v4, "ip6tables": v6} if mark else {}


def _load(h: HostSession, tool: str, path: str, text: str, live: str | None) -> None:
    if live is not None and canonical(live) == canonical(text):
        h.ok(f"live {tool} filter table matches {path}")
        return
    h.sh(f"{tool}-restore {q(path)}", message=f"load {path} ({tool}-restore: one atomic swap of the filter table)")


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
