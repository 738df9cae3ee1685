"""PostgreSQL rescue without hosts: which replica `postgres.promote` picks and when
it refuses (rescue.decide), the refusals before any connection, promote and rejoin
driven on recording hosts (facts in, commands and the roles file out), and the
files the postgres tier renders for it: conf.d/hastack.conf (primary_conninfo,
synchronous replication, slots, wal_log_hints), pg_hba's rewind rows, .pgpass, and
the two guard scripts, checked by `sh -n` and run against stub commands.

Every inventory here is the lab's, parsed from its text or copied into a temporary
folder: a lab run may have written inventory/lab.roles.yml beside the real one."""

from __future__ import annotations

import io
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from rich.console import Console

from fabfile import ejabberd, postgres, rescue
from fabfile.core import Result, UserError, templates, topology
from fabfile.core.inventory import InventoryError, load, parse, save_roles
from fabfile.core.sql import psql_c
from fabfile.core.testing import RecordingRun
from fabfile.rescue import PgState, decide, evidence_table, inventory_edit, lsn_int, swapped_roles

ROOT = Path(__file__).resolve().parents[2]
LAB_TEXT = (ROOT / "inventory/lab.yml").read_text()
CONF = "postgres/etc/postgresql/15/main/conf.d/hastack.conf.j2"
HBA = "postgres/etc/postgresql/15/main/pg_hba.conf.j2"
PGPASS = "postgres/var/lib/postgresql/.pgpass.j2"
START_GUARD = f"postgres{postgres.START_GUARD}.j2"
SYNC_GUARD = f"postgres{postgres.SYNC_GUARD}.j2"
DROPIN = f"postgres{postgres.GUARD_DROPIN}.j2"
SYNC_SERVICE = f"postgres{postgres.SYNC_GUARD_SERVICE}.j2"
PRIMARY_ADDR, REPLICA_ADDR, SPARE_ADDR = "10.200.1.10", "10.200.1.11", "10.200.1.14"
SECRETS = {postgres.SECRET_DB: "db-pw", postgres.SECRET_REPL: "repl-pw", postgres.SECRET_REWIND: "rewind-pw"}


def lab_data(*, synchronous: bool | None = None, timeout: int | None = None, roles: dict | None = None) -> dict:
    """The lab inventory's data, with these postgres settings and host roles."""
    data = yaml.safe_load(LAB_TEXT)
    settings = dict(data.get("postgres") or {})
    if synchronous is not None:
        settings["synchronous"] = synchronous
    if timeout is not None:
        settings["synchronous_timeout"] = timeout
    if settings:
        data["postgres"] = settings
    for host, r in (roles or {}).items():
        data["hosts"][host]["roles"] = r
    # A dump job runs pg_dump on its client: only while that is a PostgreSQL host.
    pg = {h for h, entry in data["hosts"].items() if {"postgres_primary", "postgres_replica"} & set(entry["roles"])}
    data["backup"]["jobs"] = {n: j for n, j in data["backup"]["jobs"].items() if "pg_dump" not in j or j["client"] in pg}
    return data


def lab(**kw):
    return parse(yaml.safe_dump(lab_data(**kw), sort_keys=False), ROOT / "inventory/lab.yml")


def site(tmp_path, **kw) -> Path:
    """The lab inventory (with these changes) as a file of its own in tmp_path."""
    path = tmp_path / "lab.yml"
    path.write_text(yaml.safe_dump(lab_data(**kw), sort_keys=False))
    return path


def secret(name):
    return SECRETS.get(name, f"secret-of-{name}")


def render(name, inv, host, **override):
    return templates.render(name, inv, host, secret, **{**postgres.template_vars(inv, host, secret), **override})


# --- WAL positions ----------------------------------------------------------------------------


@pytest.mark.parametrize("lsn,value", [
    ("A/1F", (10 << 32) + 31),
    ("0/0", 0),
    ("0/3000060", 0x3000060),
    ("16/B374D848", (0x16 << 32) + 0xB374D848),
    ("a/1f", (10 << 32) + 31),
])
def test_lsn_int(lsn, value):
    assert lsn_int(lsn) == value


@pytest.mark.parametrize("garbage", ["", "garbage", "0/", "/1", "1/2/3", "G/1", "0-1", None])
def test_lsn_int_of_garbage_is_minus_one(garbage):
    assert lsn_int(garbage) == -1


def test_lsn_order_is_numeric_not_textual():
    assert lsn_int("0/10000000") > lsn_int("0/9000000")
    assert lsn_int("1/0") > lsn_int("0/FFFFFFFF")
    assert PgState("x", lsn="").position < lsn_int("0/0")


def test_state_descriptions():
    assert PgState("a", reachable=False, error="timed out").describe() == "unreachable (timed out)"
    assert PgState("a", running=False).describe() == "PostgreSQL down"
    assert PgState("a", running=False, error="no socket").describe() == "PostgreSQL down (no socket)"
    assert PgState("a", running=True, in_recovery=True).describe() == "standby"
    assert PgState("a", running=True, in_recovery=False).describe() == "PRIMARY"


# --- rescue.decide ------------------------------------------------------------------------------


def primary(name="psql1server", lsn="0/5000000", timeline=1):
    return PgState(name, running=True, in_recovery=False, lsn=lsn, timeline=timeline)


def standby(name, lsn, timeline=1):
    return PgState(name, running=True, in_recovery=True, lsn=lsn, timeline=timeline,
                   receiver=f"streaming {PRIMARY_ADDR}")


def pg_down(name="psql1server"):
    return PgState(name, running=False, error="connection to server on socket failed")


def gone(name="psql1server"):
    return PgState(name, reachable=False, error="timed out")


def states(*items: PgState) -> dict[str, PgState]:
    return {st.name: st for st in items}


def test_primary_alive_is_refused_without_force():
    s = states(primary(), standby("psql2server", "0/5000000"))
    with pytest.raises(UserError, match=r"the primary psql1server still runs as a primary and answers.*two "
                                         r"primaries.*--force stops and fences it first. Nothing was changed"):
        decide("psql1server", s, node=None, force=False)


def test_force_moves_a_live_primary_and_fences_it():
    d = decide("psql1server", states(primary(), standby("psql2server", "0/5000000")), node=None, force=True)
    assert d.chosen == "psql2server" and d.fence is True
    assert d.reasons[0].startswith("--force: psql1server answers as a primary; it is stopped and fenced")


