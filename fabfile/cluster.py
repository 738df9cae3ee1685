"""Cluster tier (mail back ends): Pacemaker + Corosync with pcs on the
`mail_backend` hosts, STONITH on, and the seed's resource tree built from the
inventory.

Resource tree (names are the contract with the mail and dbproxy tiers):

- `mail.storage: drbd`: DrbdData (ocf:linbit:drbd, unfence_if_all_uptodate,
  promotable clone DrbdData-clone: one promoted, clone-max 2 with DRBD 8.4,
  every back end with DRBD 9) -> group `mail` = DrbdFS (Filesystem) ->
  PostfixSpool (postfix's queue on the store, bind-mounted over /var/spool/postfix) ->
  virtual_ip (IPaddr2, the `mail` VIP) -> postfix -> dovecot; colocated with
  the promoted DrbdData and ordered after its promotion.
- `mail.storage: none` (the lab): group `mail` = virtual_ip -> postfix -> dovecot.
- group `dbproxy` = dbproxy_ip (IPaddr2, the `dbproxy` VIP) -> haproxy | proxysql.

A group is colocation + order in one: its members run on one node and start
in order. postfix is `systemd:postfix@-` (Debian's postfix.service is a oneshot
wrapper that reports active even when the daemon is dead), dovecot
`systemd:dovecot`. Units Pacemaker owns are disabled in systemd; the tiers
that configure them (mail, dbproxy) must not start or enable them when
`topology.pacemaker_owns(h, name)` says Pacemaker owns them. This tier installs postfix and
dovecot-imapd itself (Debian defaults) so the tree exists before the mail tier
configures them.

Runbook:
1. packages, the hacluster password (generated, `hacluster_password`), pcsd,
   the fence agent (fence_lab and its config for the lab, from
   configs/cluster/; fence-agents otherwise);
2. formation, once: Debian's default corosync.conf is removed with
   `pcs cluster destroy` (pcs refuses to set up over it), `pcs host auth` from
   the first node, `pcs cluster setup --start --enable`; then start/enable only
   where a node is not;
3. cluster properties and resource defaults (crm_attribute, only differences);
4. units Pacemaker owns: stopped and disabled before their resource is first
   created, kept disabled afterwards (never stopped again);
5. resources, groups, constraints and the STONITH device: the CIB is read
   (cibadmin --query) and compared with the desired tree; missing pieces are
   created, differing parameters updated in place; nothing is deleted or
   recreated (an agent that differs is an error for the operator).
"""

from __future__ import annotations

import re
import xml.etree.ElementTree as ET
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from invoke import Collection

from .core import HostFailed, UserError, join, q, runbook, templates, topology
from .core.secrets import token
from .core.wait import poll

if TYPE_CHECKING:
    from .core import HostSession, Run
    from .core.inventory import Inventory

ROLE = topology.MAIL_BACKEND
SECRET_HACLUSTER = "hacluster_password"
PACKAGES = ["pacemaker", "pacemaker-cli-utils", "corosync", "pcs", "resource-agents"]
MAIL_PACKAGES = ["postfix", "dovecot-imapd"]
FENCE_LAB = "/usr/sbin/fence_lab"
FENCE_LAB_CONF = "/etc/hastack/fence_lab.conf"
PROXY_UNITS = {"haproxy": "haproxy", "proxysql": "proxysql"}
# pcs's requests to the nodes' pcsd (cluster start) give up after 60 s by default:
# a node with a slow (emulated) CPU can take longer. (`cluster setup` takes no such option.)
PCSD_TIMEOUT = "--request-timeout=300"
CIB_FILE = "/run/hastack-cib.xml"  # the copy _resources changes before pushing it
CIB_TIMEOUT = 120  # seconds the CIB may take to answer after the cluster starts
# Credentials the operator puts in the secrets store for the real fence agents.
FENCE_SECRETS = {
    "fence_virsh": ("fence_virsh_ip", "fence_virsh_username", "fence_virsh_password"),
    "fence_vbox": ("fence_vbox_ip", "fence_vbox_username", "fence_vbox_password"),
    "fence_ipmilan": (None, "fence_ipmilan_username", "fence_ipmilan_password"),
}


