"""The WAL archive without hosts: the files the walarchive and postgres tiers render
for each mode (pgBackRest over TLS, the seed's NFS export), the archive hook run
for real against a folder, the firewall rows of each mode, `postgres.restore`'s
refusals (before any connection, and on a target that runs a primary), the time
it restores to, and postgres.status's archiver line."""

from __future__ import annotations

import datetime as dt
import re
import shlex
import subprocess
from pathlib import Path

import pytest
import yaml

from fabfile import postgres, walarchive
from fabfile.core import Result, UserError, flows, templates, topology
from fabfile.core.inventory import parse
from fabfile.core.testing import RecordingRun

ROOT = Path(__file__).resolve().parents[2]
LAB_TEXT = (ROOT / "inventory/lab.yml").read_text()
CONF = "walarchive/etc/pgbackrest/pgbackrest.conf.j2"
HOOK = "postgres/usr/local/lib/hastack/pg-wal-archive.j2"
PG_CONF = "postgres/etc/postgresql/15/main/conf.d/hastack.conf.j2"
SECRETS = {postgres.SECRET_DB: "db-pw", postgres.SECRET_REPL: "repl-pw", postgres.SECRET_REWIND: "rewind-pw"}


def lab(mode: str | None = "pgbackrest", *, backup_host: bool = True):
    data = yaml.safe_load(LAB_TEXT)
    if mode is not None:
        data["backup"]["wal_archive"] = mode
    if not backup_host:
        data["hosts"]["bk1server"]["roles"] = []
        data.pop("backup")
    return parse(yaml.safe_dump(data, sort_keys=False), ROOT / "inventory/lab.yml")


def render(name: str, inv, host: str, vars_fn) -> str:
    secret = SECRETS.get
    return templates.render(name, inv, host, secret, **vars_fn(inv, host, secret))


def settings(text: str) -> list[tuple[str, str]]:
    return [tuple(line.split("=", 1)) for line in text.splitlines() if "=" in line and not line.startswith("#")]


# --- pgBackRest's configuration ------------------------------------------------------


def test_a_postgres_host_pushes_to_the_backup_host_and_serves_only_it():
    text = render(CONF, lab(), "psql1server", walarchive.conf_vars)
    kv = settings(text)
    assert ("repo1-host", "bk1server.lab.test") in kv and ("repo1-host-type", "tls") in kv
    assert ("repo1-host-cert-file", "/etc/ssl/hastack/psql1server.crt") in kv
    assert ("tls-server-address", "10.200.1.10") in kv
    assert [v for k, v in kv if k == "tls-server-auth"] == ["bk1server.lab.test=xmpp"]
    assert ("pg1-path", "/var/lib/postgresql/15/main") in kv
    assert "repo1-path" not in dict(kv)


def test_the_backup_host_holds_the_repository_and_reaches_every_postgres_host():
    text = render(CONF, lab(), "bk1server", walarchive.conf_vars)
    kv = settings(text)
    assert ("repo1-path", "/srv/pgbackrest") in kv and ("repo1-retention-full", "2") in kv
    assert ("pg1-host", "psql1server.lab.test") in kv and ("pg2-host", "psql2server.lab.test") in kv
    assert ("pg1-host-cert-file", "/etc/ssl/hastack/bk1server.crt") in kv
    # The PostgreSQL hosts push WAL; the spare restores: nobody else.
    assert sorted(v for k, v in kv if k == "tls-server-auth") == [
        "psql1server.lab.test=xmpp", "psql2server.lab.test=xmpp", "r1server.lab.test=xmpp"]
    assert "repo1-host" not in dict(kv)


def test_the_firewall_opens_pgbackrest_in_its_mode_and_nfs_in_the_other():
    def ports(inv, host):
        return {(a.ports if isinstance(a.ports, str) else "") for a in flows.rows(inv, host)
                if a.when is None or a.when(inv)}
    assert "8432" in ports(lab("pgbackrest"), "bk1server") and "2049" not in ports(lab("pgbackrest"), "bk1server")
    assert "8432" in ports(lab("pgbackrest"), "psql2server")
    assert "2049" in ports(lab("nfs"), "bk1server") and "8432" not in ports(lab("nfs"), "bk1server")
    assert "8432" not in ports(lab("nfs"), "psql1server")