def test_unreachable_primary_picks_the_standby_with_the_most_wal_and_fences_nothing():
    s = states(gone(), standby("psql2server", "0/3000000"), standby("r1server", "0/3000100"),
               standby("bk1server", "0/2FFFFFF"))
    d = decide("psql1server", s, node=None, force=False)
    assert (d.chosen, d.fence) == ("r1server", False)
    assert "psql1server cannot be reached: its start guard keeps it read-only" in d.reasons[0]
    assert d.reasons[-1] == "r1server has replayed the most WAL (0/3000100)"


def test_the_most_wal_is_compared_as_numbers():
    s = states(gone(), standby("psql2server", "0/9000000"), standby("r1server", "0/10000000"))
    assert decide("psql1server", s, node=None, force=False).chosen == "r1server"
    s = states(gone(), standby("psql2server", "1/0"), standby("r1server", "0/FFFFFFFF"))
    assert decide("psql1server", s, node=None, force=False).chosen == "psql2server"


def test_a_tie_goes_to_the_first_standby_in_order():
    s = states(gone(), standby("r1server", "0/3000100"), standby("psql2server", "0/3000100"))
    assert decide("psql1server", s, node=None, force=False).chosen == "r1server"
    s = states(gone(), standby("psql2server", "0/3000100"), standby("r1server", "0/3000100"))
    assert decide("psql1server", s, node=None, force=False).chosen == "psql2server"


@pytest.mark.parametrize("old", [pg_down(), PgState("psql1server", running=True, in_recovery=True, lsn="0/1")],
                         ids=["PostgreSQL down", "already a standby"])
def test_a_reachable_primary_that_is_not_primary_any_more_is_fenced(old):
    d = decide("psql1server", states(old, standby("psql2server", "0/5000000")), node=None, force=False)
    assert (d.chosen, d.fence) == ("psql2server", True)
    assert "psql1server is reachable" in d.reasons[0] and "fenced (standby.signal)" in d.reasons[0]


def test_node_behind_another_standby_is_refused_unless_forced():
    s = states(gone(), standby("psql2server", "0/3000000"), standby("r1server", "0/3000100"))
    with pytest.raises(UserError, match=r"--node psql2server is behind r1server \(WAL 0/3000000\); promoting it "
                                         r"would lose what they have: leave --node out, or --force"):
        decide("psql1server", s, node="psql2server", force=False)
    d = decide("psql1server", s, node="psql2server", force=True)
    assert (d.chosen, d.fence) == ("psql2server", False)


def test_node_level_with_the_best_or_ahead_is_taken():
    s = states(pg_down(), standby("psql2server", "0/3000100"), standby("r1server", "0/3000100"))
    d = decide("psql1server", s, node="r1server", force=False)
    assert (d.chosen, d.fence) == ("r1server", True)  # the tie would have gone to psql2server
    s = states(gone(), standby("psql2server", "0/3000200"), standby("r1server", "0/3000100"))
    assert decide("psql1server", s, node="psql2server", force=False).chosen == "psql2server"


@pytest.mark.parametrize("node_state,what", [
    (pg_down("r1server"), "PostgreSQL down"),
    (gone("r1server"), "unreachable (timed out)"),
], ids=["down", "unreachable"])
@pytest.mark.parametrize("force", [False, True])
def test_node_that_is_not_a_running_standby_is_refused_even_with_force(node_state, what, force):
    s = states(gone(), standby("psql2server", "0/3000000"), node_state)
    with pytest.raises(UserError, match=rf"--node r1server: {re.escape(what)}.*not a running standby; nothing was "
                                         "changed"):
        decide("psql1server", s, node="r1server", force=force)


@pytest.mark.parametrize("force", [False, True])
@pytest.mark.parametrize("replica", [pg_down("psql2server"), gone("psql2server")], ids=["down", "unreachable"])
def test_no_running_standby_is_refused_even_with_force(replica, force):
    with pytest.raises(UserError, match="no replica answers as a running standby: nothing can be promoted"):
        decide("psql1server", states(gone(), replica), node=None, force=force)


@pytest.mark.parametrize("force", [False, True])
@pytest.mark.parametrize("node", [None, "psql2server"])
def test_a_replica_already_running_as_primary_is_refused(node, force):
    s = states(gone(), standby("psql2server", "0/3000000"), primary("r1server", "0/3000100", timeline=2))
    with pytest.raises(UserError, match="r1server already run.s. as a primary although the inventory says replica"):
        decide("psql1server", s, node=node, force=force)


# --- roles after a promotion ---------------------------------------------------------------------


def test_swapped_roles_moves_only_the_postgres_roles():
    inv = lab(roles={"psql1server": ["monitoring", "postgres_primary"], "psql2server": ["postgres_replica", "spare"],
                     "mon1server": []})
    roles = swapped_roles(inv, "psql1server", "psql2server")
    assert roles == {"psql1server": ["monitoring", "postgres_replica"], "psql2server": ["spare", "postgres_primary"]}
    assert inventory_edit(inv, roles) == ("hosts.psql1server.roles: [monitoring, postgres_replica]; "
                                          "hosts.psql2server.roles: [spare, postgres_primary]")


def test_swapped_roles_saved_make_a_valid_inventory_with_the_new_primary(tmp_path):
    path = site(tmp_path, roles={"r1server": ["postgres_replica"]})
    inv = load(path)
    save_roles(inv, swapped_roles(inv, "psql1server", "r1server"))
    after = load(path)
    assert topology.pg_primary(after) == "r1server"
    assert topology.pg_replicas(after) == ["psql1server", "psql2server"]
    assert after.overridden == {"psql1server": ["postgres_primary"], "r1server": ["postgres_replica"]}


def test_evidence_table_marks_the_chosen_node():
    inv = lab()
    out = io.StringIO()
    table = evidence_table(states(gone(), standby("psql2server", "0/3000060", timeline=3)), inv, "psql2server")
    Console(file=out, width=160).print(table)
    text = out.getvalue()
    assert "(-> psql2server: chosen)" in text
    rows = {line.split("│")[1].strip(): [c.strip() for c in line.split("│")[2:-1]]
            for line in text.splitlines() if line.startswith("│") and "server" in line}
    assert rows["psql1server"] == ["postgres_primary", "unreachable (timed out)", "-", "-", "-"]
    assert rows["-> psql2server"] == ["postgres_replica", "standby", "3", "0/3000060", f"streaming {PRIMARY_ADDR}"]


# --- the tasks: refusals before any connection ----------------------------------------------------


