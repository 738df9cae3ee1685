"""Galera tier (the mail cluster's database): Percona XtraDB Cluster 8.0 or
Debian's MariaDB + galera-4, chosen by `mail.galera_flavour` in the inventory
(`flavours.py`). What a node says and the decisions over it are in `facts.py`;
this module acts on them.

Runbook of `inv pxc.deploy` (`converge`):
1. Packages (percona: Percona's repository first, installed so that no
   service starts), the Galera config (cluster name and addresses from the
   inventory, SST with a generated SST user, row-based binlog, durable
   commits), a systemd drop-in, and the Galera-aware health check the DB proxy
   asks on port 9200.
2. Read every node's state (live wsrep status, grastate.dat). Decide, as a
   pure function (`formation`), what the cluster needs:
   - no node has Galera history: bootstrap the first node;
   - a Primary component exists: nothing to bootstrap, stopped nodes join;
   - nodes have history but nobody is Primary: stop and tell the operator to
     run `inv pxc.bootstrap` (a deploy never re-bootstraps a cluster).
3. Databases and users the mail tier needs, on one node of the Primary
   component (Galera replicates them; the SST user must exist on the donor
   before anyone joins): the accounts of `core.topology.db_accounts`, with
   generated passwords (stored as mysql_native_password hashes) and grants
   limited to the hosts that connect (the DB proxy hosts, webmail).
4. Start the joiners one by one, waiting for each to be Synced; a node whose
   config changed is restarted the same way (rolling, never two at once).
5. Wait for wsrep_cluster_size = N and Synced on every node (percona: the
   bootstrap node then leaves bootstrap mode).

`inv pxc.bootstrap` brings a cluster back after every node went down (or after
two of three died and the survivor lost quorum); `facts.decide()` is its
decision, `inv pxc.status` shows the evidence.

pxc_strict_mode: Percona runs with pxc_strict_mode=ENFORCING (never switched
off); the MariaDB flavour enforces the same rules with
wsrep_mode=REQUIRED_PRIMARY_KEY,STRICT_REPLICATION, so a schema that works in
the lab works on Percona: every table needs a primary key and InnoDB. The mail
tier creates Postfixadmin's and Roundcube's tables with primary keys (see
`tables_without_primary_key_sql`, run by `inv pxc.status`, which lists offenders).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from invoke import Collection

from ..core import HostFailed, UserError, runbook
from ..core.prompt import confirm
from ..core.sql import mysql, mysql_e
from ..core.topology import (DATABASES, GALERA_CHECK_PORT, PKI_DIR, account_secret, db_accounts,
                             galera_address, galera_nodes)
from ..core.wait import poll
from .facts import (NULL_UUID, PRECREATED_TABLES, Decision, Formation, Node, bootstrap_commands, decide,
                    describe, formation, parse_grastate, parse_recovered, parse_status, read_node, recover_cmd,
                    sql_changes, state_sql, table_grants_waiting, tables_without_primary_key_sql)
from .flavours import FLAVOURS, Flavour, flavour, install_packages

if TYPE_CHECKING:
    from rich.table import Table

    from ..core import HostSession, Run
    from ..core.inventory import Inventory

__all__ = [
    "FLAVOURS", "NULL_UUID", "PRECREATED_TABLES", "Decision", "Flavour", "Formation", "Node",
    "bootstrap", "bootstrap_commands", "converge", "decide", "deploy", "describe", "flavour", "formation",
    "ns", "parse_grastate", "parse_recovered", "parse_status", "read_node", "recover_cmd", "sql_changes",
    "state_sql", "status", "template_vars",
]

CHECK_CNF = "/etc/mysql/galera-check.cnf"
SYNC_TIMEOUT = 600  # seconds a joiner may take (SST of a big data set)
DOWN_GRACE = 15  # seconds mysqld may take to appear after a start before a wait gives up


def template_vars(inv: Inventory, host: str, secret) -> dict:
    flav = flavour(inv)
    galera = galera_nodes(inv)
    me = host if host in galera else (galera[0] if galera else host)
    return {
        "flavour": flav,
        "cluster_name": f"{inv.site.name}-mail",
        "cluster_nodes": [(n, galera_address(inv, n)) for n in galera],
        "node_name": me,
        "node_address": galera_address(inv, me),
        "sst_password": secret(account_secret(inv, "sst")) if flav.sst_user else "",
        "monitor_password": secret(account_secret(inv, "monitor")),
        "check_port": GALERA_CHECK_PORT,
        "check_cnf": CHECK_CNF,
        "cert_dir": PKI_DIR,
    }


# --- deploy -----------------------------------------------------------------------------


def converge(run: Run) -> None:
    if run.inv.mail is None or not galera_nodes(run.inv):
        run.report.note("pxc: the inventory has no Galera cluster, skipped")
        return
    galera = _guard_inventory(run)
    if not run.hosts("galera"):
        run.report.note("pxc: no Galera host selected, skipped")
        return
    flav = flavour(run.inv)
    changed: dict[str, bool] = {}

    def install(h: HostSession) -> None:
        changed[h.name] = _install(h, flav) or _config_newer_than_server(h, flav)

    run.step("pxc: packages, config and health check", galera, install)
    states: dict[str, Node] = {}

    def read(h: HostSession) -> None:
        states[h.name] = read_node(h)
        h.ok(f"state: {describe(states[h.name])}")

    run.step("pxc: cluster state", galera, read)
    form = formation([states[n] for n in galera])
    if run.check:
        if form.bootstrap:
            run.report.note(f"pxc: would bootstrap a new cluster on {form.bootstrap}, then join "
                            f"{', '.join(form.joiners)} one by one, then create the databases and users")
            return
        if form.joiners:
            run.report.note(f"pxc: would start {', '.join(form.joiners)} to join the Primary component")
        stale = [n for n in galera if changed.get(n) and n not in form.joiners]
        if stale:
            run.report.note(f"pxc: would restart {', '.join(stale)} one at a time (config changed)")
        run.step("pxc: databases and users", [form.primary], _accounts)
        return
    if form.bootstrap:
        run.step("pxc: stop the packages' standalone servers",
                 [n for n in galera if states[n].running], lambda h: h.sh(flav.stop_cmd))
        run.step(f"pxc: bootstrap a new cluster on {form.bootstrap}", [form.bootstrap],
                 lambda h: (h.sh(flav.bootstrap_cmd, message=f"{flav.bootstrap_cmd} (new cluster)"),
                            wait_node(h, lambda n: n.synced, "Primary and Synced")))
    # Accounts first: the SST user must exist on the donor before anyone joins.
    run.step("pxc: databases and users", [form.primary], _accounts)
    for name in form.joiners:
        st = states[name]

        def join(h: HostSession, st=st) -> None:
            if st.running:  # the package's standalone server, or a non-Primary leftover
                h.sh(flav.stop_cmd, message=f"stop {flav.service} ({describe(st)})")
            h.sh(flav.start_cmd, message=f"start {flav.service}: join the cluster", timeout=SYNC_TIMEOUT)
            wait_node(h, lambda n: n.synced, "Synced")
        run.step(f"pxc: {name} joins", [name], join)
    # Members whose config changed restart one at a time, each only while the
    # others hold the Primary component (never the last member standing).
    for name in [n for n in galera if changed.get(n) and n not in form.joiners and n != form.bootstrap]:
        def restart(h: HostSession) -> None:
            now = read_node(h)
            if now.size < 2:
                raise HostFailed(f"config changed, but it is the only member ({describe(now)}); "
                                 "a restart would take the cluster down: start the other nodes first")
            h.sh(f"systemctl restart {flav.service}", message=f"restart {flav.service} (config changed)",
                 timeout=SYNC_TIMEOUT)
            wait_node(h, lambda n: n.synced and n.size == now.size, f"Synced, size {now.size}")
        run.step(f"pxc: {name} restarts (rolling, config changed)", [name], restart)
    run.step("pxc: cluster formed", galera, lambda h: _check_formed(h, len(galera)))
    if flav.after_bootstrap:
        for name in galera:
            run.step(f"pxc: {name} leaves bootstrap mode", [name], lambda h: _leave_bootstrap(h, flav))


def preflight(run: Run) -> None:
    """Checked before any host is touched (deploy.all asks every tier first)."""
    if run.inv.mail is not None and galera_nodes(run.inv):
        _guard_inventory(run)


def _guard_inventory(run: Run) -> list[str]:
    if run.inv.mail is None:
        raise UserError(f"{run.inv.path}: no 'mail' section: the inventory has no Galera cluster")
    galera = galera_nodes(run.inv)
    if len(galera) < 3 or len(galera) % 2 == 0:
        raise UserError(f"{run.inv.path}: role galera needs an odd number of hosts, at least 3 "
                        f"(found {len(galera)}: {', '.join(galera)})")
    selected = run.hosts("galera")
    if run.only is not None and selected and set(selected) != set(galera):
        raise UserError("the Galera cluster is converged as a whole: --hosts must name all of "
                        f"{', '.join(galera)} or none of them")
    return galera


def _install(h: HostSession, flav: Flavour) -> bool:
    """Packages, config, drop-in and health check; whether mysqld's config changed."""
    install_packages(h, flav)
    tv = h.tier_vars(template_vars)
    changed = h.template(flav.config_template, flav.config_path, tv, group="mysql", mode="0640")
    if h.template(flav.dropin_template, flav.dropin_path, tv):
        h.sh("systemctl daemon-reload")
        changed = True
    # Started by the formation steps (bootstrap node first, then joiners), not here.
    h.ensure(f"systemctl is-enabled -q {flav.service}", f"systemctl enable {flav.service}",
             f"{flav.service} enabled at boot")
    # The Galera-aware health check the DB proxy asks (HTTP 200 when Synced).
    h.template("pxc/etc/mysql/galera-check.cnf.j2", CHECK_CNF, tv, group="nogroup", mode="0640")
    h.template("pxc/usr/local/bin/galera-check.j2", "/usr/local/bin/galera-check", tv, mode="0755")
    units = h.template("pxc/etc/systemd/system/galera-check.socket.j2", "/etc/systemd/system/galera-check.socket",
                       tv)
    units |= h.template("pxc/etc/systemd/system/galera-check@.service.j2",
                        "/etc/systemd/system/galera-check@.service", tv)
    if units:
        h.sh("systemctl daemon-reload")
    h.service("galera-check.socket", restart=units)
    return changed