# --- the desired state -------------------------------------------------------


@dataclass(frozen=True)
class Primitive:
    id: str
    agent: str  # class:provider:type or class:type, as pcs writes it
    params: tuple[tuple[str, str], ...] = ()
    ops: tuple[str, ...] = ("monitor interval=30s",)

    @property
    def unit(self) -> str | None:
        return self.agent.split(":", 1)[1] if self.agent.startswith("systemd:") else None


@dataclass
class Tree:
    primitives: list[Primitive] = field(default_factory=list)
    groups: dict[str, list[str]] = field(default_factory=dict)
    promotable: dict[str, str] = field(default_factory=dict)  # primitive id -> clone id
    clone_max: dict[str, int] = field(default_factory=dict)  # promotable primitive id -> its clone-max
    colocations: list[tuple[str, str, str]] = field(default_factory=list)  # rsc, with-rsc, with-role
    orders: list[tuple[str, str, str, str]] = field(default_factory=list)  # first, action, then, action
    stonith: list[Primitive] = field(default_factory=list)


def cluster_name(inv: Inventory) -> str:
    return f"{inv.site.name}-mail"[:32]


def template_vars(inv: Inventory, host: str, secret) -> dict:
    """fence_lab.conf: the lab machine (the management bridge's first address), its port and secret."""
    mgmt = inv.networks[inv.management_network].cidr
    return {
        "fence_ip": str(next(mgmt.hosts())),
        "fence_port": topology.FENCE_LAB_PORT,
        "fence_password": secret(topology.FENCE_LAB_SECRET),
    }


def _ipaddr2(inv: Inventory, vip_name: str, rid: str) -> Primitive:
    vip = inv.vips[vip_name]
    prefix = inv.networks[vip.network].cidr.prefixlen
    # IPaddr2's metadata gives start and stop 20 s: too short on a busy node (its
    # arping and checks), and a failed start keeps the whole group down.
    return Primitive(rid, "ocf:heartbeat:IPaddr2", (("ip", str(vip.address)), ("cidr_netmask", str(prefix))),
                     ("monitor interval=30s", "start timeout=60s", "stop timeout=60s"))


def desired_tree(inv: Inventory, secret=None) -> Tree:
    t = Tree()
    if inv.mail is None or "mail" not in inv.vips:
        return t
    mail_group: list[str] = []
    if inv.mail.storage == "drbd":
        # unfence_if_all_uptodate: the agent clears a fence constraint (crm-fence-peer.9.sh's)
        # left behind once every disk is UpToDate again.
        t.primitives.append(Primitive(
            "DrbdData", "ocf:linbit:drbd",
            (("drbd_resource", topology.DRBD_RESOURCE), ("unfence_if_all_uptodate", "true")),
            ("monitor interval=29s role=Promoted", "monitor interval=31s role=Unpromoted"),
        ))
        t.promotable["DrbdData"] = "DrbdData-clone"
        # One promoted node; a clone instance on each node of the resource: the first
        # two back ends with DRBD 8.4, every back end with DRBD 9 (the drbd tier's members).
        nodes = len(topology.cluster_nodes(inv))
        t.clone_max["DrbdData"] = nodes if inv.mail.drbd_version == 9 else min(nodes, 2)
        t.primitives.append(Primitive(
            "DrbdFS", "ocf:heartbeat:Filesystem",
            (("device", topology.DRBD_DEVICE), ("directory", topology.MAIL_STORE), ("fstype", "ext4")),
        ))
        t.primitives.append(Primitive(
            "PostfixSpool", "ocf:heartbeat:Filesystem",
            (("device", topology.POSTFIX_SPOOL_ON_STORE), ("directory", topology.POSTFIX_SPOOL),
             ("fstype", "none"), ("options", "bind")),
        ))
        mail_group += ["DrbdFS", "PostfixSpool"]
        t.colocations.append(("mail", "DrbdData-clone", "Promoted"))
        t.orders.append(("DrbdData-clone", "promote", "mail", "start"))
    t.primitives.append(_ipaddr2(inv, "mail", "virtual_ip"))
    t.primitives.append(Primitive("postfix", "systemd:postfix@-"))
    t.primitives.append(Primitive("dovecot", "systemd:dovecot"))
    mail_group += ["virtual_ip", "postfix", "dovecot"]
    t.groups["mail"] = mail_group
    if "dbproxy" in inv.vips:
        kind = topology.db_proxy_kind(inv)
        t.primitives.append(_ipaddr2(inv, "dbproxy", "dbproxy_ip"))
        t.primitives.append(Primitive(kind, f"systemd:{PROXY_UNITS[kind]}"))
        t.groups["dbproxy"] = ["dbproxy_ip", kind]
    t.stonith = fence_devices(inv, secret)
    return t


