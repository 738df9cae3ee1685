"""Rescue procedures of the XMPP service: what an operator runs when a server of
it is gone. Like `deploy`, this module stands on several tiers (postgres,
ejabberd); the tasks appear where an operator looks for them
(`inv postgres.promote`, `inv postgres.rejoin`).

postgres.promote [--node H] [--yes] [--force]
1. Read every PostgreSQL host: reachable? running? primary or standby? its
   timeline and replayed WAL position. Refused when the primary still runs as a
   primary and answers (two primaries), unless --force; when no replica
   answers as a standby; when --node is not a replica or is behind another one.
2. The evidence table and the plan; a question (--yes skips it; without a
   terminal --yes is required).
3. The old primary, when it can be reached: stopped and fenced with
   standby.signal, so it can only come back read-only. When it cannot be
   reached, its start guard (pg-start-guard, an ExecStartPre) does the same at
   its next boot: a peer on a newer timeline means it was replaced.
4. `pg_promote()` on the chosen replica (synchronous mode: it starts with
   synchronous replication off, since no standby streams from it yet; the sync
   guard turns it on when one does).
5. The roles file beside the inventory (`<inventory>.roles.yml`) records the
   swap, so the next deploy keeps the new primary; the task prints the edit to
   make in the inventory itself.
6. The postgres tier again with the new roles on the hosts that answer (the new
   primary's settings and slots, the other replicas follow it), then the
   ejabberd tier: its config names the new primary (sql_server) and the nodes
   restart on it. Why not a VIP: the seed's internal /29 has no free address
   for one, and a re-rendered sql_server is what the ejabberd tier already
   converges.

rescue.replace DEAD --with SPARE [--yes]
The spare (only role spare, an address on every network of the dead host) takes
the role of a dead ejabberd node or PostgreSQL replica (a host that answers over
SSH is refused). The roles file retires DEAD and gives SPARE its role; then the
common tiers, the XMPP service, monitoring and backups converge with the new roles: the
spare gets its certificate names, the cookie and config and joins the Erlang
cluster (the first node removes the dead one: leave_cluster), or a base backup
over a new slot (the dead replica's slot is dropped); firewalls, the gateway's
FORWARD rules, pg_hba, keepalived's peers and Prometheus's targets follow.

ejabberd.remove-node HOST [--yes]
A node leaves the cluster cleanly (leave_cluster from a surviving node), its
ejabberd is stopped and disabled, its keepalived gives up the VIP; the roles
file records it without the role (a former spare is a spare again), and the
same tiers converge. Scale out is the inventory's: a host given role ejabberd or
postgres_replica joins on the next deploy.

postgres.rejoin HOST [--yes]
A former primary (or any replica) becomes a streaming standby of the current
primary: `pg_rewind` from it (wal_log_hints is on everywhere), or, when rewind
cannot, a fresh base backup with the old data directory kept beside it. Refused
for the current primary, or while the primary does not answer as a primary.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import TYPE_CHECKING

from . import ejabberd, keepalived, postgres
from .core import UserError, prompt, q, runbook, topology
from .core.sql import psql_c

if TYPE_CHECKING:
    from .core import HostSession, Run

STATE_SQL = ("SELECT pg_is_in_recovery(), "
             "coalesce(pg_last_wal_replay_lsn(), pg_current_wal_lsn())::text, "
             "(SELECT timeline_id FROM pg_control_checkpoint()), "
             "coalesce((SELECT status || ' ' || coalesce(sender_host, '') FROM pg_stat_wal_receiver), '')")


@dataclass
class PgState:
    """What one PostgreSQL host answered."""

    name: str
    reachable: bool = True
    running: bool = False
    in_recovery: bool = False
    lsn: str = ""  # replayed (standby) or current (primary) WAL position, X/Y
    timeline: int = 0
    receiver: str = ""  # the standby's WAL receiver: "streaming 10.0.0.1"
    error: str = ""

    @property
    def position(self) -> int:
        return lsn_int(self.lsn)

    def describe(self) -> str:
        if not self.reachable:
            return self.error if self.error.startswith("unreachable") else f"unreachable ({self.error})"
        if not self.running:
            return "PostgreSQL down" + (f" ({self.error})" if self.error else "")
        return "standby" if self.in_recovery else "PRIMARY"


def lsn_int(lsn: str) -> int:
    """A WAL position X/Y as one number (-1 when there is none)."""
    try:
        hi, lo = lsn.split("/")
        return (int(hi, 16) << 32) + int(lo, 16)
    except (ValueError, AttributeError):
        return -1


def read_state(h: HostSession) -> PgState:
    r = h.probe(psql_c(STATE_SQL))
    fields = r.stdout.strip().split("|") if r.ok else []
    if len(fields) != 4:
        why = ((r.stderr or r.stdout).strip().splitlines() or ["no answer"])[-1]
        return PgState(h.name, running=False, error=why)
    recovery, lsn, timeline, receiver = fields
    return PgState(h.name, running=True, in_recovery=recovery == "t", lsn=lsn,
                   timeline=int(timeline) if timeline.isdigit() else 0, receiver=receiver.strip())


def gather(run: Run, hosts: list[str]) -> dict[str, PgState]:
    down = run.unreachable(hosts)
    states = {name: PgState(name, reachable=False, error=why.split(": ", 1)[-1]) for name, why in down.items()}

    def one(h: HostSession) -> None:
        states[h.name] = st = read_state(h)
        h.ok(st.describe() + (f", timeline {st.timeline}, WAL {st.lsn}" if st.running else ""))

    run.step("postgres: read every node", [n for n in hosts if n not in down], one)
    return {n: states[n] for n in hosts}


def evidence_table(states: dict[str, PgState], inv, chosen: str | None = None):
    from rich.table import Table  # here, not at the top: `inv --list` stays fast without rich

    t = Table(title="PostgreSQL nodes" + (f" (-> {chosen}: chosen)" if chosen else ""))
    for col in ("node", "inventory", "state", "timeline", "WAL position", "WAL receiver"):
        t.add_column(col, no_wrap=True)
    for name, st in states.items():
        roles = [r for r in inv.hosts[name].roles if r in (topology.PG_PRIMARY, topology.PG_REPLICA)]
        t.add_row(("-> " if name == chosen else "") + name, ", ".join(roles), st.describe(),
                  str(st.timeline or "-"), st.lsn or "-", st.receiver or "-")
    return t


@dataclass
class Decision:
    chosen: str
    fence: bool  # the old primary answers: stop it and leave standby.signal
    reasons: list[str]


def decide(old: str, states: dict[str, PgState], *, node: str | None, force: bool) -> Decision:
    """Which replica to promote, or a UserError saying why not and what to check."""
    prim = states[old]
    reasons: list[str] = []
    if prim.running and not prim.in_recovery:
        if not force:
            raise UserError(f"the primary {old} still runs as a primary and answers: promoting a replica now would "
                            "make two primaries. Check why you think it is gone; to move the primary anyway, "
                            "--force stops and fences it first. Nothing was changed")
        reasons.append(f"--force: {old} answers as a primary; it is stopped and fenced (standby.signal) first")
    elif prim.reachable:
        reasons.append(f"{old} is reachable ({prim.describe()}): it is fenced (standby.signal) so it cannot "
                       "come back as a primary")
    else:
        reasons.append(f"{old} cannot be reached: its start guard keeps it read-only when it comes back "
                       "(a peer on a newer timeline)")
    standbys = [st for name, st in states.items() if name != old and st.running and st.in_recovery]
    primaries = [name for name, st in states.items() if name != old and st.running and not st.in_recovery]
    if primaries:
        raise UserError(f"{', '.join(primaries)} already run(s) as a primary although the inventory says replica: "
                        "check `inv postgres.status`; nothing was changed")
    if node is not None:
        st = states[node]
        if not (st.running and st.in_recovery):
            raise UserError(f"--node {node}: {st.describe()}, not a running standby; nothing was changed")
        ahead = [o.name for o in standbys if o.position > st.position]
        if ahead and not force:
            raise UserError(f"--node {node} is behind {', '.join(ahead)} (WAL {st.lsn}); promoting it would lose "
                            "what they have: leave --node out, or --force; nothing was changed")
        return Decision(node, prim.reachable, reasons)
    if not standbys:
        raise UserError("no replica answers as a running standby: nothing can be promoted (check "
                        "`inv postgres.status` and the replicas' journals); nothing was changed")
    best = max(standbys, key=lambda st: st.position)  # max keeps the first (inventory order) on a tie
    reasons.append(f"{best.name} has replayed the most WAL ({best.lsn})")
    return Decision(best.name, prim.reachable, reasons)


def swapped_roles(inv, old: str, new: str) -> dict[str, list[str]]:
    """The two hosts' roles after ``new`` took the primary's role from ``old``."""
    def swap(name: str, give: str, take: str) -> list[str]:
        roles = [r for r in inv.hosts[name].roles if r != give]
        return roles + [take] if take not in roles else roles
    return {old: swap(old, topology.PG_PRIMARY, topology.PG_REPLICA),
            new: swap(new, topology.PG_REPLICA, topology.PG_PRIMARY)}


def inventory_edit(inv, roles: dict[str, list[str]]) -> str:
    return "; ".join(f"hosts.{name}.roles: [{', '.join(r)}]" for name, r in roles.items())


def _fence(h: HostSession) -> None:
    """Stopped, and only ever starting again as a standby (read-only)."""
    h.sh(f"systemctl stop {postgres.UNIT} && runuser -u postgres -- touch {postgres.STANDBY_SIGNAL}",
         message=f"stop PostgreSQL, fence it: {postgres.STANDBY_SIGNAL} (it can only start read-only)")


def _promote(h: HostSession) -> None:
    if h.inv.postgres.synchronous:
        # No standby streams from it yet: commits would wait until the guard noticed.
        h.put("# written by postgres.promote: no standby streams from the new primary yet; the sync guard\n"
              "# removes this file once one does\nsynchronous_standby_names = ''\n", postgres.ASYNC_FILE,
              owner="postgres", group="postgres")
    h.sh(psql_c("SELECT pg_promote(true, 60)") + " | grep -qx t",
         message="pg_promote(): this host is the primary now", timeout=90)
    h.wait_for(psql_c("SELECT pg_is_in_recovery()") + " | grep -qx f", timeout=30,
               what="out of recovery")


HELP_YES = "do not ask for confirmation (needed when stdin is not a terminal)"


@runbook(tier="postgres", help={
    "node": "promote this replica (refused when another replica has more WAL, unless --force)",
    "yes": HELP_YES,
    "force": "also when the old primary still answers as a primary: it is stopped and fenced first",
})
def promote(run, node=None, yes=False, force=False):
    """The primary is gone: promote the most advanced replica; ejabberd follows it."""
    inv = run.inv
    old = topology.pg_primary(inv)
    replicas = topology.pg_replicas(inv)
    if node is not None:
        if node not in inv.hosts:
            raise UserError(f"--node {node}: not a host of {inv.path} (replicas: {', '.join(replicas) or 'none'}); "
                            "nothing was changed")
        if node not in replicas:
            raise UserError(f"--node {node}: has {', '.join(inv.hosts[node].roles) or 'no roles'}, not role "
                            f"{topology.PG_REPLICA} (replicas: {', '.join(replicas) or 'none'}); nothing was changed")
    if not replicas:
        raise UserError(f"{inv.path}: no host has role {topology.PG_REPLICA}: nothing to promote")
    started = time.monotonic()
    states = gather(run, [old, *replicas])
    try:
        decision = decide(old, states, node=node, force=force)
    except UserError:
        run.report.table(evidence_table(states, inv))
        raise
    run.report.table(evidence_table(states, inv, decision.chosen))
    for reason in decision.reasons:
        run.report.note(reason)
    roles = swapped_roles(inv, old, decision.chosen)
    plan = ((f"fence {old}, then " if decision.fence else "")
            + f"promote {decision.chosen}, record the new roles in {inv.roles_file.name}, "
            "point the other replicas and ejabberd at it")
    run.report.note("plan: " + plan)
    if run.check:
        return
    prompt.confirm(plan, yes=yes)
    if decision.fence:
        run.step(f"postgres: fence the old primary {old}", [old], _fence)
    run.step(f"postgres: promote {decision.chosen}", [decision.chosen], _promote)
    promoted = time.monotonic()
    from .core.inventory import load, save_roles  # here: `inv --list` does not load pydantic

    save_roles(inv, roles)
    run.adopt(load(inv.path))
    run.report.note(f"{decision.chosen} is the primary ({promoted - started:.1f} s after the task started); "
                    f"roles recorded in {inv.roles_file}. Make the same change in {inv.path}: "
                    f"{inventory_edit(inv, roles)}, then delete {inv.roles_file.name}")
    followers = [n for n in topology.pg_hosts(run.inv) if n not in (old, decision.chosen) and states[n].running]
    run.step("postgres: settings with the new roles", [decision.chosen, *followers], postgres._configure)
    run.step("postgres: roles, database and replication slots on the new primary", [decision.chosen],
             postgres._primary)
    if followers:
        run.step("postgres: the other replicas stream from the new primary", followers, postgres.wait_streaming)
    ejabberd.converge(run)
    run.report.note(f"ejabberd uses {decision.chosen}; {time.monotonic() - started:.1f} s in all. "
                    f"When {old} is back (it starts read-only): inv postgres.rejoin {old}")


# --- rejoin ----------------------------------------------------------------------------------


def _rejoin(h: HostSession, prim: str, fresh: bool) -> None:
    """``h`` stopped, rewound onto ``prim`` (or rebuilt from a base backup), a standby of it."""
    source = h.inv.service_address(prim)
    h.sh(f"systemctl stop {postgres.UNIT}", message=f"stop {postgres.UNIT}")
    _, hba_changed, guard_changed = postgres._files(h)
    rewind = (f"runuser -u postgres -- env PGPASSFILE={postgres.PGPASS} {postgres.BIN}/pg_rewind "
              f"--target-pgdata={postgres.DATA} --config-file={postgres.ETC}/postgresql.conf "
              f"--source-server={q(f'host={source} port={topology.PG_PORT} user={postgres.REWIND_USER} dbname=postgres')}")
    rewound = False
    if not fresh:
        r = h.probe(rewind, timeout=1800)
        rewound = r.ok
        tail = ((r.stderr or r.stdout).strip().splitlines() or [""])[-1]
        if rewound:
            h.changed(f"pg_rewind from {prim}: {tail}")
        else:
            h.changed(f"pg_rewind could not rewind ({tail}): a fresh base backup instead")
    if not rewound:
        aside = f"{postgres.DATA}.before-rejoin-{time.strftime('%Y%m%d%H%M%S')}"
        h.sh(f"mv {postgres.DATA} {aside} && install -d -o postgres -g postgres -m 0700 {postgres.DATA}",
             message=f"the old data directory kept as {aside}")
        h.sh(postgres.basebackup(source, topology.slot_name(h.name)),
             message=f"base backup from {prim} ({source})", timeout=1800)
    h.sh(f"rm -f {postgres.ASYNC_FILE} && runuser -u postgres -- touch {postgres.STANDBY_SIGNAL} "
         f"&& systemctl start {postgres.UNIT}", message="standby.signal; started as a standby")
    postgres._apply(h, False, hba_changed)
    if h.inv.postgres.synchronous:
        h.service(postgres.SYNC_GUARD_UNIT, restart=guard_changed)
    postgres.wait_streaming(h)


@runbook(tier="postgres", positional=["host"], help={
    "host": "the former primary (or a broken replica) to turn into a standby of the current primary",
    "yes": HELP_YES,
    "fresh": "skip pg_rewind: a new base backup (the old data directory is kept beside it)",
})
def rejoin(run, host, yes=False, fresh=False):
    """A former primary becomes a streaming replica of the current primary (pg_rewind)."""
    inv = run.inv
    prim = topology.pg_primary(inv)
    pg = topology.pg_hosts(inv)
    if host not in inv.hosts:
        raise UserError(f"{host!r} is not a host of {inv.path} (PostgreSQL hosts: {', '.join(pg)}); "
                        "nothing was changed")
    if host == prim:
        raise UserError(f"{host} is the current primary (role {topology.PG_PRIMARY}"
                        + (f" recorded in {inv.roles_file}" if host in inv.overridden else "")
                        + "): nothing to rejoin, and its data is never rewound; nothing was changed")
    if host not in pg:
        raise UserError(f"{host} has {', '.join(inv.hosts[host].roles) or 'no roles'}, not a PostgreSQL role: "
                        "give it role postgres_replica first; nothing was changed")
    states = gather(run, [prim, host])
    run.report.table(evidence_table(states, inv))
    p, st = states[prim], states[host]
    if not (p.running and not p.in_recovery):
        raise UserError(f"the primary {prim} does not answer as a primary ({p.describe()}): nothing to rejoin "
                        "to (`inv postgres.promote` first?); nothing was changed")
    if not st.reachable:
        raise UserError(f"{host} cannot be reached ({st.error}); nothing was changed")
    address = inv.service_address(prim)
    if st.running and st.in_recovery and st.receiver == f"streaming {address}" and st.timeline == p.timeline \
            and not fresh:
        run.step(f"postgres: {host} streams from {prim}", [host],
                 lambda h: h.ok(f"already a standby streaming from {prim} on timeline {p.timeline}; nothing to do"))
        return
    if st.running and not st.in_recovery:
        run.report.note(f"{host} runs as a PRIMARY (timeline {st.timeline}): what was written there since it "
                        f"was replaced is discarded by the rewind")
    plan = (f"stop {host}, " + ("a fresh base backup" if fresh else "pg_rewind (a base backup if it cannot)")
            + f" from {prim}, start it as a standby of {prim}")
    run.report.note("plan: " + plan)
    if run.check:
        return
    prompt.confirm(plan, yes=yes)
    run.step(f"postgres: replication slot for {host} on {prim}", [prim], postgres._primary)
    run.step(f"postgres: {host} rejoins as a standby of {prim}", [host], lambda h: _rejoin(h, prim, fresh))


# --- replace a dead node by the spare; take a node out ------------------------------------------

REPLACEABLE = (topology.EJABBERD, topology.PG_REPLICA)


def _reconverge(run: Run) -> None:
    """Every tier the moved roles touch, with the new roles: the common tiers (peers in
    the firewalls and the gateway's FORWARD rules, /etc/hosts, the spare's
    certificate), the XMPP service (pg_hba, slots, the Erlang cluster, the VIP's
    peers, the WAL archive's hosts), monitoring (its targets) and Bacula (the jobs
    of a retired host): what a deploy would change, so that the next one changes
    nothing."""
    from . import deploy  # the tiers in their order; like deploy, this module stands on them all

    deploy._converge(run, deploy.COMMON + deploy.XMPP + deploy.MONITORING + deploy.BACKUP)


def check_replace(inv, dead: str, spare: str) -> str:
    """The role ``spare`` takes over from ``dead``, or a UserError saying what to check."""
    if dead not in inv.hosts:
        where = f" (retired in {inv.roles_file})" if dead in inv.retired else ""
        raise UserError(f"{dead!r} is not a host of {inv.path}{where}; nothing was changed")
    if spare not in inv.hosts:
        raise UserError(f"--with {spare!r}: not a host of {inv.path} (spares: "
                        f"{', '.join(inv.with_role(topology.SPARE)) or 'none'}); nothing was changed")
    roles = inv.hosts[dead].roles
    if topology.PG_PRIMARY in roles:
        raise UserError(f"{dead} is the PostgreSQL primary: `inv postgres.promote` first, then replace it as a "
                        "replica; nothing was changed")
    moved = [r for r in roles if r in REPLACEABLE]
    if not moved or len(roles) != len(moved):
        raise UserError(f"{dead} has {', '.join(roles) or 'no roles'}: rescue.replace moves the role of an "
                        f"ejabberd node or a PostgreSQL replica only; nothing was changed")
    if inv.hosts[spare].roles != [topology.SPARE]:
        raise UserError(f"--with {spare}: has {', '.join(inv.hosts[spare].roles) or 'no roles'}, not only role "
                        f"{topology.SPARE}: it is in use; nothing was changed")
    missing = [net for net in inv.non_management(dead) if net not in inv.hosts[spare].addresses]
    if missing:
        raise UserError(f"--with {spare}: has no address on network(s) {', '.join(missing)}, which {dead}'s "
                        f"role needs: give it one in {inv.path}; nothing was changed")
    return moved[0]


@runbook(positional=["dead"], help={
    "dead": "the dead ejabberd node or PostgreSQL replica (it must not answer over SSH)",
    "with_": "the spare (a host with only role spare) that takes its role",
    "yes": HELP_YES,
})
def replace(run, dead, with_, yes=False):
    """The spare takes the role of a dead ejabberd node or PostgreSQL replica."""
    inv = run.inv
    spare = with_
    role = check_replace(inv, dead, spare)
    down = run.unreachable([dead, spare])
    if dead not in down:
        raise UserError(f"{dead} answers over SSH: it is not dead. To take a live node out: "
                        + ("`inv ejabberd.remove-node`" if role == topology.EJABBERD
                           else f"give it another role in {inv.path}")
                        + "; nothing was changed")
    if spare in down:
        raise UserError(f"the spare {spare} cannot be reached ({down[spare]}); nothing was changed")
    started = time.monotonic()
    plan = (f"retire {dead} and give {spare} role {role} in {inv.roles_file.name}, then converge the common "
            f"tiers, the XMPP service, monitoring and backups with them ({spare} "
            + ("joins the ejabberd cluster, " if role == topology.EJABBERD else "gets a base backup over a new slot, ")
            + f"{dead} leaves " + ("the Erlang cluster" if role == topology.EJABBERD else "the primary: its slot is dropped")
            + ", every peer list and firewall follows)")
    run.report.note(f"{dead}: unreachable ({down[dead]})")
    run.report.note("plan: " + plan)
    if run.check:
        return
    prompt.confirm(plan, yes=yes)
    from .core.inventory import load, save_roles  # here: `inv --list` does not load pydantic

    save_roles(inv, {spare: [role]}, retire=[dead])
    run.adopt(load(inv.path))
    _reconverge(run)
    run.report.note(f"{spare} has role {role} ({time.monotonic() - started:.1f} s). Make the same change in "
                    f"{inv.path}: hosts.{spare}.roles: [{role}], and remove hosts.{dead} (or give it role spare once "
                    f"it is rebuilt); then delete {inv.roles_file.name}. If {dead} comes back as it was, stop its "
                    "services before it rejoins the network")


@runbook(tier="ejabberd", positional=["host"], help={
    "host": "the ejabberd node to take out of the cluster (it may be down)",
    "yes": HELP_YES,
})
def remove_node(run, host, yes=False):
    """Take an ejabberd node out of the cluster cleanly; its VIP, firewalls and monitoring follow."""
    inv = run.inv
    nodes = topology.ejabberd_nodes(inv)
    if host not in inv.hosts:
        raise UserError(f"{host!r} is not a host of {inv.path} (ejabberd nodes: {', '.join(nodes)}); "
                        "nothing was changed")
    if host not in nodes:
        raise UserError(f"{host} has {', '.join(inv.hosts[host].roles) or 'no roles'}, not role "
                        f"{topology.EJABBERD} (ejabberd nodes: {', '.join(nodes)}); nothing was changed")
    others = [n for n in nodes if n != host]
    if not others:
        raise UserError(f"{host} is the last ejabberd node: removing it would end the service; nothing was changed")
    down = run.unreachable([host, *others])
    survivor = next((n for n in others if n not in down), None)
    if survivor is None:
        raise UserError(f"no other ejabberd node answers ({'; '.join(down.values())}): nothing to take {host} "
                        "out of; nothing was changed")
    roles = [r for r in inv.hosts[host].roles if r != topology.EJABBERD] or \
        ([topology.SPARE] if topology.SPARE in (inv.overridden.get(host) or []) else [])
    plan = (f"leave_cluster {ejabberd.node_name(host)} on {survivor}; "
            + (f"stop ejabberd on {host} and its VIP; " if host not in down else f"({host} is down) ")
            + f"record {host}'s roles ({', '.join(roles) or 'none'}) in {inv.roles_file.name}; converge the "
            "common tiers, the XMPP service, monitoring and backups")
    run.report.note("plan: " + plan)
    if run.check:
        return
    prompt.confirm(plan, yes=yes)

    def leave(h: HostSession) -> None:
        members = ejabberd.cluster_members(h.read(f"{ejabberd.CTL} list_cluster"))
        if ejabberd.node_name(host) in members:
            h.sh(f"{ejabberd.CTL} leave_cluster {q(ejabberd.node_name(host))}",
                 message=f"leave_cluster {ejabberd.node_name(host)}", timeout=120)
        else:
            h.ok(f"{ejabberd.node_name(host)} is not in the cluster ({', '.join(members)})")

    run.step(f"ejabberd: {host} leaves the cluster", [survivor], leave)
    if host not in down:
        run.step(f"ejabberd: stopped on {host}", [host],
                 lambda h: h.service("ejabberd", enabled=False, running=False))
    from .core.inventory import load, save_roles  # here: `inv --list` does not load pydantic

    save_roles(inv, {host: roles})
    run.adopt(load(inv.path))
    if host not in down:  # its keepalived keeps no xmpp VIP instance (the keepalived tier skips a host without the role)
        run.step(f"keepalived: {host} carries no ejabberd VIP any more", [host], keepalived._keepalived)
    _reconverge(run)
    run.report.note(f"{host} is out of the cluster; make the same change in {inv.path} "
                    f"(hosts.{host}.roles: [{', '.join(roles)}]) and delete {inv.roles_file.name}")