# --- the archive hook and archive_mode --------------------------------------------------


def test_pgbackrest_mode_archives_through_archive_push_and_nfs_through_the_hook():
    conf = render(PG_CONF, lab("pgbackrest"), "psql1server", postgres.template_vars)
    assert "archive_mode = on" in conf and "archive_command = 'pgbackrest --stanza=xmpp archive-push %p'" in conf
    conf = render(PG_CONF, lab("nfs"), "psql1server", postgres.template_vars)
    assert "archive_mode = on" in conf and "archive_command = '/usr/local/lib/hastack/pg-wal-archive %p %f'" in conf


def test_without_a_backup_host_archive_mode_is_off_and_the_hook_refuses():
    inv = lab(backup_host=False)
    assert topology.wal_archive(inv) is None
    conf = render(PG_CONF, inv, "psql1server", postgres.template_vars)
    assert "archive_mode = off" in conf and "archive_command" not in conf
    hook = render(HOOK, inv, "psql1server", postgres.template_vars)
    assert "exit 1" in hook and "exit 0" not in hook


def test_nfs_hook_copies_a_segment_once_and_never_over_a_different_one(tmp_path):
    inv = lab("nfs")
    hook = render(HOOK, inv, "psql1server", postgres.template_vars).replace(topology.WAL_MOUNT, str(tmp_path / "mnt"))
    script = tmp_path / "hook"
    script.write_text(hook)
    subprocess.run(["sh", "-n", str(script)], check=True)
    seg = tmp_path / "000000010000000000000001"
    seg.write_bytes(b"wal" * 1000)

    def run():
        return subprocess.run(["sh", str(script), str(seg), seg.name], capture_output=True, text=True)
    assert run().returncode == 0
    archived = tmp_path / "mnt/wal" / seg.name
    assert archived.read_bytes() == seg.read_bytes()
    assert run().returncode == 0  # a retry of the same segment
    seg.write_bytes(b"other")
    r = run()
    assert r.returncode == 1 and "exists and differs" in r.stderr
    assert archived.read_bytes() == b"wal" * 1000
    missing = subprocess.run(["sh", str(script), str(tmp_path / "nope"), "nope"], capture_output=True, text=True)
    assert missing.returncode == 1


def test_nfs_exports_each_host_its_own_folder_to_its_own_address_root_squashed():
    inv = lab("nfs")
    text = render("walarchive/etc/exports.d/hastack-walarchive.exports.j2", inv, "bk1server", walarchive.nfs_vars)
    lines = [line for line in text.splitlines() if line and not line.startswith("#")]
    assert lines == ["/srv/pgbackrest/psql1server 10.200.1.10(rw,sync,root_squash,no_subtree_check)",
                     "/srv/pgbackrest/psql2server 10.200.1.11(rw,sync,root_squash,no_subtree_check)"]
    line = walarchive.fstab_line(inv, "psql2server")
    assert line.startswith("10.200.1.12:/srv/pgbackrest/psql2server /var/lib/postgresql/walarchive nfs4 ")
    assert "x-systemd.automount" in line and "_netdev" in line


# --- postgres.restore ------------------------------------------------------------------------


NOW = dt.datetime(2026, 12, 1, 12, 0, tzinfo=dt.timezone.utc)


def test_restore_time_is_read_in_the_site_time_zone_and_never_in_the_future():
    inv = lab()
    assert walarchive.restore_target_time(inv, "2026-12-01 10:15:00", NOW) == dt.datetime(
        2026, 12, 1, 10, 15, tzinfo=dt.timezone.utc)
    assert walarchive.restore_target_time(inv, "2026-12-01 11:15:00+01:00", NOW).astimezone(
        dt.timezone.utc).hour == 10
    with pytest.raises(UserError, match="in the future"):
        walarchive.restore_target_time(inv, "2026-12-01 12:00:01", NOW)
    with pytest.raises(UserError, match="not a time"):
        walarchive.restore_target_time(inv, "yesterday; rm -rf /", NOW)