def fence_devices(inv: Inventory, secret=None) -> list[Primitive]:
    """The STONITH devices for the inventory's fence agent; credentials from the secrets store."""
    agent = inv.mail.fence_agent if inv.mail else "none"
    members = topology.cluster_nodes(inv)
    if agent == "none" or not members:
        return []
    if agent == "fence_lab":
        # Address, port and secret are in /etc/hastack/fence_lab.conf on every node.
        return [Primitive("fence_lab", "stonith:fence_lab", (("pcmk_host_list", ",".join(members)),),
                          ("monitor interval=60s",))]
    ip_name, user_name, pass_name = FENCE_SECRETS[agent]
    hint = f"the {agent} credentials for the cluster nodes; put them in the secrets file"
    req = secret or (lambda n, h="": (_ for _ in ()).throw(UserError(f"missing secret '{n}' ({h})")))
    user, password = req(user_name, hint), req(pass_name, hint)
    if agent == "fence_ipmilan":
        return [Primitive(f"fence_{n}", "stonith:fence_ipmilan",
                          (("ip", req(f"fence_ipmilan_ip_{n}", f"the BMC address of {n}")), ("username", user),
                           ("password", password), ("lanplus", "1"), ("pcmk_host_list", n)),
                          ("monitor interval=60s",)) for n in members]
    params = (("ip", req(ip_name, hint)), ("username", user), ("password", password),
              ("pcmk_host_list", ",".join(members)))
    if agent == "fence_virsh":
        params += (("secure", "1"),)
    return [Primitive(agent, f"stonith:{agent}", params, ("monitor interval=60s",))]


def desired_properties(inv: Inventory) -> dict[str, dict[str, str]]:
    """crm_attribute --type -> {name: value}."""
    fence = inv.mail.fence_agent if inv.mail else "none"
    props = {
        "stonith-enabled": "true" if fence != "none" else "false",
        # A fenced node stays off until someone looks at it (no fence loops).
        "stonith-action": "off",
        "no-quorum-policy": "stop",
    }
    # Operations without a timeout of their own (the monitors): Pacemaker's 20 s default
    # fails a monitor on a busy node (DRBD's agent on a loaded back end) and restarts a healthy resource.
    return {"crm_config": props, "rsc_defaults": {"resource-stickiness": "100"}, "op_defaults": {"timeout": "60s"}}


# --- the actual state (the CIB) ----------------------------------------------


@dataclass
class Actual:
    primitives: dict[str, Primitive] = field(default_factory=dict)
    groups: dict[str, list[str]] = field(default_factory=dict)
    clones: dict[str, str] = field(default_factory=dict)  # primitive id -> clone id
    colocations: set[tuple[str, str, str]] = field(default_factory=set)
    orders: set[tuple[str, str, str, str]] = field(default_factory=set)
    properties: dict[str, dict[str, str]] = field(default_factory=dict)


