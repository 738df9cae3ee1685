"""`inv status`: the whole site in one table, read live from the hosts over SSH
(not from Prometheus: it answers while monitoring is down). Read-only: nothing
on a host changes.

Runbook (`status`):
1. Every selected host is connected to at once. An unreachable host is a red
   line (and a red line in each check it belongs to); the others go on.
2. One check per tier the inventory has, each one parallel step over its
   reachable hosts, each returning lines (component, object, state, detail,
   level green / yellow / red):
   - galera: every node's mysqld, Primary?, Synced?, cluster size (pxc's own
     evidence: `pxc.gather`);
   - pacemaker: `crm_mon -1 --output-as=xml` on every back end; from the first
     that answers: quorum, each node online / standby / offline, each resource
     and where it runs, failed actions;
   - postgres: each node's role (`pg_is_in_recovery()`) against the inventory's;
     on the primary its replicas (`pg_stat_replication`: state, lag) and its WAL
     archiver (`pg_stat_archiver`: the last failure after the last success is
     red); on a replica its WAL receiver;
   - ejabberd: each node running (`ejabberdctl status`) and in one cluster with
     every other node (`ejabberdctl list_cluster`);
   - vip: who holds each VIP of the inventory (`ip -o -4 addr show` on the hosts
     of its role): exactly one;
   - backup: the newest `hastack_backup_last_success_timestamp_seconds` in the
     node exporter's textfile directory of each backup host (absent: not
     deployed, yellow; older than the alert threshold: red);
   - alerts: what fires on the monitoring host's Prometheus (its HTTP API on
     loopback); no answer is yellow (monitoring not answering).
3. One table (with --json: a JSON list of the lines on standard output, the
   rest on standard error). Exit status 1 when any line is red.

Everything a host answers is data: it is parsed and shown, never put into a
command line.
"""

from __future__ import annotations

import datetime as dt
import json as jsonlib
import re
import xml.etree.ElementTree as ET
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any, Callable

from . import ejabberd, pxc
from .core import UserError, runbook, topology
from .core.sql import psql_c

if TYPE_CHECKING:
    from rich.table import Table

    from .core import HostSession, Result, Run
    from .core.inventory import Inventory

GREEN, YELLOW, RED = "green", "yellow", "red"
LEVELS = (GREEN, YELLOW, RED)

# What the checks run (constant command lines: nothing from a host goes into one).
CRM_MON = "crm_mon -1 --output-as=xml"
IP_ADDRS = "ip -o -4 addr show"
PG_ROLE = psql_c("SELECT pg_is_in_recovery()")
PG_REPLICATION = psql_c(
    "SELECT coalesce(host(client_addr), 'local'), coalesce(state, ''), "
    "coalesce(pg_wal_lsn_diff(pg_current_wal_lsn(), replay_lsn)::bigint::text, ''), "
    "coalesce(extract(epoch FROM replay_lag)::bigint::text, '0') FROM pg_stat_replication")
PG_RECEIVER = psql_c(
    "SELECT coalesce(r.status, ''), coalesce(r.sender_host, ''), coalesce(r.slot_name, ''), "
    "coalesce(pg_wal_lsn_diff(pg_last_wal_receive_lsn(), pg_last_wal_replay_lsn())::bigint::text, '') "
    "FROM (SELECT 1) AS one LEFT JOIN pg_stat_wal_receiver AS r ON true")
PG_ARCHIVER = psql_c(
    "SELECT current_setting('archive_mode'), archived_count, coalesce(last_archived_wal, ''), "
    "coalesce(extract(epoch FROM last_archived_time)::bigint::text, ''), failed_count, "
    "coalesce(last_failed_wal, ''), coalesce(extract(epoch FROM last_failed_time)::bigint::text, ''), "
    "extract(epoch FROM now())::bigint FROM pg_stat_archiver")
BACKUP_METRIC = "hastack_backup_last_success_timestamp_seconds"
TEXTFILE_DIR = "/var/lib/prometheus/node-exporter"
BACKUP_READ = f"date +%s; grep -hs '^{BACKUP_METRIC}[{{ ]' {TEXTFILE_DIR}/*.prom"
ALERTS_URL = "http://127.0.0.1:9090/api/v1/alerts"
ALERTS_READ = f"curl -s --max-time 5 {ALERTS_URL}"