def test_restore_picks_the_newest_base_backup_before_the_time_and_refuses_one_before_all():
    t = lambda h: NOW.replace(hour=h).timestamp()  # noqa: E731
    backups = [{"label": "A", "timestamp": {"start": t(1), "stop": t(2)}},
               {"label": "B", "timestamp": {"start": t(5), "stop": t(6)}}]
    assert walarchive.check_after_oldest(NOW.replace(hour=7), backups, "x")["label"] == "B"
    assert walarchive.check_after_oldest(NOW.replace(hour=3), backups, "x")["label"] == "A"
    with pytest.raises(UserError, match="before the oldest base backup"):
        walarchive.check_after_oldest(NOW.replace(hour=1), backups, "x")
    with pytest.raises(UserError, match="no base backup yet"):
        walarchive.check_after_oldest(NOW, [], "x")


@pytest.mark.parametrize("kw,what", [
    ({"on": "e1server"}, "--on 'e1server': restore onto a PostgreSQL host or a spare"),
    ({"on": "nosuch"}, "--on 'nosuch'"),
    ({"to": "soon"}, "not a time"),
    ({"to": "2999-01-01 00:00:00"}, "in the future"),
])
def test_restore_refuses_bad_input_before_connecting(kw, what):
    run = RecordingRun(lab(), secrets=SECRETS)
    args = {"to": "2026-01-01 00:00:00", **kw}
    with pytest.raises(UserError, match=re.escape(what)):
        walarchive.restore.body.runbook(run, **args)
    assert run.connected == []


def test_restore_needs_pgbackrest_mode():
    run = RecordingRun(lab("nfs"), secrets=SECRETS)
    with pytest.raises(UserError, match="backup.wal_archive: pgbackrest"):
        walarchive.restore.body.runbook(run, to="2026-01-01 00:00:00")
    assert run.connected == []


def _info(stop: float) -> str:
    return ('[{"name":"xmpp","status":{"code":0,"message":"ok"},"backup":[{"label":"20261201-010000F",'
            f'"type":"full","timestamp":{{"start":{stop - 60},"stop":{stop}}}}}],"archive":[]}}]')


@pytest.mark.parametrize("target,force", [("psql1server", True), ("psql2server", False)])
def test_restore_refuses_a_running_primary_and_an_unforced_cluster(target, force):
    stop = dt.datetime(2026, 1, 1, tzinfo=dt.timezone.utc).timestamp()
    answers = {"bk1server": [(r"pgbackrest .*info", Result(_info(stop)))],
               target: [(r"PG_VERSION", Result("cluster\nactive\nf\n"))]}
    run = RecordingRun(lab(), secrets=SECRETS, answers=answers)
    with pytest.raises(UserError, match="is the inventory's primary|runs a PostgreSQL primary"):
        walarchive.restore.body.runbook(run, to="2026-06-01 00:00:00", on=target, force=force)
    assert all(not s.changes for s in run._sessions.values())


def test_restore_onto_the_spare_stops_empties_restores_to_the_time_and_waits_for_promotion():
    stop = dt.datetime(2026, 1, 1, tzinfo=dt.timezone.utc).timestamp()
    answers = {"bk1server": [(r"pgbackrest .*info", Result(_info(stop)))],
               "r1server": [(r"PG_VERSION", Result("inactive\n")), (r"pg_is_in_recovery", Result("f\n"))]}
    run = RecordingRun(lab(), secrets=SECRETS, answers=answers)
    walarchive.restore.body.runbook(run, to="2026-06-01 00:00:00", force=False)
    changes = run.session("r1server").changes
    restore = next(c for c in changes if "pgbackrest" in c and " restore" in c)
    assert "--type=time --target='2026-06-01 00:00:00+00' --target-action=promote --set=20261201-010000F" in restore
    assert changes.index(restore) > next(i for i, c in enumerate(changes) if "find /var/lib/postgresql/15/main" in c)
    assert run.session("bk1server").changes == []


# --- postgres.status: the archiver -------------------------------------------------------


def test_archiver_line_names_the_last_segment_the_failures_and_the_backlog():
    ok = postgres.archiver_line("on|12|00000001000000000000000C|2026-12-01 10:00:00|0|||0")
    assert ok == "archiver: 12 archived, last 00000001000000000000000C at 2026-12-01 10:00:00; 0 waiting"
    failing = postgres.archiver_line(
        "on|12|00000001000000000000000C|2026-12-01 10:00:00|3|00000001000000000000000D|2026-12-01 10:05:00|2")
    assert "3 failed, last 00000001000000000000000D at 2026-12-01 10:05:00 (FAILING NOW); 2 waiting" in failing
    assert postgres.archiver_line("off|0||||||0") == "archiver: off (no WAL archive)"
    assert postgres.archiver_line("garbage").startswith("archiver: unknown")