ROLE_NAMES = {"Master": "Promoted", "Slave": "Unpromoted"}


def _agent(prim: ET.Element) -> str:
    cls, prov, typ = prim.get("class"), prim.get("provider"), prim.get("type")
    return f"{cls}:{prov}:{typ}" if prov else f"{cls}:{typ}"


def _params(prim: ET.Element) -> tuple[tuple[str, str], ...]:
    return tuple((nv.get("name"), nv.get("value")) for ia in prim.findall("instance_attributes")
                 for nv in ia.findall("nvpair"))


def parse_cib(xml: str) -> Actual:
    root = ET.fromstring(xml)
    a = Actual()
    for prim in root.iter("primitive"):
        a.primitives[prim.get("id")] = Primitive(prim.get("id"), _agent(prim), _params(prim), ())
    for group in root.iter("group"):
        a.groups[group.get("id")] = [p.get("id") for p in group.findall("primitive")]
    for clone in root.iter("clone"):
        for prim in clone.findall("primitive"):
            a.clones[prim.get("id")] = clone.get("id")
    for col in root.iter("rsc_colocation"):
        role = col.get("with-rsc-role") or ""
        a.colocations.add((col.get("rsc"), col.get("with-rsc"), ROLE_NAMES.get(role, role)))
    for order in root.iter("rsc_order"):
        a.orders.add((order.get("first"), order.get("first-action") or "start",
                      order.get("then"), order.get("then-action") or "start"))
    for section, tag in (("crm_config", "crm_config"), ("rsc_defaults", "rsc_defaults"), ("op_defaults", "op_defaults")):
        values: dict[str, str] = {}
        for el in root.iter(tag):
            for nv in el.iter("nvpair"):
                values[nv.get("name")] = nv.get("value")
        a.properties[section] = values
    return a


def _create(p: Primitive, tail: list[str], stonith: bool = False) -> str:
    words = ["pcs", "stonith" if stonith else "resource", "create", p.id,
             p.agent.split(":", 1)[1] if stonith else p.agent]
    words += [f"{k}={v}" for k, v in p.params]
    for op in p.ops:
        words += ["op", *op.split()]
    return join(*words, *tail)


def plan_changes(tree: Tree, actual: Actual, props: dict[str, dict[str, str]], n_nodes: int
                 ) -> list[tuple[str, str]]:
    """(command, message) pairs that bring the CIB to ``tree``; empty when converged.
    Never deletes: a primitive of another agent is an error for the operator."""
    todo: list[tuple[str, str]] = []
    for section, values in props.items():
        for name, value in values.items():
            if actual.properties.get(section, {}).get(name) != value:
                todo.append((join("crm_attribute", "--type", section, "--name", name, "--update", value),
                             f"{section} {name}={value}"))
    member_of = {m: g for g, ms in tree.groups.items() for m in ms}
    for p in [*tree.primitives, *tree.stonith]:
        stonith = p in tree.stonith
        have = actual.primitives.get(p.id)
        if have is not None:
            if have.agent != p.agent:
                raise UserError(f"resource {p.id} is {have.agent} in the CIB, the inventory wants {p.agent}; "
                                "refusing to delete and recreate it (change it by hand: pcs resource delete)")
            current = dict(have.params)
            diff = [(k, v) for k, v in p.params if current.get(k) != v]
            if diff:
                sub = "stonith" if stonith else "resource"
                todo.append((join("pcs", sub, "update", p.id, *(f"{k}={v}" for k, v in diff)),
                             f"update {p.id}: " + ", ".join(k for k, _ in diff)))
            group = member_of.get(p.id)
            if group and p.id not in actual.groups.get(group, []):
                todo.append((join("pcs", "resource", "group", "add", group, p.id), f"{p.id} joins group {group}"))
            continue
        tail: list[str] = []
        if p.id in tree.promotable:
            tail = ["promotable", "promoted-max=1", "promoted-node-max=1",
                    f"clone-max={tree.clone_max.get(p.id, min(n_nodes, 2))}",
                    "clone-node-max=1", "notify=true"]
        group = member_of.get(p.id)
        if group:
            tail += ["--group", group]
            members = tree.groups[group]
            earlier = [m for m in members[:members.index(p.id)] if m in actual.primitives]
            later = [m for m in members[members.index(p.id) + 1:] if m in actual.groups.get(group, [])]
            if later and not earlier:
                tail += ["--before", later[0]]
            elif earlier and later:
                tail += ["--after", earlier[-1]]
        todo.append((_create(p, tail, stonith), f"create {'stonith device' if stonith else 'resource'} {p.id}"
                     + (f" in group {group}" if group else "")))
        actual.primitives[p.id] = p  # later members are placed after it
        if group:
            actual.groups.setdefault(group, []).append(p.id)
    for rsc, with_rsc, role in tree.colocations:
        if (rsc, with_rsc, role) not in actual.colocations:
            todo.append((join("pcs", "constraint", "colocation", "add", rsc, "with", role, with_rsc, "INFINITY"),
                         f"colocation {rsc} with {role} {with_rsc}"))
    for first, fa, then, ta in tree.orders:
        if (first, fa, then, ta) not in actual.orders:
            todo.append((join("pcs", "constraint", "order", fa, first, "then", ta, then),
                         f"order {fa} {first} then {ta} {then}"))
    return todo