@pytest.mark.parametrize("node,what", [
    ("nosuchhost", "--node nosuchhost: not a host of"),
    ("e1server", "--node e1server: has ejabberd, not role postgres_replica (replicas: psql2server)"),
    ("psql1server", "--node psql1server: has postgres_primary, not role postgres_replica"),
])
def test_promote_refuses_a_node_that_is_not_a_replica_before_connecting(node, what):
    run = RecordingRun(lab(), secrets=SECRETS)
    with pytest.raises(UserError, match=re.escape(what)):
        rescue.promote.body.runbook(run, node=node, yes=True, force=True)
    assert run.connected == []


def test_promote_without_a_replica_is_refused_before_connecting():
    run = RecordingRun(lab(roles={"psql2server": []}), secrets=SECRETS)
    with pytest.raises(UserError, match="no host has role postgres_replica: nothing to promote"):
        rescue.promote.body.runbook(run, yes=True)
    assert run.connected == []


@pytest.mark.parametrize("host,what", [
    ("nosuchhost", "'nosuchhost' is not a host of"),
    ("psql1server", "psql1server is the current primary (role postgres_primary): nothing to rejoin"),
    ("e1server", "e1server has ejabberd, not a PostgreSQL role"),
    ("r1server", "r1server has spare, not a PostgreSQL role"),
])
def test_rejoin_refuses_before_connecting(host, what):
    run = RecordingRun(lab(), secrets=SECRETS)
    with pytest.raises(UserError, match=re.escape(what)):
        rescue.rejoin.body.runbook(run, host, yes=True)
    assert run.connected == []


def test_rejoin_names_the_roles_file_that_made_a_host_the_primary(tmp_path):
    path = site(tmp_path)
    (tmp_path / "lab.roles.yml").write_text("hosts:\n  psql1server: [postgres_replica]\n"
                                            "  psql2server: [postgres_primary]\n")
    run = RecordingRun(load(path), secrets=SECRETS)
    with pytest.raises(UserError, match=re.escape(f"psql2server is the current primary (role postgres_primary "
                                                  f"recorded in {tmp_path / 'lab.roles.yml'})")):
        rescue.rejoin.body.runbook(run, "psql2server", yes=True)
    assert run.connected == []


def test_the_tasks_are_in_the_postgres_collection_with_that_title():
    import tasks
    from fabfile.core.tasks import _task_title

    coll = tasks.ns.collections["postgres"]
    assert coll.tasks["promote"] is rescue.promote and coll.tasks["rejoin"] is rescue.rejoin
    assert _task_title(rescue.promote.body.runbook, "postgres") == "postgres.promote"
    assert _task_title(rescue.promote.body.runbook) == "rescue.promote"


# --- the tasks on recording hosts -------------------------------------------------------------------

STATE = psql_c(rescue.STATE_SQL)
NO_SERVER = Result(stderr='psql: error: connection to server on socket "/var/run/postgresql/.s.PGSQL.5432" '
                          "failed: No such file or directory\n", exited=2)


class PgRun(RecordingRun):
    """Recording hosts answering the state query with ``rows`` (host -> psql's row; absent:
    PostgreSQL is down); the hosts in ``down`` cannot be connected to. ``order`` is every
    (host, command), in the order they ran, across hosts."""

    def __init__(self, inv, *, rows: dict[str, str], down=(), **kw):
        self.down, self.order = set(down), []

        def respond(h, cmd, stdin):
            self.order.append((h.name, cmd))
            if cmd == STATE:
                return Result(rows[h.name] + "\n") if h.name in rows else NO_SERVER
            return None

        super().__init__(inv, responder=respond, secrets=dict(SECRETS), **kw)

    def _try_connect(self, host):
        if host in self.down:
            return f"{host} ({self.inv.management_address(host)}:22): unreachable (no answer in 5s)"
        return super()._try_connect(host)

    def changes(self) -> list[tuple[str, str]]:
        """The changing commands of every host, in the order they ran."""
        changing = {(name, c) for name, s in self._sessions.items() for c in s.changes}
        return [(h, c) for h, c in self.order if (h, c) in changing]


@pytest.fixture
def no_terminal(monkeypatch):
    monkeypatch.setattr(sys, "stdin", io.StringIO(""))


@pytest.fixture
def tiers(monkeypatch):
    """The tier steps promote and rejoin call, recorded (they have tests of their own)."""
    calls = []

    def on_host(step):
        return lambda h: calls.append((step, h.name, topology.pg_primary(h.inv)))

    monkeypatch.setattr(postgres, "_configure", on_host("configure"))
    monkeypatch.setattr(postgres, "_primary", on_host("primary"))
    monkeypatch.setattr(ejabberd, "converge", lambda run: calls.append(("ejabberd", topology.pg_primary(run.inv))))
    return calls


PROMOTE = psql_c("SELECT pg_promote(true, 60)") + " | grep -qx t"
FENCE = f"systemctl stop {postgres.UNIT} && runuser -u postgres -- touch {postgres.STANDBY_SIGNAL}"
OUT_OF_RECOVERY = (r"grep -qx f", Result())


def test_promote_check_mode_shows_the_evidence_and_plan_and_changes_nothing(tmp_path, tiers):
    run = PgRun(load(site(tmp_path)), rows={"psql2server": "t|0/3000060|1|streaming 10.200.1.10"},
                down={"psql1server"}, check=True)
    rescue.promote.body.runbook(run)
    assert run.changes() == [] and tiers == []
    assert not (tmp_path / "lab.roles.yml").exists()
    out = run.output
    assert "-> psql2server" in out and "no answer in 5s" in out
    assert "plan: promote psql2server, record the new roles in lab.roles.yml" in out and "fence" not in out


def test_promote_refused_while_the_primary_answers_shows_the_evidence(tmp_path, tiers):
    run = PgRun(load(site(tmp_path)), rows={"psql1server": "f|0/5000000|1|",
                                            "psql2server": "t|0/5000000|1|streaming 10.200.1.10"})
    with pytest.raises(UserError, match="two primaries"):
        rescue.promote.body.runbook(run, yes=True)
    assert run.changes() == [] and tiers == []
    assert "PRIMARY" in run.output and "chosen" not in run.output
    assert not (tmp_path / "lab.roles.yml").exists()


def test_promote_asks_and_without_a_terminal_changes_nothing(tmp_path, tiers, no_terminal):
    run = PgRun(load(site(tmp_path)), rows={"psql2server": "t|0/3000060|1|"}, down={"psql1server"})
    with pytest.raises(UserError, match="no terminal to confirm on: re-run with --yes"):
        rescue.promote.body.runbook(run)
    assert run.changes() == [] and tiers == []
    assert not (tmp_path / "lab.roles.yml").exists()