# The alert thresholds when the inventory has no monitoring section (its defaults).
REPLICATION_LAG_SECONDS = 30
BACKUP_AGE_HOURS = 26


@dataclass(frozen=True)
class Line:
    """One line of the status: what, which, in what state, why, and how bad."""

    component: str
    object: str
    state: str
    detail: str
    level: str


def red_lines(lines: list[Line]) -> list[Line]:
    return [line for line in lines if line.level == RED]


# --- reaching the hosts -------------------------------------------------------------------


def hosts_lines(hosts: list[str], down: dict[str, str]) -> list[Line]:
    up = len(hosts) - len(down)
    lines = [Line("ssh", f"{up} of {len(hosts)} hosts", "reachable", "",
                  GREEN if not down else YELLOW if up else RED)]
    return lines + [Line("ssh", host, "unreachable", why, RED) for host, why in down.items()]


def probe_all(run: Run, title: str, hosts: list[str], down: dict[str, str],
              read: Callable[[HostSession], Any]) -> dict[str, Any]:
    """``read(h)`` on every reachable host of ``hosts`` in one parallel step; {host: answer}."""
    answers: dict[str, Any] = {}

    def one(h: HostSession) -> None:
        answers[h.name] = read(h)

    up = [h for h in hosts if h not in down]
    if up:
        run.step(title, up, one)
    return answers


def _tail(r: Result) -> str:
    text = (r.stderr or r.stdout or "").strip().splitlines()
    return text[-1][:200] if text else f"exit {r.exited}"


def _int(text: str, default: int | None = None) -> int | None:
    try:
        return int(float(text))
    except (TypeError, ValueError):
        return default


def _ago(seconds: float) -> str:
    if seconds < 120:
        return f"{int(seconds)} s ago"
    if seconds < 7200:
        return f"{seconds / 60:.0f} min ago"
    return f"{seconds / 3600:.1f} h ago"


def _threshold(inv: Inventory, name: str, default: float) -> float:
    """An alert threshold of the inventory's monitoring section (its default without one)."""
    thresholds = getattr(getattr(inv, "monitoring", None), "thresholds", None)
    return getattr(thresholds, name, default)


# --- galera (pxc's evidence) ----------------------------------------------------------------


def galera(run: Run, down: dict[str, str]) -> list[Line]:
    nodes = run.hosts(topology.GALERA)
    if not nodes:
        return []
    want = len(topology.galera_nodes(run.inv))
    up = [n for n in nodes if n not in down]
    read = {n.name: n for n in pxc.gather(run, up, recover=False)} if up else {}
    return [galera_line(read.get(n) or pxc.Node(n, reachable=False, error=down[n]), want) for n in nodes]


def galera_line(n: pxc.Node, want: int) -> Line:
    if not n.reachable:
        return Line("galera", n.name, "unreachable", n.error, RED)
    if not (n.running and n.answering and n.wsrep_on):
        where = f"last position {n.position} ({n.source})" if n.source else ""
        return Line("galera", n.name, pxc.describe(n), n.error or where, RED)
    state = f"{n.status or '?'} {n.state}".strip()
    detail = f"size {n.size} of {want}, seqno {n.seqno}"
    if n.synced and n.size == want:
        return Line("galera", n.name, state, detail, GREEN)
    return Line("galera", n.name, state, detail, YELLOW if n.primary else RED)


# --- pacemaker ------------------------------------------------------------------------------


def pacemaker(run: Run, down: dict[str, str]) -> list[Line]:
    nodes = run.hosts(topology.MAIL_BACKEND)
    if not nodes:
        return []
    answers = probe_all(run, "status: pacemaker", nodes, down, lambda h: h.probe(CRM_MON))
    local = {n: ("unreachable: " + down[n]) if n in down else
             None if answers[n].ok else f"crm_mon does not answer: {_tail(answers[n])}" for n in nodes}
    view = next((n for n in nodes if not local[n]), None)
    if view is None:
        return [Line("pacemaker", n, "unknown", local[n], RED) for n in nodes]
    return crm_mon_lines(answers[view].stdout, nodes, local, view)