# --- the runbook -------------------------------------------------------------


def preflight(run: Run) -> list[str]:
    """What must hold before any host is touched (deploy.all asks every tier
    first): all the nodes or none selected, the fence agent's credentials in the
    secrets. Returns the selected nodes."""
    inv = run.inv
    if inv.mail is None:
        return []
    members = topology.cluster_nodes(inv)
    if len(members) < 2:
        raise UserError(f"{inv.path}: a cluster needs at least two hosts with role {ROLE}")
    hosts = [h for h in members if h in run.hosts()]
    if hosts and hosts != members:
        raise UserError("cluster: the cluster tier works on all its nodes at once; do not narrow it with --hosts "
                        f"(nodes: {', '.join(members)})")
    if hosts:
        desired_tree(inv, run.secrets.require)  # missing fence credentials: named, nothing touched
    return hosts


def converge(run: Run) -> None:
    inv = run.inv
    if inv.mail is None:
        run.report.note("cluster: the inventory has no mail cluster, skipped")
        return
    hosts = preflight(run)
    if not hosts:
        run.report.note("cluster: no cluster node selected (--hosts), skipped")
        return
    members = hosts
    tree = desired_tree(inv, run.secrets.require)
    run.secrets.get(SECRET_HACLUSTER, lambda: token(32))
    first = members[0]
    run.step("cluster: packages, hacluster, pcsd, fence agent", hosts, node_setup)
    state: dict[str, dict] = {}
    run.step("cluster: corosync configuration", hosts, lambda h: _probe_node(h, state))
    run.step("cluster: formation", [first], lambda h: _form(h, state))
    cib: dict[str, Actual] = {}
    run.step("cluster: properties", [first], lambda h: _properties(h, cib))
    run.step("cluster: units Pacemaker owns", hosts, lambda h: _owned_units(h, tree, cib[first]))
    run.step("cluster: resources, constraints, STONITH", [first], lambda h: _resources(h, tree, cib[first]))