# --- nfs mode on recording hosts -------------------------------------------------------------


def test_nfs_mode_exports_then_mounts_and_schedules_base_backups():
    inv = lab("nfs")
    ids = [(r"^echo \$\(id -u postgres\)", Result("108:114\n"))]
    run = RecordingRun(inv, secrets=SECRETS, answers={"psql1server": ids, "psql2server": ids})
    walarchive.converge(run)
    bk = run.session("bk1server")
    assert any("apt-get install" in c and "nfs-kernel-server" in c for c in bk.changes)
    assert "exportfs -ra" in bk.changes
    exports = bk.uploads[f"{walarchive.NFS_EXPORTS}.hastack-new"]
    assert "/srv/pgbackrest/psql1server 10.200.1.10(rw,sync,root_squash,no_subtree_check)" in exports
    assert "systemctl start nfs-server" in bk.changes
    assert "chown 108:114 /srv/pgbackrest/psql2server" in bk.changes
    for host in ("psql1server", "psql2server"):
        h = run.session(host)
        assert any("apt-get install" in c and "nfs-common" in c for c in h.changes)
        [fstab] = [c for c in h.changes if "/etc/fstab" in c]
        assert walarchive.fstab_line(inv, host) in shlex.split(fstab)
        unit = h.uploads[f"/etc/systemd/system/{walarchive.BASEBACKUP_UNIT}.service.hastack-new"]
        assert "RequiresMountsFor=/var/lib/postgresql/walarchive" in unit
        assert "pg_is_in_recovery" in unit and "head -n -2" in unit  # only the primary; two kept
        timer = h.uploads[f"/etc/systemd/system/{walarchive.BASEBACKUP_UNIT}.timer.hastack-new"]
        assert "OnCalendar=Sun *-*-* 01:30" in timer
        assert f"systemctl start {walarchive.BASEBACKUP_UNIT}.timer" in h.changes
    # pgBackRest is not part of the nfs mode
    assert not any(c.startswith("pgbackrest") or "-u pgbackrest" in c or "hastack-pgbackrest" in c
                   for _, c in run.all_commands())


def test_the_calendar_expressions_are_systemd_ones():
    inv = lab()
    for expr in (inv.backup.base_backup_full, inv.backup.base_backup_diff):
        r = subprocess.run(["systemd-analyze", "calendar", expr], capture_output=True, text=True)
        assert r.returncode == 0, (expr, r.stderr)


def test_a_good_base_backup_writes_one_series_for_the_stanza_and_a_failed_one_none(tmp_path):
    text = render("walarchive/usr/local/lib/hastack/pgbackrest-backup.j2", lab(), "bk1server",
                  walarchive.template_vars).replace(walarchive.TEXTFILE, str(tmp_path / "prom/b.prom"))
    script = tmp_path / "backup"
    script.write_text(text)
    stubs = tmp_path / "bin"
    stubs.mkdir()
    (stubs / "runuser").write_text("#!/bin/sh\nexit ${STUB_EXIT:-0}\n")
    (stubs / "runuser").chmod(0o755)
    env = {"PATH": f"{stubs}:/usr/bin:/bin"}
    for kind in ("full", "diff"):
        assert subprocess.run(["sh", str(script), kind], env=env).returncode == 0
    lines = (tmp_path / "prom/b.prom").read_text().splitlines()
    assert len(lines) == 1 and lines[0].startswith(
        'hastack_backup_last_success_timestamp_seconds{backup_job="pgbackrest-xmpp"} ')
    before = (tmp_path / "prom/b.prom").read_text()
    assert subprocess.run(["sh", str(script), "full"], env={**env, "STUB_EXIT": "1"}).returncode != 0
    assert (tmp_path / "prom/b.prom").read_text() == before
    assert subprocess.run(["sh", str(script), "weekly"], env=env, capture_output=True).returncode == 2