def test_promote_with_the_primary_gone(tmp_path, tiers):
    path = site(tmp_path, synchronous=False)
    run = PgRun(load(path), rows={"psql2server": "t|0/3000060|1|"}, down={"psql1server"},
                answers={"psql2server": [OUT_OF_RECOVERY]})
    rescue.promote.body.runbook(run, yes=True)
    assert run.changes() == [("psql2server", PROMOTE)]
    assert "psql1server" not in run._sessions  # never reached: nothing sent to it
    assert run.session("psql2server").uploads == {}  # synchronous replication is off: no async file
    # the swap is recorded beside the inventory, and the run goes on with it
    recorded = load(path)
    assert topology.pg_primary(recorded) == "psql2server" and topology.pg_replicas(recorded) == ["psql1server"]
    assert topology.pg_primary(run.inv) == "psql2server" and run.inv.overridden == recorded.overridden
    assert tiers == [("configure", "psql2server", "psql2server"), ("primary", "psql2server", "psql2server"),
                     ("ejabberd", "psql2server")]
    log = run.report.log_path.read_text()
    assert ("Make the same change in " + str(path) + ": hosts.psql1server.roles: [postgres_replica]; "
            "hosts.psql2server.roles: [postgres_primary], then delete lab.roles.yml") in log
    assert "When psql1server is back (it starts read-only): inv postgres.rejoin psql1server" in run.output


def test_promote_shows_the_inventory_edit_on_the_console(tmp_path, tiers):
    """'[postgres_replica]' is text, not a rich style tag (Report.note escapes it)."""
    path = site(tmp_path, synchronous=False)
    run = PgRun(load(path), rows={"psql2server": "t|0/3000060|1|"}, down={"psql1server"},
                answers={"psql2server": [OUT_OF_RECOVERY]})
    rescue.promote.body.runbook(run, yes=True)
    assert "hosts.psql1server.roles: [postgres_replica]; hosts.psql2server.roles: [postgres_primary]" in run.output


def test_promote_fences_a_reachable_old_primary_first_and_the_other_replicas_follow(tmp_path, tiers):
    path = site(tmp_path, synchronous=True, roles={"r1server": ["postgres_replica"]})
    run = PgRun(load(path), rows={"psql2server": "t|0/3000000|1|streaming 10.200.1.10",
                                  "r1server": "t|0/3000060|1|streaming 10.200.1.10"},
                answers={"r1server": [OUT_OF_RECOVERY], "psql2server": [
                    (re.escape(f"grep -qx {shlex.quote('streaming ' + SPARE_ADDR)}"), Result())]})
    rescue.promote.body.runbook(run, yes=True)
    # r1server has the most WAL; psql1server answers (PostgreSQL down): fenced before the promotion
    assert run.changes() == [("psql1server", FENCE), ("r1server", PROMOTE)]
    # synchronous replication: the new primary starts without waiting for a standby
    async_file = run.session("r1server").uploads[f"{postgres.ASYNC_FILE}.hastack-new"]
    assert "synchronous_standby_names = ''" in async_file
    assert tiers == [("configure", "r1server", "r1server"), ("configure", "psql2server", "r1server"),
                     ("primary", "r1server", "r1server"), ("ejabberd", "r1server")]
    # psql2server, the other replica, is waited for until it streams from the new primary
    assert any(f"pg_stat_wal_receiver' | grep -qx {shlex.quote('streaming ' + SPARE_ADDR)} && exit 0" in c
               for c in run.session("psql2server").commands)
    assert load(path).overridden == {"psql1server": ["postgres_primary"], "r1server": ["postgres_replica"]}


def test_promote_force_stops_a_live_primary(tmp_path, tiers):
    run = PgRun(load(site(tmp_path)), rows={"psql1server": "f|0/5000000|1|",
                                            "psql2server": "t|0/5000000|1|streaming 10.200.1.10"},
                answers={"psql2server": [OUT_OF_RECOVERY]})
    rescue.promote.body.runbook(run, yes=True, force=True)
    assert run.changes() == [("psql1server", FENCE), ("psql2server", PROMOTE)]


# rejoin: after a promotion (the roles file makes psql2server the primary)

SWAPPED = "hosts:\n  psql1server: [postgres_replica]\n  psql2server: [postgres_primary]\n"
REWIND_OK = (r"/pg_rewind ", Result("pg_rewind: Done!\n"))
REWIND_FAILS = (r"/pg_rewind ", Result(stderr="pg_rewind: error: could not find common ancestor of the source "
                                               "and target cluster's timelines\n", exited=1))
# what put() validates with and what _apply reads: they succeed
HOST_OPS = [(r"^sh -n ", Result()), (rf"^runuser -u postgres -- {postgres.BIN}/postgres -C ", Result()),
            (r"pg_isready", Result()), (r"pending_restart", Result("\n")),
            (re.escape(f"grep -qx {shlex.quote('streaming ' + REPLICA_ADDR)}"), Result())]


def swapped_site(tmp_path) -> Path:
    path = site(tmp_path)
    (tmp_path / "lab.roles.yml").write_text(SWAPPED)
    return path


def rejoin_run(tmp_path, row, rewind=REWIND_OK, **kw):
    rows = {"psql2server": "f|0/6000000|2|"}
    if row is not None:
        rows["psql1server"] = row
    return PgRun(load(swapped_site(tmp_path)), rows=rows, answers={"psql1server": [rewind, *HOST_OPS]}, **kw)


def test_rejoin_rewinds_the_former_primary_onto_the_new_one(tmp_path, tiers):
    run = rejoin_run(tmp_path, "f|0/5000100|1|")
    rescue.rejoin.body.runbook(run, "psql1server", yes=True)
    h = run.session("psql1server")
    assert tiers == [("primary", "psql2server", "psql2server")]  # its slot first
    assert h.changes[0] == f"systemctl stop {postgres.UNIT}"
    start = (f"rm -f {postgres.ASYNC_FILE} && runuser -u postgres -- touch {postgres.STANDBY_SIGNAL} "
             f"&& systemctl start {postgres.UNIT}")
    assert start in h.changes
    [rewind] = [c for c in h.commands if "/pg_rewind " in c]
    words = shlex.split(rewind)
    assert f"--target-pgdata={postgres.DATA}" in words
    assert f"--source-server=host={REPLICA_ADDR} port=5432 user={postgres.REWIND_USER} dbname=postgres" in words
    assert h.commands.index(h.changes[0]) < h.commands.index(rewind) < h.commands.index(start)
    assert not any("pg_basebackup" in c or c.startswith(f"mv {postgres.DATA} ") for c in h.changes)
    assert "pg_rewind from psql2server: pg_rewind: Done!" in h.reported("changed")
    # its settings now follow the new primary
    conf = h.uploads[f"{postgres.CONF_FILE}.hastack-new"]
    assert f"primary_conninfo = 'host={REPLICA_ADDR} port=5432 user=replicator" in conf
    assert "psql1server runs as a PRIMARY (timeline 1)" in run.output
    assert run.session("psql2server").changes == []