def node_setup(h: HostSession) -> None:
    inv = h.inv
    h.packages(PACKAGES)
    mail_domain = inv.mail.domain if inv.mail else inv.site.domain
    h.packages(MAIL_PACKAGES, preseed=["postfix postfix/main_mailer_type select Internet Site",
                                       f"postfix postfix/mailname string {mail_domain}"])
    password = h.run.secret(SECRET_HACLUSTER)
    check = ("python3 -W ignore -c 'import crypt,subprocess,sys; "
             "s=subprocess.run([\"getent\",\"shadow\",\"hacluster\"],capture_output=True,text=True).stdout.split(\":\"); "
             "p=sys.stdin.read(); sys.exit(0 if len(s)>1 and len(s[1])>3 and crypt.crypt(p,s[1])==s[1] else 1)'")
    if h.probe(check, stdin=password).ok:
        h.ok("hacluster has the generated password")
    else:
        h.sh("chpasswd", stdin=f"hacluster:{password}\n", message="hacluster: set the generated password")
    h.service("pcsd")
    agent = inv.mail.fence_agent
    if agent == "fence_lab":
        h.put(templates.static("cluster/usr/sbin/fence_lab"), FENCE_LAB, mode="0755")
        h.directory("/etc/hastack", mode="0755")
        h.template("cluster/etc/hastack/fence_lab.conf.j2", FENCE_LAB_CONF, h.tier_vars(template_vars), mode="0600")
    elif agent != "none":
        h.packages(["fence-agents"])


def is_standalone_default(conf: str, ours: list[str]) -> bool:
    """Debian's default corosync.conf (cluster `debian`, one node on 127.0.0.1),
    or any config naming none of our nodes: nothing of this cluster to lose."""
    names = set(re.findall(r"^\s*(?:name|ring\d+_addr)\s*:\s*(\S+)", conf, re.M))
    return not names & set(ours)


def _probe_node(h: HostSession, state: dict) -> None:
    name = cluster_name(h.inv)
    conf = h.probe("cat /etc/corosync/corosync.conf")
    ours = conf.ok and f"cluster_name: {name}" in conf.stdout
    members = topology.cluster_nodes(h.inv)
    if conf.ok and not ours and not is_standalone_default(
            conf.stdout, [*members, *(topology.ring_address(h.inv, n) for n in members)]):
        raise HostFailed("corosync.conf here names this cluster's nodes under another cluster name; "
                         "refusing to touch it (remove it with `pcs cluster destroy` if it is stale)")
    if conf.ok and not ours:
        # Debian's default corosync.conf: pcs refuses to set up (or save auth tokens) over it.
        h.sh("pcs cluster destroy",
             message="remove Debian's default corosync.conf (pcs cluster destroy)")
    state[h.name] = {
        "formed": ours,
        "running": all(h.active(u) for u in ("corosync", "pacemaker")),
        "enabled": all(h.enabled(u) for u in ("corosync", "pacemaker")),
    }
    h.ok(f"corosync: {'cluster ' + name if ours else 'not formed'}, "
         f"{'running' if state[h.name]['running'] else 'stopped'}, "
         f"{'enabled' if state[h.name]['enabled'] else 'not enabled'}")


def _form(h: HostSession, state: dict) -> None:
    inv = h.inv
    members = topology.cluster_nodes(inv)
    formed = [n for n in members if state[n]["formed"]]
    if formed and len(formed) != len(members):
        raise HostFailed(f"the cluster exists on {', '.join(formed)} but not on "
                         f"{', '.join(n for n in members if n not in formed)}; add those with `pcs cluster node add`")
    password = h.run.secret(SECRET_HACLUSTER)
    if not formed:
        auth = h.probe(join("pcs", "status", "pcsd", *members))
        if auth.ok and auth.stdout.count("Online") == len(members):
            h.ok("pcs: every node authenticated")
        else:
            h.sh(join("pcs", "host", "auth", *_node_addrs(inv, members), "-u", "hacluster") + " -p \"$(cat)\"",
                 stdin=password, message="pcs host auth (all nodes)")
        h.sh(join("pcs", "cluster", "setup", cluster_name(inv), *_node_addrs(inv, members))
             + " --start --enable --wait=180",
             message=f"pcs cluster setup {cluster_name(inv)} (start, enable)", timeout=600)
        return
    h.ok(f"cluster {cluster_name(inv)} formed on every node")
    stopped = [n for n in members if not state[n]["running"]]
    if stopped:
        h.sh(join("pcs", "cluster", "start", "--wait=180", *stopped) + f" {PCSD_TIMEOUT}",
             message=f"start the cluster on {', '.join(stopped)}", timeout=600)
    disabled = [n for n in members if not state[n]["enabled"]]
    if disabled:
        h.sh(join("pcs", "cluster", "enable", *disabled), message=f"enable the cluster on {', '.join(disabled)}")