def crm_mon_lines(xml: str, nodes: list[str], local: dict[str, str | None], view: str) -> list[Line]:
    """The cluster as ``view``'s `crm_mon --output-as=xml` shows it; ``local``: each
    node's own problem (unreachable, crm_mon failing there), None when it answered."""
    try:
        root = ET.fromstring(xml)
    except ET.ParseError as exc:
        return [Line("pacemaker", view, "unknown", f"crm_mon output is not XML ({exc})", RED)]
    lines: list[Line] = []
    dc = root.find("summary/current_dc")
    if dc is None or dc.get("present") != "true":
        lines.append(Line("pacemaker", "cluster", "no DC", f"as {view} sees it", RED))
    elif dc.get("with_quorum") != "true":
        lines.append(Line("pacemaker", "cluster", "no quorum", f"as {view} sees it; DC {dc.get('name')}", RED))
    else:
        lines.append(Line("pacemaker", "cluster", "quorate", f"DC {dc.get('name')}, as {view} sees it", GREEN))
    seen = {n.get("name"): n for n in root.findall("nodes/node")}
    for name in nodes:
        lines.append(_crm_node_line(name, seen.get(name), local.get(name)))
    resources = root.find("resources")
    active: set[str] = set()
    if resources is not None:
        resource_lines, active = _crm_resource_lines(resources)
        lines += resource_lines
    for f in root.findall("failures/failure"):
        rsc = (f.get("op_key") or "?").rsplit("_", 2)[0]
        what = f"{f.get('task') or '?'} on {f.get('node') or '?'}: {f.get('exitstatus') or '?'}"
        reason = f.get("exitreason") or ""
        when = f.get("last-rc-change") or ""
        lines.append(Line("pacemaker failure", f.get("op_key") or "?", "failed action",
                          "; ".join(x for x in (what, reason, when, "clear with pcs resource cleanup") if x),
                          YELLOW if rsc in active else RED))
    return lines


def _crm_node_line(name: str, node: ET.Element | None, problem: str | None) -> Line:
    if node is None:
        return Line("pacemaker", name, "not a member", problem or "not in crm_mon's node list", RED)
    flag = lambda attr: node.get(attr) == "true"  # noqa: E731
    if flag("unclean"):
        state, level = "unclean (to be fenced)", RED
    elif not flag("online"):
        state, level = "offline", RED
    elif flag("standby"):
        state, level = "standby", YELLOW
    elif flag("maintenance"):
        state, level = "maintenance", YELLOW
    else:
        state, level = "online", GREEN
    detail = f"{node.get('resources_running') or 0} resource(s)" + (", DC" if flag("is_dc") else "")
    if problem:
        return Line("pacemaker", name, state, problem, RED)
    return Line("pacemaker", name, state, detail, level)


def _crm_resource_lines(resources: ET.Element) -> tuple[list[Line], set[str]]:
    """One line per resource (a clone: per running instance, or one red line when
    none runs); the ids of the resources that run somewhere."""
    lines: list[Line] = []
    active: set[str] = set()

    def group_of(parents: list[ET.Element]) -> str:
        return next((f"group {p.get('id')}" for p in reversed(parents) if p.tag == "group"), "")

    def one(r: ET.Element, parents: list[ET.Element]) -> Line:
        rid, role = r.get("id") or "?", r.get("role") or "?"
        on = [n.get("name") for n in r.findall("node")]
        where = "; ".join(x for x in (f"on {', '.join(on)}" if on else "", group_of(parents),
                                      r.get("resource_agent") or "") if x)
        if r.get("failed") == "true" or r.get("blocked") == "true":
            return Line("pacemaker resource", rid, f"{role}, {'failed' if r.get('failed') == 'true' else 'blocked'}",
                        where, RED)
        if r.get("active") == "true" and role != "Stopped":
            active.add(rid)
            managed = r.get("managed") != "false"
            return Line("pacemaker resource", rid, role if managed else f"{role}, unmanaged", where,
                        GREEN if managed else YELLOW)
        if (r.get("target_role") or "").lower() == "stopped":
            return Line("pacemaker resource", rid, "Stopped (disabled)", where, YELLOW)
        return Line("pacemaker resource", rid, role, where or "runs nowhere", RED)

    def walk(el: ET.Element, parents: list[ET.Element]) -> None:
        for child in el:
            if child.tag == "resource":
                lines.append(one(child, parents))
            elif child.tag == "group":
                walk(child, [*parents, child])
            elif child.tag == "clone":
                # Instances the clone does not need (clone-max below the node count) are
                # stopped: only a failed one is shown while another runs.
                instances = [one(r, [*parents, child]) for r in child.iter("resource")]
                running = [x for x in instances if x.level != RED]
                failed = [x for x in instances if x.level == RED and x.state.endswith(("failed", "blocked"))]
                lines.extend(running + failed if running else instances[:1] or [
                    Line("pacemaker resource", child.get("id") or "?", "Stopped", "no instance runs", RED)])

    walk(resources, [])
    return lines, active