def test_rejoin_falls_back_to_a_base_backup_when_rewind_cannot(tmp_path, tiers):
    run = rejoin_run(tmp_path, None, rewind=REWIND_FAILS)
    rescue.rejoin.body.runbook(run, "psql1server", yes=True)
    h = run.session("psql1server")
    aside = [c for c in h.changes if c.startswith(f"mv {postgres.DATA} {postgres.DATA}.before-rejoin-")]
    assert len(aside) == 1
    [backup] = [c for c in h.changes if "pg_basebackup" in c]
    words = shlex.split(backup)
    assert words[words.index("-h") + 1] == REPLICA_ADDR and words[words.index("-U") + 1] == "replicator"
    assert words[words.index("-S") + 1] == "replica_psql1server"
    assert h.changes.index(aside[0]) < h.changes.index(backup)
    assert any("could not find common ancestor" in m for m in h.reported("changed"))


def test_rejoin_fresh_skips_rewind(tmp_path, tiers):
    run = rejoin_run(tmp_path, None)
    rescue.rejoin.body.runbook(run, "psql1server", yes=True, fresh=True)
    h = run.session("psql1server")
    assert not any("pg_rewind" in c for c in h.commands)
    assert any("pg_basebackup" in c for c in h.changes)


def test_rejoin_of_a_standby_already_streaming_from_the_primary_does_nothing(tmp_path, tiers):
    run = rejoin_run(tmp_path, f"t|0/6000000|2|streaming {REPLICA_ADDR}")
    rescue.rejoin.body.runbook(run, "psql1server", yes=True)
    assert run.changes() == [] and tiers == []
    assert "already a standby streaming from psql2server on timeline 2; nothing to do" in \
        run.session("psql1server").reported("ok")


def test_rejoin_of_a_standby_on_an_old_timeline_is_rewound(tmp_path, tiers):
    run = rejoin_run(tmp_path, f"t|0/5000000|1|streaming {REPLICA_ADDR}")
    rescue.rejoin.body.runbook(run, "psql1server", yes=True)
    assert any("/pg_rewind " in c for c in run.session("psql1server").commands)


def test_rejoin_is_refused_while_the_primary_does_not_answer_as_primary(tmp_path, tiers):
    run = PgRun(load(swapped_site(tmp_path)), rows={"psql1server": "f|0/5000100|1|"})
    with pytest.raises(UserError, match="the primary psql2server does not answer as a primary .PostgreSQL down"):
        rescue.rejoin.body.runbook(run, "psql1server", yes=True)
    assert run.changes() == [] and tiers == []


def test_rejoin_of_an_unreachable_host_is_refused(tmp_path, tiers):
    run = rejoin_run(tmp_path, None, down={"psql1server"})
    with pytest.raises(UserError, match="psql1server cannot be reached"):
        rescue.rejoin.body.runbook(run, "psql1server", yes=True)
    assert run.changes() == [] and tiers == []


def test_rejoin_check_mode_and_no_terminal_change_nothing(tmp_path, tiers, no_terminal):
    run = rejoin_run(tmp_path, "f|0/5000100|1|", check=True)
    rescue.rejoin.body.runbook(run, "psql1server")
    assert "plan: stop psql1server, pg_rewind (a base backup if it cannot) from psql2server" in run.output
    run = rejoin_run(tmp_path, "f|0/5000100|1|")
    with pytest.raises(UserError, match="no terminal"):
        rescue.rejoin.body.runbook(run, "psql1server")
    for r in (run,):
        assert r.changes() == [] and tiers == []


# --- the postgres tier's settings ------------------------------------------------------------------


def settings(text: str) -> dict[str, str]:
    """conf.d/hastack.conf as {name: value}; every setting once."""
    lines = [line for line in text.splitlines() if line.strip() and not line.lstrip().startswith("#")]
    pairs = [re.fullmatch(r"(\w+) = (.+)", line) for line in lines]
    assert all(pairs), lines
    names = [m[1] for m in pairs]
    assert len(names) == len(set(names)), names
    return {m[1]: m[2] for m in pairs}


def test_postgres_settings_default_to_asynchronous():
    data = lab_data()
    data.pop("postgres", None)
    inv = parse(yaml.safe_dump(data, sort_keys=False), "lab.yml")
    assert (inv.postgres.synchronous, inv.postgres.synchronous_timeout) == (False, 10)
    assert postgres.synchronous_standbys(inv, "psql1server") == []


def test_the_lab_runs_synchronous_replication():
    inv = parse(LAB_TEXT, "lab.yml")
    assert inv.postgres.synchronous is True
    s = settings(render(CONF, inv, "psql1server"))
    assert s["synchronous_standby_names"] == "'ANY 1 (\"psql2server\")'"
    assert "synchronous_standby_names" not in settings(render(CONF, inv, "psql2server"))


@pytest.mark.parametrize("value,what", [
    ({"synchronous_timeout": 0}, "postgres.synchronous_timeout"),
    ({"synchronous_timeout": 3601}, "postgres.synchronous_timeout"),
    ({"synchronous": "sometimes"}, "postgres.synchronous"),
    ({"sync": True}, "postgres.sync: unknown key"),
])
def test_postgres_section_is_validated(value, what):
    data = lab_data()
    data["postgres"] = value
    with pytest.raises(InventoryError, match=re.escape(what)):
        parse(yaml.safe_dump(data, sort_keys=False), "lab.yml")


def test_primary_settings_with_synchronous_replication():
    inv = lab(synchronous=True)
    s = settings(render(CONF, inv, "psql1server"))
    assert "primary_conninfo" not in s
    assert s["synchronous_standby_names"] == "'ANY 1 (\"psql2server\")'"
    assert s["synchronous_commit"] == "on"
    assert s["primary_slot_name"] == "'replica_psql1server'"
    assert s["wal_log_hints"] == "on" and s["recovery_target_timeline"] == "'latest'"


def test_replica_settings_point_at_the_primary():
    inv = lab(synchronous=True)
    s = settings(render(CONF, inv, "psql2server"))
    assert s["primary_conninfo"] == (f"'host={PRIMARY_ADDR} port=5432 user=replicator "
                                     "passfile=/var/lib/postgresql/.pgpass application_name=psql2server'")
    assert s["primary_slot_name"] == "'replica_psql2server'"
    assert "synchronous_standby_names" not in s and "synchronous_commit" not in s
    assert s["wal_log_hints"] == "on"