def _node_addrs(inv: Inventory, members: list[str]) -> list[str]:
    """pcs's `NODE addr=ADDRESS` words (each quoted by the caller's join)."""
    return [w for n in members for w in (n, f"addr={topology.ring_address(inv, n)}")]


def _read_cib(h: HostSession) -> Actual:
    """The CIB's configuration, waited for (up to CIB_TIMEOUT) while a new cluster
    starts; in check mode one try, an empty CIB when there is none yet."""
    def read():
        return h.probe("cibadmin --query --scope configuration")

    if h.run.check:
        r = read()
        return parse_cib(r.stdout) if r.ok else Actual()
    r = poll(read, lambda r: r.ok, timeout=CIB_TIMEOUT, interval=2, what="the CIB (cibadmin --query)",
             describe=lambda r: (r.stderr or r.stdout).strip() or f"exit {r.exited}", error=HostFailed)
    return parse_cib(r.stdout)


def _properties(h: HostSession, cib: dict) -> None:
    actual = _read_cib(h)
    cib[h.name] = actual
    todo = [(c, m) for c, m in plan_changes(Tree(), actual, desired_properties(h.inv), 0)]
    for cmd, msg in todo:
        h.sh(cmd, message=msg)
    if not todo:
        h.ok("cluster properties and resource defaults as wanted")


def _owned_units(h: HostSession, tree: Tree, actual: Actual) -> None:
    for p in tree.primitives:
        if not p.unit:
            continue
        unit = q(p.unit)
        if p.id not in actual.primitives:
            # Not yet a resource: stop it everywhere so Pacemaker finds it inactive.
            if h.enabled(p.unit) or h.active(p.unit):
                h.sh(f"systemctl disable --now {unit}", message=f"{p.unit}: stopped and disabled (Pacemaker's now)")
            else:
                h.ok(f"{p.unit}: stopped and disabled")
        elif h.enabled(p.unit):
            h.sh(f"systemctl disable {unit}", message=f"{p.unit}: disabled in systemd (Pacemaker owns it)")
        else:
            h.ok(f"{p.unit}: disabled in systemd, Pacemaker owns it")
    if h.enabled("postfix"):  # the wrapper would start postfix@- at boot
        h.sh("systemctl disable postfix", message="postfix.service: disabled (Pacemaker owns postfix@-)")


def _resources(h: HostSession, tree: Tree, actual: Actual) -> None:
    """The missing pieces, in one CIB transaction: made in a copy of the CIB
    (`pcs -f`) and pushed as one diff, so that Pacemaker never runs a resource
    before its constraints exist (a DRBD file system started where DRBD is not
    promoted fails, and its failure keeps it stopped)."""
    todo = plan_changes(tree, actual, {}, len(topology.cluster_nodes(h.inv)))
    if todo:
        f, orig = q(CIB_FILE), q(CIB_FILE + ".orig")
        h.sh(f"pcs cluster cib {f} && cp {f} {orig}", message="a copy of the CIB to change in one transaction")
        for cmd, msg in todo:
            assert cmd.startswith("pcs "), cmd
            h.sh(f"pcs -f {f} {cmd[4:]}", message=msg)
        h.sh(f"pcs cluster cib-push {f} diff-against={orig} && rm -f {f} {orig}",
             message="the changes pushed to the CIB as one")
    if todo:  # the step ends with the tree running, not merely configured
        h.sh("crm_resource --wait --timeout=180", message="every resource settled where the cluster placed it",
             timeout=240)
    else:
        h.ok(f"{len(tree.primitives)} resources, {len(tree.stonith)} STONITH device(s), constraints as wanted")


