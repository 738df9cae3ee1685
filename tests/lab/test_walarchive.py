"""The WAL archive on real lab hosts (issue 13): pgBackRest with its repository on
the backup host, over TLS with the site's CA.

- Every segment reaches the archive: a write and a WAL switch on the primary,
  the segment in the repository, `inv postgres.status` names it; `pgbackrest
  verify` finds the archive and the base backups whole.
- The archive target down: pgBackRest's server stopped on the backup host;
  PostgreSQL counts failures (pg_stat_archiver) and keeps the segments
  (.ready in archive_status); started again, the backlog drains, nothing is
  missing.
- Point in time: rows A, the time, rows B; `inv postgres.restore --on
  r1server --to TIME`: r1server has exactly A. Refusals (the live primary as
  target, a time before the oldest base backup) change nothing.
"""

from __future__ import annotations

import json
import time

import pytest

from fabfile import walarchive
from fabfile.core import topology
from tests.lab.test_xmpp import PSQL, ok, wait_for

pytestmark = pytest.mark.lab

BK = f"runuser -u {walarchive.REPO_USER} -- pgbackrest --stanza={walarchive.STANZA}"


def psql(lab, host: str, query: str, db: str = "postgres", check: bool = True) -> str:
    return lab.run(host, f"{PSQL} -d {db} -c {json.dumps(query)}", check=check).stdout.strip()


def info(lab, bk: str) -> dict:
    return json.loads(lab.run(bk, f"{BK} --output=json info", check=True).stdout)[0]


def archived_max(lab, bk: str) -> str:
    archives = info(lab, bk).get("archive") or [{}]
    return max((a.get("max") or "") for a in archives)


@pytest.fixture(scope="module")
def wal(lab):
    inv = lab.inv
    if topology.wal_archive(inv) != "pgbackrest":
        pytest.skip("the lab inventory does not archive WAL with pgBackRest")
    lab.converge("walarchive.deploy")
    prim, bk = topology.pg_primary(inv), topology.backup_host(inv)
    psql(lab, prim, "CREATE TABLE IF NOT EXISTS wal_probe (id int PRIMARY KEY, batch text)")
    psql(lab, prim, "TRUNCATE wal_probe")
    yield {"inv": inv, "primary": prim, "bk": bk, "spare": inv.with_role(topology.SPARE)[0]}
    lab.run(bk, f"systemctl start {walarchive.SERVER_UNIT}")
    psql(lab, prim, "DROP TABLE IF EXISTS wal_probe", check=False)


def switch(lab, prim: str) -> str:
    """A WAL switch on the primary; the name of the segment it closed."""
    return psql(lab, prim, "SELECT pg_walfile_name(pg_switch_wal())")


def test_every_segment_reaches_the_archive(lab, wal):
    prim, bk = wal["primary"], wal["bk"]
    assert info(lab, bk).get("backup"), "the deploy took a first full base backup"
    psql(lab, prim, "INSERT INTO wal_probe SELECT g, 'first' FROM generate_series(1, 100) g")
    segment = switch(lab, prim)
    wait_for(lambda: archived_max(lab, bk) >= segment, 60, f"{segment} in the repository")
    out = lab.invoke("postgres.status")
    ok(out)
    assert "archiver: " in out.stdout and "FAILING NOW" not in out.stdout, out.stdout
    verify = lab.run(bk, f"{BK} verify", timeout=600)
    assert verify.returncode == 0, verify.stdout + verify.stderr


def test_base_backups_on_a_schedule_and_on_demand(lab, wal):
    bk = wal["bk"]
    for timer in walarchive.TIMERS.values():
        state = lab.run(bk, f"systemctl is-enabled {timer}.timer; systemctl is-active {timer}.timer").stdout.split()
        assert state == ["enabled", "active"], (timer, state)
        nxt = lab.run(bk, f"systemctl show -p NextElapseUSecRealtime --value {timer}.timer").stdout.strip()
        assert nxt and nxt != "n/a", (timer, nxt)
    out = lab.invoke("postgres.backup", "--type", "diff", timeout=1800)
    ok(out)
    newest = info(lab, bk)["backup"][-1]
    assert newest["type"] == "diff" and newest["label"] in out.stdout, out.stdout[-2000:]
    bad = lab.invoke("postgres.backup", "--type", "weekly")
    assert bad.returncode == 1 and "full, diff, incr" in bad.stdout + bad.stderr