def test_without_synchronous_replication_no_standby_names():
    inv = lab(synchronous=False)
    for host in ("psql1server", "psql2server"):
        s = settings(render(CONF, inv, host))
        assert "synchronous_standby_names" not in s and "synchronous_commit" not in s
        assert s["wal_log_hints"] == "on"


def test_synchronous_standbys_are_every_replica_after_a_swap():
    inv = lab(synchronous=True, roles={"psql1server": ["postgres_replica"], "psql2server": ["postgres_primary"],
                                       "r1server": ["postgres_replica"]})
    primary_conf = settings(render(CONF, inv, "psql2server"))
    assert primary_conf["synchronous_standby_names"] == "'ANY 1 (\"psql1server\", \"r1server\")'"
    assert "primary_conninfo" not in primary_conf
    for replica in ("psql1server", "r1server"):
        s = settings(render(CONF, inv, replica))
        assert s["primary_conninfo"].startswith(f"'host={REPLICA_ADDR} port=5432 ")
        assert s["primary_conninfo"].endswith(f" application_name={replica}'")


def test_synchronous_without_a_replica_waits_for_nobody():
    inv = lab(synchronous=True, roles={"psql2server": []})
    assert "synchronous_standby_names" not in settings(render(CONF, inv, "psql1server"))


def hba_rows(inv, host) -> set[tuple[str, str, str]]:
    rows = set()
    for line in render(HBA, inv, host).splitlines():
        fields = line.split()
        if fields and fields[0] == "host" and fields[3] not in ("127.0.0.1/32", "::1/128"):
            rows.add((fields[1], fields[2], fields[3]))
    return rows


def test_pg_hba_lets_the_other_postgres_host_rewind_and_no_one_else():
    inv = lab()
    for host, other in (("psql1server", REPLICA_ADDR), ("psql2server", PRIMARY_ADDR)):
        rows = hba_rows(inv, host)
        assert {r for r in rows if r[1] == "rewind"} == {("postgres", "rewind", f"{other}/32")}
        assert ("replication", "replicator", f"{other}/32") in rows
        assert not any(r[1] == "rewind" and r[0] != "postgres" for r in rows)


def test_pg_hba_rewind_rows_follow_the_postgres_hosts():
    inv = lab(roles={"r1server": ["postgres_replica"]})
    assert {r for r in hba_rows(inv, "psql1server") if r[1] == "rewind"} == {
        ("postgres", "rewind", f"{REPLICA_ADDR}/32"), ("postgres", "rewind", f"{SPARE_ADDR}/32")}


def test_pgpass_has_the_replication_and_the_rewind_password():
    entries = [line for line in render(PGPASS, lab(), "psql1server").splitlines()
               if line and not line.startswith("#")]
    assert entries == ["*:5432:replication:replicator:repl-pw", "*:5432:postgres:rewind:rewind-pw"]


def test_systemd_units_name_the_guards():
    inv = lab(synchronous=True)
    dropin = render(DROPIN, inv, "psql1server")
    assert f"ExecStartPre={postgres.START_GUARD}" in dropin.splitlines()
    assert postgres.GUARD_DROPIN.startswith(f"/etc/systemd/system/{postgres.UNIT}.service.d/")
    service = render(SYNC_SERVICE, inv, "psql1server")
    assert f"ExecStart={postgres.SYNC_GUARD}" in service.splitlines()
    assert f"After={postgres.UNIT}.service" in service.splitlines()


# --- the guard scripts -----------------------------------------------------------------------------


def sh_n(text: str, tmp_path: Path) -> subprocess.CompletedProcess:
    script = tmp_path / "script.sh"
    script.write_text(text)
    return subprocess.run(["sh", "-n", str(script)], capture_output=True, text=True)


@pytest.mark.parametrize("name", [START_GUARD, SYNC_GUARD])
@pytest.mark.parametrize("host", ["psql1server", "psql2server", "e1server"])
def test_guard_scripts_pass_sh_n(name, host, tmp_path):
    text = render(name, lab(synchronous=True), host)
    assert text.startswith("#!/bin/sh\n# Managed by hastack (configs/")
    out = sh_n(text, tmp_path)
    assert out.returncode == 0, out.stderr


def test_a_script_with_a_syntax_error_fails_sh_n(tmp_path):
    """The check above can fail: `sh -n` does reject a broken script."""
    assert sh_n("#!/bin/sh\nfor x in a b; do\n", tmp_path).returncode != 0


def peers_line(text: str) -> str:
    [line] = [line for line in text.splitlines() if line.startswith("for peer in ")]
    return line


def test_start_guard_asks_the_other_postgres_hosts():
    inv = lab()
    assert peers_line(render(START_GUARD, inv, "psql1server")) == f"for peer in {REPLICA_ADDR}; do"
    assert peers_line(render(START_GUARD, inv, "psql2server")) == f"for peer in {PRIMARY_ADDR}; do"
    three = lab(roles={"r1server": ["postgres_replica"]})
    assert peers_line(render(START_GUARD, three, "psql2server")) == f"for peer in {PRIMARY_ADDR} {SPARE_ADDR}; do"
    text = render(START_GUARD, inv, "psql1server")
    assert "user=replicator dbname=replication replication=true" in text
    assert "inv postgres.rejoin psql1server" in text


def test_sync_guard_settings():
    text = render(SYNC_GUARD, lab(synchronous=True, timeout=25), "psql1server")
    assert "TIMEOUT=25" in text.splitlines() and f"ASYNC={postgres.ASYNC_FILE}" in text.splitlines()
    assert f"systemctl reload {postgres.UNIT}" in text


SYSTEM_ID = "7301234567890123456"


def stub(folder: Path, name: str, body: str) -> None:
    path = folder / name
    path.write_text("#!/bin/sh\n" + body)
    path.chmod(0o755)