def _config_newer_than_server(h: HostSession, flav: Flavour) -> bool:
    """A running server started before its config was last written (say, a run
    that wrote the config and failed before the restart) needs a restart too."""
    r = h.probe(f"pid=$(pidof {flav.daemon}) && echo $(( $(date +%s) - $(ps -o etimes= -p $pid) )) "
                f"$(stat -c %Y {flav.config_path} {flav.dropin_path})")
    if not r.ok:
        return False
    started, *mtimes = (int(x) for x in r.stdout.split())
    stale = any(m > started + 1 for m in mtimes)
    if stale:
        h.note(f"{flav.daemon} runs with an older config than {flav.config_path}: restart due")
    return stale


def _accounts(h: HostSession) -> None:
    inv = h.inv
    state = h.read(mysql_e(state_sql(inv)))
    changes = sql_changes(inv, state, h.run.secret)
    waiting = table_grants_waiting(inv, state)
    if waiting:
        h.ok(f"grants on {', '.join(waiting)} wait for the table (the mail tier makes it; "
             "deploy.mail grants them after it)")
    if not changes:
        h.ok(f"databases {', '.join(DATABASES)} and {len(db_accounts(inv))} accounts as wanted")
        return
    for stmt, what in changes:
        # The statement carries password hashes only; it goes through stdin, not the command line.
        h.sh(mysql(), stdin=stmt + ";\n", message=what)