# --- postgres -------------------------------------------------------------------------------


@dataclass
class PgNode:
    """What one PostgreSQL node answered (rows are psql's `|`-separated fields)."""

    error: str = ""
    in_recovery: bool = False
    replication: list[list[str]] | None = None  # primary: pg_stat_replication
    archiver: list[str] | None = None  # primary: pg_stat_archiver and archive_mode
    receiver: list[str] | None = None  # replica: pg_stat_wal_receiver and the replay lag


def _rows(r: Result) -> list[list[str]]:
    return [line.split("|") for line in r.stdout.splitlines() if line.strip()] if r.ok else []


def read_pg(h: HostSession) -> PgNode:
    role = h.probe(PG_ROLE)
    answer = role.stdout.strip()
    if not role.ok or answer not in ("t", "f"):
        return PgNode(error=f"PostgreSQL does not answer: {_tail(role)}")
    if answer == "t":
        rows = _rows(h.probe(PG_RECEIVER))
        return PgNode(in_recovery=True, receiver=rows[0] if rows else [])
    archiver = _rows(h.probe(PG_ARCHIVER))
    return PgNode(replication=_rows(h.probe(PG_REPLICATION)), archiver=archiver[0] if archiver else [])


def postgres(run: Run, down: dict[str, str]) -> list[Line]:
    hosts = run.hosts(topology.PG_PRIMARY, topology.PG_REPLICA)
    if not hosts:
        return []
    answers = probe_all(run, "status: postgres", hosts, down, read_pg)
    return pg_lines(run.inv, hosts, answers, down)


def pg_lines(inv: Inventory, hosts: list[str], answers: dict[str, PgNode], down: dict[str, str]) -> list[Line]:
    limit = _threshold(inv, "replication_lag_seconds", REPLICATION_LAG_SECONDS)
    # What the primaries see of their replicas, by the replica's address.
    streams = {row[0]: row for node in answers.values() if node.replication for row in node.replication
               if len(row) == 4}
    lines: list[Line] = []
    for host in hosts:
        want = "replica" if topology.PG_REPLICA in inv.hosts[host].roles else "primary"
        if host in down:
            lines.append(Line("postgres", host, "unreachable", down[host], RED))
            continue
        node = answers[host]
        if node.error:
            lines.append(Line("postgres", host, "down", node.error, RED))
            continue
        role = "replica" if node.in_recovery else "primary"
        if role != want:
            lines.append(Line("postgres", host, role, f"the inventory says {want}"
                              + (" (two primaries?)" if role == "primary" else ""), RED))
        elif role == "primary":
            lines.append(_pg_primary_line(inv, host, node))
        else:
            lines.append(_pg_replica_line(inv, host, node, streams.get(inv.service_address(host)), limit))
        if role == "primary":
            lines.append(archiver_line(host, node.archiver or []))
    return lines