@pytest.fixture
def stubs(tmp_path):
    """A folder of stub commands first on PATH (psql, id, runuser, systemctl, sleep) and one
    STUB folder of what they answer and record; nothing real is asked or changed."""
    bin_dir, box = tmp_path / "bin", tmp_path / "box"
    bin_dir.mkdir()
    box.mkdir()
    stub(bin_dir, "id", 'echo 1000\n')  # not root: the scripts run their commands directly
    stub(bin_dir, "runuser", 'shift 3\nexec "$@"\n')  # runuser -u postgres -- CMD...
    stub(bin_dir, "systemctl", 'echo "$*" >> "$STUB/systemctl.log"\n')
    stub(bin_dir, "pg_controldata", 'cat "$STUB/controldata"\n')
    stub(bin_dir, "psql", '\n'.join([
        'echo "$*" >> "$STUB/psql.log"',
        'case "$*" in',
        '  *pg_is_in_recovery*pg_stat_replication*) r=$(cat "$STUB/recovery"); '
        '[ -n "$r" ] && echo "$r|$(cat "$STUB/streaming")"; exit 0;;',
        '  *pg_is_in_recovery*) cat "$STUB/recovery"; exit 0;;',
        '  *pg_stat_replication*) cat "$STUB/streaming"; exit 0;;',
        'esac',
        'for a in "$@"; do case "$a" in host=*) peer=${a#host=}; peer=${peer%% *};; esac; done',
        '[ -f "$STUB/peer-$peer" ] || exit 2',
        'cat "$STUB/peer-$peer"',
    ]) + "\n")
    stub(bin_dir, "sleep", '\n'.join([  # the sync guard's loop: stopped after $STUB/max turns
        'n=$(cat "$STUB/sleeps" 2>/dev/null || echo 0); n=$((n + 1)); echo "$n" > "$STUB/sleeps"',
        'if [ "$n" -ge "$(cat "$STUB/max")" ]; then kill -TERM "$PPID"; fi',
    ]) + "\n")
    env = {"PATH": f"{bin_dir}:/usr/bin:/bin", "STUB": str(box), "LC_ALL": "C"}
    return bin_dir, box, env


def run_start_guard(tmp_path, stubs, *, timeline=1, peers: dict[str, str] | None = None, signal=False,
                    fresh=False, inv=None, host="psql1server"):
    bin_dir, box, env = stubs
    data = tmp_path / "data"
    data.mkdir()
    if not fresh:
        (data / "PG_VERSION").write_text("15\n")
    if signal:
        (data / "standby.signal").write_text("")
    (box / "controldata").write_text(f"pg_control version number:            1300\n"
                                     f"Database system identifier:           {SYSTEM_ID}\n"
                                     f"Latest checkpoint's TimeLineID:       {timeline}\n"
                                     f"Latest checkpoint's PrevTimeLineID:   {timeline}\n")
    for addr, row in (peers or {}).items():
        (box / f"peer-{addr}").write_text(row + "\n")
    text = render(START_GUARD, inv or lab(), host, pg_data=str(data), pg_bin=str(bin_dir),
                  pg_unit="hastack-test-unit")
    script = tmp_path / "pg-start-guard"
    script.write_text(text)
    out = subprocess.run(["sh", str(script)], env=env, capture_output=True, text=True, timeout=30)
    asked = (box / "psql.log").read_text().splitlines() if (box / "psql.log").exists() else []
    return out, (data / "standby.signal").exists(), asked


def identify(timeline, system=SYSTEM_ID):
    return f"{system} {timeline} 0/5000060 "


def test_start_guard_fences_when_a_peer_is_on_a_newer_timeline(tmp_path, stubs):
    out, fenced, asked = run_start_guard(tmp_path, stubs, timeline=1, peers={REPLICA_ADDR: identify(2)})
    assert out.returncode == 0 and fenced
    assert f"{REPLICA_ADDR} is on timeline 2, this host on 1" in out.stderr
    assert "inv postgres.rejoin psql1server" in out.stderr
    assert len(asked) == 1 and f"host={REPLICA_ADDR} port=5432 user=replicator" in asked[0]
    assert "IDENTIFY_SYSTEM" in asked[0]


@pytest.mark.parametrize("peers", [
    {REPLICA_ADDR: identify(1)},
    {REPLICA_ADDR: identify(3, system="6999999999999999999")},
    {},
], ids=["same timeline", "another cluster", "peer does not answer"])
def test_start_guard_starts_as_it_was_without_proof(tmp_path, stubs, peers):
    out, fenced, asked = run_start_guard(tmp_path, stubs, timeline=1, peers=peers)
    assert out.returncode == 0 and not fenced, out.stderr
    assert len(asked) == 1


def test_start_guard_on_a_newer_timeline_than_its_peer_starts_as_primary(tmp_path, stubs):
    out, fenced, _ = run_start_guard(tmp_path, stubs, timeline=3, peers={REPLICA_ADDR: identify(2)})
    assert out.returncode == 0 and not fenced


def test_start_guard_goes_on_to_the_next_peer(tmp_path, stubs):
    inv = lab(roles={"r1server": ["postgres_replica"]})
    out, fenced, asked = run_start_guard(tmp_path, stubs, inv=inv, peers={SPARE_ADDR: identify(2)})
    assert out.returncode == 0 and fenced
    assert [re.search(r"host=(\S+)", a)[1] for a in asked] == [REPLICA_ADDR, SPARE_ADDR]


@pytest.mark.parametrize("kw", [{"signal": True}, {"fresh": True}], ids=["already a standby", "no cluster yet"])
def test_start_guard_asks_nobody_for_a_standby_or_an_empty_data_directory(tmp_path, stubs, kw):
    out, fenced, asked = run_start_guard(tmp_path, stubs, peers={REPLICA_ADDR: identify(2)}, **kw)
    assert out.returncode == 0 and asked == []
    assert fenced == bool(kw.get("signal"))