def table_grants(run: Run) -> None:
    """The accounts step again, once the mail tier made Postfixadmin's tables: the
    grants on single tables (Roundcube's password plugin on postfix.mailbox)."""
    if run.inv.mail is None or not galera_nodes(run.inv) or not run.hosts("galera"):
        return
    try:
        node = run.answering(galera_nodes(run.inv), what="Galera node", probe=mysql_e("SELECT 1;"))
    except UserError:
        if not run.check:
            raise
        run.report.note("pxc: would grant on the mail schema's tables once the cluster answers")
        return
    run.step("pxc: grants on the mail schema's tables", [node.name], _accounts)


def wait_node(h: HostSession, until, what: str, timeout: float = SYNC_TIMEOUT) -> Node:
    """Read the node every 2 s until ``until(node)``; a mysqld that is still not
    running 15 s into the wait has failed to start: give up at once."""
    service = flavour(h.inv).service

    def down(node: Node, elapsed: float) -> str | None:
        if not node.running and elapsed > DOWN_GRACE:
            return (f"mysqld is not running after {DOWN_GRACE} s; see `journalctl -u {service}` "
                    "and the error log")
        return None

    node = poll(lambda: read_node(h), until, timeout=timeout, what=what, describe=describe, give_up=down,
                error=HostFailed)
    h.ok(f"{what}: {describe(node)}")
    return node