def _pg_primary_line(inv: Inventory, host: str, node: PgNode) -> Line:
    by_addr = {row[0]: row for row in node.replication or [] if len(row) == 4}
    replicas = [r for r in topology.pg_replicas(inv) if r != host]
    missing = [r for r in replicas if by_addr.get(inv.service_address(r), ["", ""])[1] != "streaming"]
    streaming = len(replicas) - len(missing)
    detail = f"{streaming} of {len(replicas)} replica(s) streaming"
    if missing:
        return Line("postgres", host, "primary", f"{detail}; not streaming: {', '.join(missing)}", YELLOW)
    return Line("postgres", host, "primary", detail, GREEN)


def _pg_replica_line(inv: Inventory, host: str, node: PgNode, stream: list[str] | None, limit: float) -> Line:
    status, sender, slot, replay = (node.receiver or []) + [""] * (4 - len(node.receiver or []))
    if status != "streaming":
        return Line("postgres", host, "replica", f"WAL receiver {status or 'not running'}"
                    + (f" (from {sender})" if sender else ""), RED)
    detail = f"streaming from {sender}" + (f", slot {slot}" if slot else "")
    lag_bytes = _int(stream[2]) if stream else None
    lag_seconds = _int(stream[3], 0) if stream else 0
    if lag_bytes is not None:
        detail += f"; lag {lag_bytes} bytes, {lag_seconds} s (primary's view)"
    elif _int(replay) is not None:
        detail += f"; {replay} bytes received, not yet replayed"
    if lag_seconds > limit:
        return Line("postgres", host, "replica, lagging", f"{detail}; more than {limit:g} s behind", YELLOW)
    return Line("postgres", host, "replica", detail, GREEN)


def archiver_line(host: str, row: list[str]) -> Line:
    """pg_stat_archiver: the last failure after the last success is red."""
    if len(row) != 8:
        return Line("postgres archiver", host, "unknown", "pg_stat_archiver did not answer", RED)
    mode, archived, last_wal, last_at, failed, failed_wal, failed_at, now = row
    archived_n, failed_n = _int(archived, 0), _int(failed, 0)
    last_t, failed_t, now_t = _int(last_at), _int(failed_at), _int(now, 0)
    if mode == "off":
        return Line("postgres archiver", host, "off", "archive_mode is off: no WAL archive", YELLOW)
    if failed_t is not None and (last_t is None or failed_t > last_t):
        return Line("postgres archiver", host, "failing",
                    f"{failed_n} failure(s), the last {_ago(now_t - failed_t)} ({failed_wal}); "
                    + (f"last success {_ago(now_t - last_t)} ({last_wal})" if last_t is not None else "never archived"),
                    RED)
    if not archived_n or last_t is None:
        return Line("postgres archiver", host, "idle", "nothing archived yet", YELLOW)
    return Line("postgres archiver", host, "archiving",
                f"{archived_n} segment(s), the last {_ago(now_t - last_t)} ({last_wal})"
                + (f"; {failed_n} earlier failure(s)" if failed_n else ""), GREEN)


# --- ejabberd -------------------------------------------------------------------------------


def read_ejabberd(h: HostSession) -> tuple[Result, list[str]]:
    up = h.probe(ejabberd.STATUS)
    members = ejabberd.cluster_members(h.probe(f"{ejabberd.CTL} list_cluster").stdout) if up.ok else []
    return up, members


def ejabberd_nodes(run: Run, down: dict[str, str]) -> list[Line]:
    hosts = run.hosts(topology.EJABBERD)
    if not hosts:
        return []
    answers = probe_all(run, "status: ejabberd", hosts, down, read_ejabberd)
    everyone = [ejabberd.node_name(n) for n in topology.ejabberd_nodes(run.inv)]
    lines = []
    for host in hosts:
        if host in down:
            lines.append(Line("ejabberd", host, "unreachable", down[host], RED))
            continue
        up, members = answers[host]
        if not up.ok:
            lines.append(Line("ejabberd", host, "not running", _tail(up), RED))
            continue
        missing = [m for m in everyone if m not in members]
        detail = f"cluster: {', '.join(members) or '?'}" + (f"; missing {', '.join(missing)}" if missing else "")
        lines.append(Line("ejabberd", host, "running", detail, YELLOW if missing else GREEN))
    return lines