def run_sync_guard(tmp_path, stubs, *, recovery="f", streaming="0", turns, timeout=3, async_there=False):
    bin_dir, box, env = stubs
    async_file = tmp_path / "zz-hastack-async.conf"
    if async_there:
        async_file.write_text("synchronous_standby_names = ''\n")
    (box / "recovery").write_text(recovery + "\n")
    (box / "streaming").write_text(streaming + "\n")
    (box / "max").write_text(f"{turns}\n")
    text = render(SYNC_GUARD, lab(synchronous=True, timeout=timeout), "psql1server", pg_async_file=str(async_file),
                  pg_unit="hastack-test-unit")
    script = tmp_path / "pg-syncguard"
    script.write_text(text)
    proc = subprocess.Popen(["sh", str(script)], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        out, err = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    log = box / "systemctl.log"
    return out, async_file, log.read_text().splitlines() if log.exists() else []


def test_sync_guard_turns_synchronous_off_once_after_the_timeout(tmp_path, stubs):
    out, async_file, systemctl = run_sync_guard(tmp_path, stubs, turns=3 + 4, timeout=3)
    assert "synchronous_standby_names = ''" in async_file.read_text()
    assert systemctl == ["reload hastack-test-unit"]  # once, not on every turn after
    assert "synchronous replication is off" in out
    assert oct(async_file.stat().st_mode & 0o777) == "0o644"


def test_sync_guard_waits_the_whole_timeout(tmp_path, stubs):
    # the stub stops it at the start of turn 3: two turns without a standby, timeout 3
    out, async_file, systemctl = run_sync_guard(tmp_path, stubs, turns=3, timeout=3)
    assert not async_file.exists() and systemctl == []


def test_sync_guard_turns_it_on_again_when_a_standby_streams(tmp_path, stubs):
    out, async_file, systemctl = run_sync_guard(tmp_path, stubs, streaming="1", turns=5, async_there=True)
    assert not async_file.exists()
    assert systemctl == ["reload hastack-test-unit"]
    assert "synchronous replication is back on" in out


@pytest.mark.parametrize("recovery", ["t", ""], ids=["standby", "server down"])
def test_sync_guard_does_nothing_on_a_standby_or_without_a_server(tmp_path, stubs, recovery):
    out, async_file, systemctl = run_sync_guard(tmp_path, stubs, recovery=recovery, turns=8, timeout=2)
    assert not async_file.exists() and systemctl == []


# --- rescue.replace and ejabberd.remove-node: refusals, and what they record ----------------------


class DownRun(RecordingRun):
    """Recording hosts; those in ``down`` cannot be connected to."""

    def __init__(self, inv, *, down=(), **kw):
        self.down = set(down)
        super().__init__(inv, **kw)

    def _try_connect(self, host):
        if host in self.down:
            return f"{host} ({self.inv.management_address(host)}:22): unreachable (no answer in 5s)"
        return super()._try_connect(host)


@pytest.mark.parametrize("dead,spare,roles,what", [
    ("nosuchhost", "r1server", {}, "'nosuchhost' is not a host of"),
    ("e2server", "nosuchhost", {}, "--with 'nosuchhost': not a host of"),
    ("psql1server", "r1server", {}, "psql1server is the PostgreSQL primary: `inv postgres.promote` first"),
    ("gw1server", "r1server", {}, "gw1server has gateway: rescue.replace moves the role of an ejabberd node"),
    ("e2server", "psql2server", {}, "--with psql2server: has postgres_replica, not only role spare: it is in use"),
    ("e2server", "r1server", {"r1server": ["ejabberd"]}, "--with r1server: has ejabberd, not only role spare"),
])
def test_replace_refuses_before_connecting(dead, spare, roles, what):
    run = RecordingRun(lab(roles=roles), secrets=SECRETS)
    with pytest.raises(UserError, match=re.escape(what)):
        rescue.replace.body.runbook(run, dead, with_=spare, yes=True)
    assert run.connected == []


def test_replace_refuses_a_spare_without_an_address_on_the_dead_hosts_network():
    data = lab_data()
    data["hosts"]["r1server"]["addresses"].pop("dmz")
    inv = parse(yaml.safe_dump(data, sort_keys=False), ROOT / "inventory/lab.yml")
    with pytest.raises(UserError, match=re.escape("--with r1server: has no address on network(s) dmz, which "
                                                  "e2server's role needs")):
        rescue.check_replace(inv, "e2server", "r1server")
    assert rescue.check_replace(inv, "psql2server", "r1server") == "postgres_replica"  # internal is enough there


def test_replace_refuses_a_dead_host_that_answers_and_changes_nothing(tmp_path):
    path = site(tmp_path)
    run = RecordingRun(load(path), secrets=SECRETS)  # every host answers
    with pytest.raises(UserError, match="e2server answers over SSH: it is not dead.*ejabberd.remove-node"):
        rescue.replace.body.runbook(run, "e2server", with_="r1server", yes=True)
    assert not (tmp_path / "lab.roles.yml").exists()
    assert [c for _, c in run.all_commands()] == []


def test_replace_records_the_spare_and_retires_the_dead_host(tmp_path, monkeypatch):
    path = site(tmp_path)
    run = DownRun(load(path), secrets=SECRETS, down={"e2server"})
    converged = []
    monkeypatch.setattr(rescue, "_reconverge", lambda r: converged.append(
        (topology.ejabberd_nodes(r.inv), sorted(r.inv.retired))))
    rescue.replace.body.runbook(run, "e2server", with_="r1server", yes=True)
    assert converged == [(["e1server", "r1server"], ["e2server"])]
    record = yaml.safe_load((tmp_path / "lab.roles.yml").read_text())
    assert record == {"hosts": {"r1server": ["ejabberd"]}, "retired": ["e2server"]}
    inv = load(path)
    assert "e2server" not in inv.hosts and inv.hosts["r1server"].roles == ["ejabberd"]
    # the spare now serves on the DMZ, where the other ejabberd node is
    assert inv.service_address("r1server") == "10.200.1.5"
    # ... and as a replica it would serve on the internal network
    assert lab(roles={"r1server": ["postgres_replica"]}).service_address("r1server") == SPARE_ADDR


@pytest.mark.parametrize("host,roles,what", [
    ("nosuchhost", {}, "'nosuchhost' is not a host of"),
    ("psql1server", {}, "psql1server has postgres_primary, not role ejabberd"),
    ("e1server", {"e2server": []}, "e1server is the last ejabberd node"),
])
def test_remove_node_refuses_before_connecting(host, roles, what):
    run = RecordingRun(lab(roles=roles), secrets=SECRETS)
    with pytest.raises(UserError, match=re.escape(what)):
        rescue.remove_node.body.runbook(run, host, yes=True)
    assert run.connected == []


def test_remove_node_gives_a_former_spare_its_role_back(tmp_path, monkeypatch):
    path = site(tmp_path)
    (tmp_path / "lab.roles.yml").write_text("hosts:\n  r1server: [ejabberd]\nretired: [e2server]\n")
    members = "ejabberd@e1server\nejabberd@r1server\n"
    run = RecordingRun(load(path), secrets=SECRETS, answers={
        "e1server": [(r"list_cluster", Result(stdout=members))],
        "*": [(r"systemctl show", Result(stdout="ActiveState=active\nUnitFileState=enabled\n"))],
    })
    monkeypatch.setattr(rescue, "_reconverge", lambda r: None)
    monkeypatch.setattr(rescue.keepalived, "_keepalived", lambda h: h.ok("no VIP"))
    rescue.remove_node.body.runbook(run, "r1server", yes=True)
    assert "ejabberdctl leave_cluster ejabberd@r1server" in [c for h, c in run.all_commands() if h == "e1server"]
    assert any("systemctl stop ejabberd" in c for h, c in run.all_commands() if h == "r1server")
    assert yaml.safe_load((tmp_path / "lab.roles.yml").read_text()) == {"retired": ["e2server"]}