def _check_formed(h: HostSession, size: int) -> None:
    wait_node(h, lambda n: n.synced and n.size == size, f"cluster size {size}, Synced", timeout=120)


def _leave_bootstrap(h: HostSession, flav: Flavour) -> None:
    if h.probe(f"systemctl is-active -q {flav.bootstrap_unit}").ok:
        for cmd in flav.after_bootstrap:
            h.sh(cmd, timeout=SYNC_TIMEOUT)
        wait_node(h, lambda n: n.synced, "Synced")
    else:
        h.ok(f"runs as {flav.service} (not in bootstrap mode)")


# --- tasks ------------------------------------------------------------------------------


@runbook(default=True)
def deploy(run):
    """Converge the Galera cluster: packages, config, bootstrap once, joiners, users."""
    converge(run)


def gather(run: Run, galera: list[str], *, recover: bool) -> list[Node]:
    states: dict[str, Node] = {}
    unreachable: dict[str, str] = {}
    for name in galera:
        try:
            run.session(name).open()
        except UserError as exc:
            unreachable[name] = str(exc)

    def one(h: HostSession) -> None:
        states[h.name] = read_node(h, recover=recover)
        h.ok(f"{describe(states[h.name])}, position {states[h.name].position} ({states[h.name].source or '-'})")

    reachable = [n for n in galera if n not in unreachable]
    run.step("pxc: read every node" + (" (wsrep-recover where seqno is -1)" if recover else ""), reachable, one)
    return [states.get(n) or Node(n, reachable=False, error=unreachable[n]) for n in galera]


def evidence_table(states: list[Node], chosen: str | None = None) -> Table:
    """The evidence pxc.bootstrap decides on, one row per node (UUIDs shortened
    to 8 characters; the full ones are in the run's log)."""
    from rich.table import Table  # here, not at the top: `inv --list` stays fast without rich

    t = Table(title="Galera nodes" + (f" (-> {chosen}: chosen)" if chosen else ""))
    for col in ("node", "mysqld", "status", "state", "size", "uuid", "seqno", "from", "safe"):
        t.add_column(col, no_wrap=True)
    for n in states:
        t.add_row(
            ("-> " if n.name == chosen else "") + n.name,
            "unreachable" if not n.reachable else "alive" if n.running else "down",
            n.status or "-", n.state or "-", str(n.size or "-"), (n.uuid or "-")[:8], str(n.seqno),
            n.source or "-", "1" if n.safe_to_bootstrap else "0",
        )
    return t