def test_a_down_archive_keeps_the_segments_and_the_backlog_drains(lab, wal):
    prim, bk = wal["primary"], wal["bk"]
    failed_before = int(psql(lab, prim, "SELECT failed_count FROM pg_stat_archiver"))
    lab.run(bk, f"systemctl stop {walarchive.SERVER_UNIT}", check=True)
    try:
        kept = []
        for i in range(3):
            psql(lab, prim, f"INSERT INTO wal_probe SELECT g, 'outage' FROM generate_series({1000 + i * 10}, "
                            f"{1009 + i * 10}) g")
            kept.append(switch(lab, prim))
        wait_for(lambda: int(psql(lab, prim, "SELECT failed_count FROM pg_stat_archiver")) > failed_before, 90,
                 "pg_stat_archiver counting failures")
        ready = lab.run(prim, f"ls {walarchive.PG_DATA}/pg_wal/archive_status/", check=True).stdout.split()
        assert all(f"{s}.ready" in ready for s in kept), f"PostgreSQL keeps {kept}: {ready}"
        assert archived_max(lab, bk) < kept[0], "nothing reached the archive while it was down"
        out = lab.invoke("postgres.status")
        assert "FAILING NOW" in out.stdout, out.stdout
    finally:
        lab.run(bk, f"systemctl start {walarchive.SERVER_UNIT}", check=True)
    wait_for(lambda: archived_max(lab, bk) >= kept[-1], 180, "the backlog archived")
    wait_for(lambda: not [f for f in lab.run(prim, f"ls {walarchive.PG_DATA}/pg_wal/archive_status/").stdout.split()
                          if f.endswith(".ready")], 60, "no segment left waiting")
    verify = lab.run(bk, f"{BK} verify", timeout=600)
    assert verify.returncode == 0, verify.stdout + verify.stderr


def test_point_in_time_restore_onto_the_spare(lab, wal):
    prim, spare = wal["primary"], wal["spare"]
    psql(lab, prim, "INSERT INTO wal_probe SELECT g, 'A' FROM generate_series(5000, 5049) g")
    time.sleep(1.5)
    when = psql(lab, prim, "SELECT to_char(now() AT TIME ZONE 'UTC', 'YYYY-MM-DD HH24:MI:SS.US')") + "+00:00"
    time.sleep(1.5)
    psql(lab, prim, "INSERT INTO wal_probe SELECT g, 'B' FROM generate_series(6000, 6049) g")
    segment = switch(lab, prim)
    wait_for(lambda: archived_max(lab, wal["bk"]) >= segment, 90, f"{segment} in the repository")
    try:
        # --force: the spare may hold a cluster from an earlier use (a rescue made it a replica)
        out = lab.invoke("postgres.restore", "--on", spare, "--to", when, "--force", timeout=1800)
        ok(out)
        counts = psql(lab, spare, "SELECT batch || '=' || count(*) FROM wal_probe WHERE batch IN ('A', 'B') "
                                  "GROUP BY batch ORDER BY batch")
        assert counts == "A=50", f"{spare} restored to {when}: {counts!r}"
        # A second restore onto a host that now holds a cluster needs --force.
        again = lab.invoke("postgres.restore", "--on", spare, "--to", when)
        assert again.returncode == 1 and "--force" in again.stdout + again.stderr, again.stdout
    finally:
        # The spare as a fresh install again (rescue.replace may make it a replica).
        lab.run(spare, "pg_dropcluster --stop 15 main; pg_createcluster 15 main --start >/dev/null", timeout=300)


def test_restore_refusals_change_nothing(lab, wal):
    prim = wal["primary"]
    cases = [
        (("postgres.restore", "--on", prim, "--to", "2026-01-01 00:00:00", "--force"), "is the inventory's primary"),
        (("postgres.restore", "--on", wal["spare"], "--to", "2000-01-01 00:00:00", "--force"),
         "before the oldest base backup"),
        (("postgres.restore", "--on", "e1server", "--to", "2000-01-01 00:00:00"), "restore onto a PostgreSQL host"),
    ]
    before = psql(lab, prim, "SELECT pg_is_in_recovery()")
    for args, expected in cases:
        out = lab.invoke(*args)
        assert out.returncode == 1, out.stdout
        assert expected in out.stdout + out.stderr, out.stdout[-3000:]
        assert "Traceback" not in out.stdout + out.stderr
    assert psql(lab, prim, "SELECT pg_is_in_recovery()") == before == "f"