# --- VIPs -----------------------------------------------------------------------------------


def vips(run: Run, down: dict[str, str]) -> list[Line]:
    names = {name: run.hosts(vip.role) for name, vip in run.inv.vips.items()}
    names = {name: hosts for name, hosts in names.items() if hosts}
    if not names:
        return []
    hosts = [h for h in run.hosts() if any(h in c for c in names.values())]
    answers = probe_all(run, "status: VIP holders", hosts, down, lambda h: h.probe(IP_ADDRS))
    held = {h: set(re.findall(r"\binet (\d+\.\d+\.\d+\.\d+)/", r.stdout)) for h, r in answers.items() if r.ok}
    return [vip_line(name, str(run.inv.vips[name].address), candidates, held,
                     narrowed=len(candidates) < len(run.inv.with_role(run.inv.vips[name].role)))
            for name, candidates in names.items()]


def vip_line(name: str, address: str, candidates: list[str], held: dict[str, set[str]], narrowed: bool) -> Line:
    """``held``: the addresses of each host that answered; exactly one holder is green."""
    holders = [h for h in candidates if address in held.get(h, set())]
    unread = [h for h in candidates if h not in held]
    obj = f"{name} {address}"
    if len(holders) == 1:
        return Line("vip", obj, f"held by {holders[0]}", "", GREEN)
    if holders:
        return Line("vip", obj, f"held by {len(holders)} hosts", f"{', '.join(holders)}: split brain", RED)
    detail = f"not on {', '.join(candidates)}" + (f" (not read: {', '.join(unread)})" if unread else "")
    if narrowed and not unread:  # --hosts left out the other hosts that may hold it
        return Line("vip", obj, "not on the selected hosts", detail, YELLOW)
    return Line("vip", obj, "held by no host", detail, RED)


# --- backups --------------------------------------------------------------------------------


def backups(run: Run, down: dict[str, str]) -> list[Line]:
    hosts = run.hosts(topology.BACKUP)
    if not hosts:
        return []
    answers = probe_all(run, "status: backups", hosts, down, lambda h: h.probe(BACKUP_READ))
    limit = _threshold(run.inv, "backup_age_hours", BACKUP_AGE_HOURS)
    lines = []
    for host in hosts:
        if host in down:
            lines.append(Line("backup", host, "unreachable", down[host], RED))
        else:
            lines += backup_lines(host, answers[host], limit)
    return lines