# --- tasks -------------------------------------------------------------------


@runbook(default=True)
def deploy(run):
    """Converge Pacemaker/Corosync, STONITH and the mail resource tree on the mail back ends."""
    converge(run)


def online_node(run: Run) -> HostSession:
    """The first cluster node (inventory order) whose Pacemaker answers."""
    return run.answering(topology.cluster_nodes(run.inv), what="cluster node (crm_mon -1)",
                         probe="crm_mon -1 >/dev/null")


@runbook(readonly=True)
def status(run):
    """Show the cluster: nodes, resources and where they run (crm_mon -1)."""
    node = online_node(run).name

    def one(h: HostSession) -> None:
        out = h.read("crm_mon -1 --include=nodes,resources,failures")
        run.report.console.print(out, markup=False, emoji=False, highlight=False)
        h.ok("crm_mon -1")

    run.step("cluster: status", [node], one)


def online_nodes(crm_mon_xml: str) -> list[str]:
    root = ET.fromstring(crm_mon_xml)
    return [n.get("name") for n in root.iter("node")
            if n.get("online") == "true" and n.get("standby") != "true" and n.get("type", "member") == "member"]


STANDBY_WAIT = 120  # seconds pcs waits for the resources to settle after (un)standby, by default


def wait_seconds(wait) -> int:
    """--wait of standby/unstandby: whole seconds, 1 to 3600 (None: STANDBY_WAIT)."""
    if wait is None:
        return STANDBY_WAIT
    if not re.fullmatch(r"[0-9]{1,4}", str(wait)) or not 1 <= int(str(wait)) <= 3600:
        raise UserError(f"--wait must be a whole number of seconds from 1 to 3600, not {str(wait)!r}; nothing was changed")
    return int(str(wait))


def _standby(run: Run, node: str, on: bool, wait=None) -> None:
    wait = wait_seconds(wait)
    members = topology.cluster_nodes(run.inv)
    if node not in members:
        raise UserError(f"{node!r} is not a cluster node (role {ROLE}: {', '.join(members)}); nothing was changed")
    via = online_node(run).name

    def one(h: HostSession) -> None:
        online = online_nodes(h.read("crm_mon -1 --output-as=xml"))
        if on:
            if node not in online:
                h.ok(f"{node} is already in standby or offline")
                return
            if online == [node]:
                raise HostFailed(f"{node} is the last online node; refusing to put it in standby")
            h.sh(f"pcs node standby {q(node)} --wait={wait}", message=f"{node}: standby (its resources move)",
                 timeout=wait + 60)
        else:
            standby = h.probe(f"crm_attribute --node {q(node)} --name standby --query --quiet").stdout.strip()
            if standby not in ("on", "true", "1", "yes"):
                h.ok(f"{node} is not in standby")
                return
            h.sh(f"pcs node unstandby {q(node)} --wait={wait}", message=f"{node}: back from standby",
                 timeout=wait + 60)

    run.step(f"cluster: {'standby' if on else 'unstandby'} {node}", [via], one)


WAIT_HELP = f"seconds to wait for the resources to settle (default {STANDBY_WAIT})"


@runbook(help={"node": "the cluster node to put in standby (its resources move away)", "wait": WAIT_HELP})
def standby(run, node, wait=None):
    """Put a node in standby: its resources move to the other nodes (refused for the last online node)."""
    _standby(run, node, True, wait)


@runbook(help={"node": "the cluster node to take out of standby", "wait": WAIT_HELP})
def unstandby(run, node, wait=None):
    """Take a node out of standby (resources stay where they run: stickiness)."""
    _standby(run, node, False, wait)


ns = Collection("cluster", deploy, status, standby, unstandby)