@runbook(help={
    "yes": "do not ask for confirmation (needed when stdin is not a terminal)",
    "node": "bootstrap this node (refused when another node is ahead of it)",
    "force": "proceed although a node has no recoverable position (it is never chosen) or the nodes' "
             "cluster UUIDs differ; never overrides a live Primary or an unreachable peer",
})
def bootstrap(run, yes=False, node=None, force=False):
    """Bring the cluster back after every node went down (or the survivor lost quorum)."""
    galera = _guard_inventory(run)
    if node is not None and node not in galera:
        raise UserError(f"--node {node}: not a Galera node (Galera nodes: {', '.join(galera)}); nothing was changed")
    flav = flavour(run.inv)
    states = gather(run, galera, recover=True)
    try:
        decision = decide(states, node=node, force=force)
    except UserError:
        run.report.table(evidence_table(states))
        raise
    run.report.table(evidence_table(states, decision.node))
    run.report.log("evidence: " + "; ".join(f"{n.name} {describe(n)} {n.position} ({n.source}) "
                                            f"safe_to_bootstrap={int(n.safe_to_bootstrap)}" for n in states))
    for r in decision.reasons:
        run.report.note(r)
    plan = (f"make {decision.node}'s component Primary (pc.bootstrap)" if decision.how == "pc-bootstrap"
            else f"bootstrap a new cluster from {decision.node} ({flav.bootstrap_cmd})")
    if decision.stop_first:
        plan = f"stop {', '.join(decision.stop_first)}, then " + plan
    if decision.start_after:
        plan += f", then start {', '.join(decision.start_after)} one by one"
    run.report.note("plan: " + plan)
    if run.check:
        return
    confirm(plan, yes=yes)
    if decision.stop_first:
        run.step("pxc: stop the non-Primary nodes", list(decision.stop_first), lambda h: h.sh(flav.stop_cmd))
    # Last look before forcing a Primary component: every other node's mysqld must be down
    # (or, for pc.bootstrap, not part of any Primary component).
    others = [n for n in galera if n != decision.node and any(s.name == n and s.reachable for s in states)]

    def confirm_down(h: HostSession) -> None:
        now = read_node(h)
        if decision.how == "new-cluster" and now.running:
            raise HostFailed(f"mysqld is alive again ({describe(now)}); refusing to bootstrap")
        if now.primary:
            raise HostFailed(f"is Primary now ({describe(now)}); refusing to bootstrap")
        h.ok(f"confirmed: {describe(now)}")

    run.step("pxc: confirm the other nodes are down", others, confirm_down)

    def boot(h: HostSession) -> None:
        for cmd in bootstrap_commands(flav, decision):
            h.sh(cmd, timeout=SYNC_TIMEOUT)
        wait_node(h, lambda n: n.primary, "Primary")

    run.step(f"pxc: bootstrap {decision.node}", [decision.node], boot)
    for name in decision.start_after:
        def start(h: HostSession) -> None:
            h.sh(flav.start_cmd, message=f"start {flav.service}: rejoin", timeout=SYNC_TIMEOUT)
            wait_node(h, lambda n: n.synced, "Synced")
        run.step(f"pxc: {name} rejoins", [name], start)
    run.step("pxc: cluster formed", galera, lambda h: _check_formed(h, len(galera)))
    if flav.after_bootstrap and decision.how == "new-cluster":
        run.step(f"pxc: {decision.node} leaves bootstrap mode", [decision.node],
                 lambda h: _leave_bootstrap(h, flav))


@runbook(readonly=True)
def status(run):
    """Per node: mysqld, cluster status (Primary?), state, size, seqno; tables without a primary key."""
    galera = _guard_inventory(run) if run.inv.mail else []
    states = gather(run, galera, recover=False)
    run.report.table(evidence_table(states))
    primary = next((n for n in states if n.synced), None)
    if primary:
        out = run.session(primary.name).probe(mysql_e(tables_without_primary_key_sql()))
        bad = out.stdout.split()
        run.report.note("tables without a primary key (refused by pxc_strict_mode / wsrep_mode): "
                        + (", ".join(bad) if bad else "none"))


ns = Collection("pxc", deploy, bootstrap, status)