def backup_lines(host: str, r: Result, limit_hours: float) -> list[Line]:
    """`date +%s` then the metric's lines from the textfile directory: one line per series."""
    out = r.stdout.splitlines()
    now = _int(out[0].strip()) if out else None
    if now is None:
        return [Line("backup", host, "unknown", f"cannot read {TEXTFILE_DIR}: {_tail(r)}", RED)]
    series: dict[str, float] = {}
    for text in out[1:]:
        m = re.match(rf"^{BACKUP_METRIC}(\{{[^}}]*\}})?\s+(\S+)", text)
        if m:
            try:
                value = float(m[2])
            except ValueError:
                continue
            series[m[1] or ""] = max(value, series.get(m[1] or "", 0.0))
    if not series:
        return [Line("backup", host, "not deployed", f"no {BACKUP_METRIC} in {TEXTFILE_DIR}/*.prom", YELLOW)]
    lines = []
    for labels, stamp in sorted(series.items()):
        obj = f"{host} {labels}".strip()
        if stamp <= 0:
            lines.append(Line("backup", obj, "no good run yet", "", YELLOW))
            continue
        when = dt.datetime.fromtimestamp(stamp, dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
        age = now - stamp
        detail = f"last good run {when} ({_ago(max(age, 0))})"
        if age > limit_hours * 3600:
            lines.append(Line("backup", obj, "stale", f"{detail}; older than {limit_hours:g} h", RED))
        else:
            lines.append(Line("backup", obj, "ok", detail, GREEN))
    return lines


# --- alerts ---------------------------------------------------------------------------------


def alerts(run: Run, down: dict[str, str]) -> list[Line]:
    hosts = run.hosts(topology.MONITORING)
    if not hosts:
        return []
    answers = probe_all(run, "status: alerts", hosts, down, lambda h: h.probe(ALERTS_READ))
    lines = []
    for host in hosts:
        if host in down:
            lines.append(Line("alerts", host, "monitoring not answering", f"unreachable: {down[host]}", YELLOW))
        else:
            lines += alert_lines(host, answers[host])
    return lines


SEVERITY = {"critical": RED, "warning": YELLOW}


def alert_lines(host: str, r: Result) -> list[Line]:
    """Prometheus's /api/v1/alerts: one line per firing alert (critical red, warning
    yellow, others green), or one line saying none fires."""
    try:
        data = jsonlib.loads(r.stdout) if r.ok else None
    except ValueError:
        data = None
    found = None
    if isinstance(data, dict) and data.get("status") == "success" and isinstance(data.get("data"), dict):
        found = data["data"].get("alerts")
    if not isinstance(found, list):
        why = "no JSON answer" if r.ok else f"curl: {_tail(r)}"
        return [Line("alerts", host, "monitoring not answering", f"{ALERTS_URL}: {why}", YELLOW)]
    firing = [a for a in found if isinstance(a, dict) and a.get("state") == "firing"]
    pending = sum(1 for a in found if isinstance(a, dict) and a.get("state") == "pending")
    if not firing:
        return [Line("alerts", host, "none firing", f"{pending} pending" if pending else "", GREEN)]
    lines = []
    for a in firing:
        labels = a.get("labels") if isinstance(a.get("labels"), dict) else {}
        notes = a.get("annotations") if isinstance(a.get("annotations"), dict) else {}
        severity = str(labels.get("severity", ""))
        where = str(labels.get("instance") or labels.get("host") or "")
        obj = str(labels.get("alertname", "?")) + (f" {where}" if where else "")
        detail = str(notes.get("summary") or notes.get("description") or "")
        lines.append(Line("alerts", obj, f"firing ({severity or 'no severity'})", detail,
                          SEVERITY.get(severity, GREEN)))
    return lines


# --- the task -------------------------------------------------------------------------------

# The checks, in the order the table shows them.
CHECKS: tuple[Callable[[Run, dict[str, str]], list[Line]], ...] = (
    galera, pacemaker, postgres, ejabberd_nodes, vips, backups, alerts)


def gather_lines(run: Run) -> list[Line]:
    hosts = run.hosts()
    down = run.unreachable(hosts)
    lines = hosts_lines(hosts, down)
    for check in CHECKS:
        lines += check(run, down)
    return lines


def table(lines: list[Line], title: str) -> Table:
    from rich.table import Table  # here, not at the top: `inv --list` stays fast without rich
    from rich.text import Text

    t = Table(title=title, title_justify="left")
    for col in ("component", "object", "state", "detail", "level"):
        t.add_column(col, overflow="fold")
    for line in lines:  # Text cells: what a host said is shown as it is, never read as markup
        t.add_row(Text(line.component), Text(line.object), Text(line.state, style=line.level),
                  Text(line.detail), Text(line.level, style=f"bold {line.level}"))
    return t


@runbook(readonly=True, help={"json": "print the lines as a JSON list (component, object, state, detail, level) "
                                      "on standard output instead of the table; the rest goes to standard error"})
def status(run, json=False):
    """Every tier in one table, read live over SSH; exit status 1 when a line is red."""
    run.report.quiet = True
    if json:
        run.report.to_stderr()
    lines = gather_lines(run)
    counts = {level: sum(1 for line in lines if line.level == level) for level in LEVELS}
    if json:
        print(jsonlib.dumps([asdict(line) for line in lines], indent=2), flush=True)
    else:
        run.report.table(table(lines, f"Status of {run.inv.site.name} ({run.inv.path.name})"))
    run.report.console.print(", ".join(f"[{level}]{n} {level}[/]" for level, n in counts.items()))
    red = red_lines(lines)
    if red:
        raise UserError(f"{len(red)} red line(s): "
                        + "; ".join(f"{line.component} {line.object}: {line.state}" for line in red))
