"""The backup tier without hosts: Bacula's configurations as rendered for the
shipped inventories (one FileSet/Schedule/Pool triple/Job per inventory job, the
seed's directives, passwords from the secrets, TLS everywhere), the runbook on
recording hosts (converge, converged again), the ops tasks' input checks and
quoting, and the parsing of the catalog's answers."""

from __future__ import annotations

import json
import re
import shlex
import subprocess
from pathlib import Path

import pytest

from fabfile import backup
from fabfile.core import Result, templates
from fabfile.core.sql import scram_verifier
from fabfile.core.errors import StepFailed, UserError
from fabfile.core.inventory import load
from fabfile.core.testing import RecordingRun

ROOT = Path(__file__).resolve().parents[2]
LAB = load(ROOT / "inventory/lab.yml")
JOBS = list(LAB.backup.jobs)


def SECRET(name: str) -> str:
    return f"S{abs(hash(name)) % 10**8:08d}x"


def render(name: str, host: str = "bk1server", inv=LAB) -> str:
    return templates.render(f"backup/etc/bacula/{name}.j2", inv, host, SECRET,
                            **backup.template_vars(inv, host, SECRET))


def resources(text: str, kind: str) -> list[str]:
    """The bodies of every ``kind { ... }`` resource (nested braces included)."""
    out, i = [], 0
    while True:
        m = re.compile(rf"^{kind} {{\n", re.M).search(text, i)
        if not m:
            return out
        depth, j = 1, m.end()
        while depth:
            depth += {"{": 1, "}": -1}.get(text[j], 0)
            j += 1
        out.append(text[m.end():j - 1])
        i = j


def directive(body: str, name: str) -> list[str]:
    return [v.strip().strip('"') for v in re.findall(rf"^\s*{name} = (.*)$", body, re.M)]


# --- rendering ---------------------------------------------------------------------------


def test_one_job_fileset_schedule_and_pool_triple_per_inventory_job():
    text = render("bacula-dir.conf")
    jobs = {directive(b, "Name")[0]: b for b in resources(text, "Job")}
    assert set(jobs) == {*JOBS, backup.RESTORE_JOB}
    assert {directive(b, "Name")[0] for b in resources(text, "FileSet")} == {f"{j}-FS" for j in JOBS}
    assert {directive(b, "Name")[0] for b in resources(text, "Schedule")} == {f"{j}-Sdl" for j in JOBS}
    assert {directive(b, "Name")[0] for b in resources(text, "Pool")} == {
        f"{j}-{lvl}" for j in JOBS for lvl in ("Full", "Diff", "Incr")}
    for name, job in LAB.backup.jobs.items():
        body = jobs[name]
        assert directive(body, "Client") == [f"{job.client}-fd"]
        assert directive(body, "Full Backup Pool") == [f"{name}-Full"]
        assert directive(body, "Differential Backup Pool") == [f"{name}-Diff"]
        assert directive(body, "Incremental Backup Pool") == [f"{name}-Incr"]
        assert directive(body, "JobDefs") == [backup.JOBDEFS]
    restore = jobs[backup.RESTORE_JOB]
    assert directive(restore, "Type") == ["Restore"] and directive(restore, "Where") == [backup.RESTORE_WHERE]


def test_pools_follow_the_seeds_cycle_with_the_inventorys_retention():
    pools = {directive(b, "Name")[0]: b for b in resources(render("bacula-dir.conf"), "Pool")}
    b = LAB.backup
    for name in JOBS:
        for level, days in (("Full", b.full_retention_days), ("Diff", b.diff_retention_days),
                            ("Incr", b.incr_retention_days)):
            body = pools[f"{name}-{level}"]
            for key, want in (("Recycle", "yes"), ("AutoPrune", "yes"), ("Recycle Oldest Volume", "yes"),
                              ("Maximum Volume Bytes", "1G"), ("Maximum Volumes", "3"),
                              ("Volume Retention", f"{days} days"), ("Label Format", f"{name}-{level}-")):
                assert directive(body, key) == [want], (name, level, key)
            jobs = int(directive(body, "Maximum Volume Jobs")[0])
            assert jobs >= backup.SEED_MAX_JOBS[level]
    # hourly incrementals kept 7 days need more than the seed's 14 jobs per volume
    assert int(directive(pools["psql2-dump-Incr"], "Maximum Volume Jobs")[0]) * 2 >= 7 * 22
    assert directive(pools["e1-fs-Incr"], "Maximum Volume Jobs") == ["14"]


def test_schedules_are_the_seeds():
    scheds = {directive(b, "Name")[0]: directive(b, "Run") for b in resources(render("bacula-dir.conf"), "Schedule")}
    assert scheds["e1-fs-Sdl"] == backup.MONTHLY
    assert scheds["psql2-dump-Sdl"][:2] == ["Level=Full at 01:00", "Level=Differential at 13:00"]
    assert len(scheds["psql2-dump-Sdl"]) == 24


def test_filesets_hold_the_paths_and_the_dump():
    sets = {directive(b, "Name")[0]: b for b in resources(render("bacula-dir.conf"), "FileSet")}
    assert directive(sets["mon1-grfn-FS"], "File") == ["/var/lib/grafana", "/var/lib/prometheus",  # then excluded:
                                                       "/var/lib/prometheus/metrics2/wal",
                                                       "/var/lib/prometheus/metrics2/chunks_head"]
    assert directive(sets["psql2-dump-FS"], "File") == ["/var/backups/hastack-dump/ejabberd.sql",
                                                        "/var/backups/hastack-dump/ejabberd.tables"]
    for body in sets.values():
        assert directive(body, "Signature") == ["SHA1"]
        assert directive(body, "No Atime") == ["yes"] and directive(body, "Checkfilechanges") == ["yes"]


def test_dump_job_runs_the_scripts_on_the_client_and_every_job_writes_the_metric():
    jobs = {directive(b, "Name")[0]: b for b in resources(render("bacula-dir.conf"), "Job")}
    dump = jobs["psql2-dump"]
    assert f'Command = "{backup.SCRIPTS["dump_before"]} ejabberd"' in dump
    assert f'Command = "{backup.SCRIPTS["dump_after"]} ejabberd"' in dump
    for name in JOBS:
        assert f'Command = "{backup.SCRIPTS["metric"]} %n %i \'%e\'"' in jobs[name]
    assert "hastack-dump" not in jobs["e1-fs"]


def test_passwords_come_from_the_secrets_and_each_client_has_its_own():
    text = render("bacula-dir.conf")
    clients = {directive(b, "Name")[0]: directive(b, "Password")[0] for b in resources(text, "Client")}
    assert set(clients) == {"e1server-fd", "e2server-fd", "psql2server-fd", "mon1server-fd"}
    for c, pw in clients.items():
        assert pw == SECRET(backup.fd_secret(c.removesuffix("-fd")))
    assert len(set(clients.values())) == len(clients)
    assert directive(resources(text, "Director")[0], "Password") == [SECRET(backup.DIR_SECRET)]
    assert directive(resources(text, "Storage")[0], "Password") == [SECRET(backup.SD_SECRET)]
    assert directive(resources(text, "Catalog")[0], "dbpassword") == [SECRET(backup.CATALOG_SECRET)]
    fd = render("bacula-fd.conf", "e1server")
    assert directive(resources(fd, "Director")[0], "Password") == [SECRET("bacula_fd_e1server")]
    sd = render("bacula-sd.conf")
    assert directive(resources(sd, "Director")[0], "Password") == [SECRET(backup.SD_SECRET)]
    assert directive(resources(render("bconsole.conf"), "Director")[0], "Password") == [SECRET(backup.DIR_SECRET)]
    for t in (text, fd, sd):
        for pw in re.findall(r'[Pp]assword = "([^"]*)"', t):
            assert re.fullmatch(r"S\d{8}x", pw), pw  # never a literal


def test_tls_everywhere_with_the_peers_cn():
    text = render("bacula-dir.conf")
    tls = {"TLS Enable": ["yes"], "TLS Require": ["yes"], "TLS CA Certificate File": ["/etc/ssl/hastack/ca.crt"],
           "TLS Certificate": ["/etc/ssl/hastack/bk1server.crt"], "TLS Key": ["/etc/ssl/hastack/bk1server.key"]}
    for kind in ("Director", "Storage", "Client"):
        for body in resources(text, kind):
            for key, want in tls.items():
                assert directive(body, key) == want, (kind, key)
    clients = {directive(b, "Name")[0]: b for b in resources(text, "Client")}
    assert directive(clients["e1server-fd"], "TLS Allowed CN") == ["e1server.lab.test"]
    # dialled by name: Bacula 9.6 verifies a server against the DNS names of its certificate
    assert directive(resources(text, "Storage")[0], "Address") == ["bk1server.lab.test"]
    # the clients across the gateway are dialled at their own segment address
    assert directive(clients["e1server-fd"], "Address") == ["10.200.1.2"]
    assert directive(clients["psql2server-fd"], "Address") == ["10.200.1.11"]
    fd = render("bacula-fd.conf", "e1server")
    daemon, dird = resources(fd, "FileDaemon")[0], resources(fd, "Director")[0]
    assert directive(daemon, "FDAddress") == ["10.200.1.2"]
    assert directive(daemon, "TLS Key") == ["/etc/ssl/hastack/e1server.key"]
    assert directive(dird, "TLS Verify Peer") == ["yes"] and directive(dird, "TLS Allowed CN") == ["bk1server.lab.test"]
    sd = resources(render("bacula-sd.conf"), "Storage")[0]
    assert directive(sd, "TLS Allowed CN") == [f"{c}.lab.test" for c in ("e1server", "e2server", "psql2server",
                                                                         "mon1server")]
    assert directive(resources(render("bconsole.conf"), "Director")[0], "Address") == ["bk1server.lab.test"]


def test_volume_dir_is_honoured(tmp_path):
    inv_file = tmp_path / "site.yml"
    inv_file.write_text((ROOT / "inventory/lab.yml").read_text().replace(
        "  wal_archive: pgbackrest", "  wal_archive: pgbackrest\n  volume_dir: /data/bacula-vols"))
    inv = load(inv_file)
    device = resources(render("bacula-sd.conf", inv=inv), "Device")[0]
    assert directive(device, "Archive Device") == ["/data/bacula-vols"]
    for key in ("LabelMedia", "Random Access", "AutomaticMount"):
        assert directive(device, key) == ["yes"]


def test_scripts_validate_their_argument_and_keep_other_jobs_metric_lines():
    metric = render("scripts/hastack-backup-metric")
    assert metric.startswith("#!/bin/sh\n")
    assert 'grep -v "backup_job=\\"$job\\""' in metric and 'mv -f "$tmp" "$file"' in metric
    assert f'{backup.METRIC}{{backup_job=\\"$job\\"}} $(date +%s)' in metric
    before = render("scripts/hastack-dump-before", "psql2server")
    assert "*[!a-z0-9_-]*" in before and "pg_export_snapshot()" in before and "umask 077" in before
    assert "chmod 0700 /var/backups/hastack-dump" in before


# --- the runbook on recording hosts ------------------------------------------------------


# a fresh site: certificates there, nothing else; the checkers accept, PostgreSQL answers
FRESH = [
    (r"^test -s /etc/ssl/hastack/\S+ && test -s", Result()),
    (r" -t -c \S+\.hastack-new$", Result()),
    (r"pg_isready", Result()),
    (r"max\(versionid\)", Result("16\n")),
]


def _fresh(run_check=False):
    return RecordingRun(LAB, check=run_check, secrets={})


def test_converge_without_jobs_does_nothing(tmp_path):
    inv_file = tmp_path / "site.yml"
    text = (ROOT / "inventory/lab.yml").read_text()
    text = re.sub(r"\n  jobs:\n(    .*\n)+", "\n", text)
    inv_file.write_text(text)
    run = RecordingRun(load(inv_file))
    backup.converge(run)
    assert run.all_commands() == []
    assert "nothing to do" in run.output


def test_converge_on_a_fresh_site_installs_creates_and_checks_before_replacing():
    run = _fresh()
    run.answers["*"] = FRESH
    backup.converge(run)
    bk = run.session("bk1server")
    assert any("bacula-director-pgsql" in c and "apt-get install" in c for c in bk.changes)
    assert any("bacula-director-pgsql/dbconfig-install boolean false" in s for _, s in bk.stdins)
    assert any("CREATE ROLE \"bacula\" WITH LOGIN PASSWORD 'SCRAM-SHA-256$" in s for _, s in bk.stdins)
    assert any("ENCODING 'SQL_ASCII'" in s and "TEMPLATE template0" in s for _, s in bk.stdins)
    assert any(backup.MAKE_TABLES in c and "--single-transaction" in c for c in bk.changes)
    assert "usermod -a -G ssl-cert bacula" in bk.changes
    checks = [c for c in bk.commands if " -t -c " in c]
    assert any(c.startswith("runuser -u bacula -- /usr/sbin/bacula-dir -t -c /etc/bacula/bacula-dir.conf.hastack-new")
               for c in checks)
    assert any("bacula-sd -t -c /etc/bacula/bacula-sd.conf.hastack-new" in c for c in checks)
    # the check runs before the new file replaces the live one
    i = bk.commands.index(next(c for c in bk.commands if "bacula-dir -t -c" in c))
    j = bk.commands.index("mv -f /etc/bacula/bacula-dir.conf.hastack-new /etc/bacula/bacula-dir.conf")
    assert i < j
    assert "systemctl start bacula-director" in bk.changes
    fd = run.session("e1server")
    assert any("bacula-fd -t -c /etc/bacula/bacula-fd.conf.hastack-new" in c for c in fd.commands)
    assert backup.SCRIPTS["dump_before"] in run.session("psql2server").uploads.get(
        backup.SCRIPTS["dump_before"] + ".hastack-new", "") or backup.SCRIPTS["dump_before"] + ".hastack-new" in \
        run.session("psql2server").uploads
    assert backup.SCRIPTS["dump_before"] + ".hastack-new" not in fd.uploads
    # secrets were generated and saved once for every daemon
    assert all(n in run.secrets for n in (backup.DIR_SECRET, backup.SD_SECRET, backup.CATALOG_SECRET,
                                          "bacula_fd_e1server", "bacula_fd_mon1server"))


def test_a_converged_site_changes_nothing_and_restarts_nothing():
    first = _fresh()
    first.answers["*"] = FRESH
    backup.converge(first)
    secrets = dict(first.secrets._values)
    files = {}
    for name, session in first._sessions.items():
        for path, text in session.uploads.items():
            files[(name, path.removesuffix(".hastack-new"))] = text
    import hashlib

    def simulate(host):
        def answer(h, cmd, stdin):
            m = re.match(r"^stat -c '%U:%G:%a' (\S+)( && sha256sum \S+)?$", cmd)
            if m:
                path = shlex.split(cmd)[3]
                if (h.name, path) in files:
                    text = files[(h.name, path)]
                    owner = {"/etc/bacula/bacula-fd.conf": "root:bacula:640",
                             "/etc/bacula/bacula-dir.conf": "root:bacula:640",
                             "/etc/bacula/bacula-sd.conf": "root:bacula:640",
                             "/etc/bacula/bconsole.conf": "root:root:600"}.get(path, "root:root:755"
                                                                                if "/scripts/" in path else "")
                    if path.endswith("hastack-backup-metric"):
                        owner = "root:root:755"
                    elif "/scripts/" in path:
                        owner = "root:root:750"
                    return Result(f"{owner}\n{hashlib.sha256(text.encode()).hexdigest()}  {path}\n")
                dirs = {LAB.backup.volume_dir: "bacula:tape:750", backup.METRIC_DIR: "bacula:bacula:755"}
                if path in dirs:
                    return Result(dirs[path] + "\n")
                return Result(exited=1)
            if re.match(r"^(test -s /etc/ssl|test -d |test \"\$\(readlink|id -nG bacula)", cmd) or "pg_isready" in cmd:
                return Result()
            if cmd.startswith("dpkg-query"):
                names = backup.CLIENT_PACKAGES + backup.SERVER_PACKAGES + backup.PG_PACKAGES
                return Result("".join(f"{n} installed\n" for n in names))
            if "systemctl show" in cmd:
                return Result("UnitFileState=enabled\nActiveState=active\n")
            if "json_object_agg(rolname" in cmd:
                return Result(json.dumps({"bacula": [True, False, scram_verifier(secrets[backup.CATALOG_SECRET])]}))
            if "FROM pg_database" in cmd:
                return Result("1\n")
            if "to_regclass" in cmd:
                return Result("t\n")
            if "max(versionid)" in cmd:
                return Result("16\n")
            return None
        return answer

    run = RecordingRun(LAB, secrets=secrets, responder=lambda h, c, s: simulate(h.name)(h, c, s))
    backup.converge(run)
    changed = [(h, m) for h, s, m in run.results if s in ("changed", "would change")]
    assert changed == []
    assert not any("restart" in c for _, c in run.all_commands())


def test_check_mode_changes_nothing():
    run = _fresh(run_check=True)
    backup.converge(run)
    assert all(not s.changes for s in run._sessions.values())


# --- ops tasks: input ------------------------------------------------------------------------


def test_unknown_job_lists_the_jobs():
    with pytest.raises(UserError, match="no backup job 'nope'.*e1-fs, e2-fs, psql2-dump, mon1-grfn"):
        backup.check_job(LAB, "nope")
    run = RecordingRun(LAB)
    with pytest.raises(UserError, match="no backup job"):
        backup.run_.runbook(run, "e1-fs; rm -rf /")
    assert run.all_commands() == []


@pytest.mark.parametrize("level,want", [("Full", "Full"), ("diff", "Differential"), ("I", "Incremental"),
                                        (None, None)])
def test_levels(level, want):
    assert backup.check_level(level) == want


def test_bad_level_is_refused():
    with pytest.raises(UserError, match="--level"):
        backup.check_level("weekly")


@pytest.mark.parametrize("to,why", [
    ("e1server", "HOST:DIR"),
    ("nohost:/tmp/x", "unknown host"),
    ("bk1server:/tmp/x", "runs no Bacula file daemon"),
    ("psql1server:/tmp/x", "runs no Bacula file daemon"),
    ("e1server:relative/dir", "absolute directory"),
    ("e1server:/tmp/../etc", "absolute directory"),
    ("e1server:/tmp/a b", "absolute directory"),
    ("e1server:/tmp/$(reboot)", "absolute directory"),
    ("e1server:/tmp/x\"; delete", "absolute directory"),
])
def test_bad_restore_targets(to, why):
    with pytest.raises(UserError, match=re.escape(why)):
        backup.parse_target(LAB, to)


def test_restore_refuses_root_and_the_jobs_own_paths_without_force():
    with pytest.raises(UserError, match="over the host's own files"):
        backup.restore_guard(LAB, "e1-fs", "e1server", "/", False)
    with pytest.raises(UserError, match="overlaps the job's own source /etc"):
        backup.restore_guard(LAB, "e1-fs", "e1server", "/etc/ssl", False)
    with pytest.raises(UserError, match="overlaps"):
        backup.restore_guard(LAB, "psql2-dump", "psql2server", "/var/backups", False)
    backup.restore_guard(LAB, "e1-fs", "e2server", "/etc", False)  # another host's /etc: allowed
    backup.restore_guard(LAB, "e1-fs", "e1server", "/", True)


def test_restore_refuses_a_non_empty_directory_without_force():
    run = RecordingRun(LAB, answers={"bk1server": [(r"systemctl is-active --quiet bacula-director", Result())]})
    with pytest.raises(UserError, match="not an empty directory"):
        backup.restore.runbook(run, job="e1-fs", to="e2server:/var/tmp/r")
    assert all(not s.changes for s in run._sessions.values())
    probe = next(c for h, c in run.all_commands() if h == "e2server" and "ls -A" in c)
    assert "/var/tmp/r" in probe


def test_restore_and_run_reach_bconsole_with_validated_words_only():
    cmd = backup.restore_command(LAB, "e1-fs", "e2server", "/var/tmp/r", "2026-01-02 03:04:05")
    assert cmd == ('restore client=e1server-fd restoreclient=e2server-fd fileset=e1-fs-FS restorejob=RestoreFiles '
                   'where=/var/tmp/r before="2026-01-02 03:04:05" select all done yes')
    assert backup.check_time("2026-01-02 03:04:05") == "2026-01-02 03:04:05"
    for bad in ('2026-01-02"; delete', "yesterday", "2026-13-01 00:00:00"):
        with pytest.raises(UserError, match="--before"):
            backup.check_time(bad)


def director_answers(jobid: int, row: str, wait_output: str = "", *more) -> dict:
    """The backup host: its director runs, bconsole queues JobId ``jobid`` and waits for it,
    the catalog has ``row`` for it; ``more`` rules after those."""
    return {"bk1server": [
        (r"systemctl is-active --quiet bacula-director", Result()),
        (r"^bconsole", lambda c, s: Result(f"Job queued. JobId={jobid}\n" if s.startswith("run ") else wait_output)),
        (rf"FROM job WHERE jobid = {jobid}", Result(row + "\n")),
        *more,
    ]}


def test_run_waits_for_the_job_and_fails_when_it_did_not_end_ok():
    row = "7|e1-fs|I|f|2026-01-01 01:00:00|2026-01-01 01:00:09|0|0|9|60"
    answers = director_answers(7, row, "JobStatus=Error\n",
                               (r"FROM log WHERE jobid = 7", Result("Fatal error: cannot connect to the client\n")))
    run = RecordingRun(LAB, answers=answers)
    with pytest.raises(UserError, match=r"(?s)did not end OK.*JobId 7 e1-fs: f \(fatal error\).*cannot connect"):
        backup.run_.runbook(run, "e1-fs", level="full")
    stdins = [s for c, s in run.session("bk1server").stdins if c.startswith("bconsole")]
    assert stdins == ["run job=e1-fs level=Full yes\nquit\n", "wait jobid=7\nquit\n"]


def test_run_reports_a_good_job():
    row = "8|e1-fs|F|T|2026-01-01 01:00:00|2026-01-01 01:01:40|1234|5242880|100|60"
    run = RecordingRun(LAB, answers=director_answers(8, row))
    backup.run_.runbook(run, "e1-fs")
    ok = run.session("bk1server").reported("ok")[-1]
    assert "T (OK), Full, 1234 files, 5.0 MiB, 100 s" in ok


# --- parsing the catalog ---------------------------------------------------------------------

GOOD = """\
12|e1-fs|I|T|2026-03-01 01:00:02|2026-03-01 01:00:10|17|40960|8|3600
9|e2-fs|F|T|2026-02-20 01:00:02|2026-02-20 01:05:00|2100|52428800|298|864000
"""
LAST = """\
12|e1-fs|I|T|2026-03-01 01:00:02|2026-03-01 01:00:10|17|40960|8|3600
13|e2-fs|I|f|2026-03-01 01:00:02|2026-03-01 01:00:03|0|0|1|3500
14|psql2-dump|F|R|2026-03-01 02:00:00||0|0|0|-1
"""
POOLS = """\
e1-fs-Diff|0|0
e1-fs-Full|1|1048576
e1-fs-Incr|2|81920
e2-fs-Full|1|52428800
RestorePool-ignored|x|y
"""


def test_status_parsing_flags_stale_failed_and_never_run_jobs():
    statuses = {s.name: s for s in backup.job_statuses(LAB, backup.parse_jobs(GOOD), backup.parse_jobs(LAST),
                                                        backup.parse_pools(POOLS))}
    assert statuses["e1-fs"].problem() is None
    assert [p.name for p in statuses["e1-fs"].pools] == ["e1-fs-Full", "e1-fs-Diff", "e1-fs-Incr"]  # the table's column order
    assert statuses["e2-fs"].stale and statuses["e2-fs"].problem() == "stale"
    assert statuses["psql2-dump"].problem() == "no good run yet"
    assert statuses["mon1-grfn"].problem() == "no good run yet"
    g = statuses["e1-fs"].last_good
    assert (g.jobid, g.level, g.files, g.bytes, g.age) == (12, "I", 17, 40960, 3600.0)
    assert backup.parse_jobs("garbage\n|||\n") == []


def test_a_failed_last_run_is_flagged_even_with_a_recent_good_one():
    good = backup.parse_jobs("12|e1-fs|I|T|2026-03-01 01:00:02|2026-03-01 01:00:10|17|40960|8|3600\n")
    last = backup.parse_jobs("15|e1-fs|I|E|2026-03-01 02:00:02|2026-03-01 02:00:10|0|0|8|60\n")
    s = backup.job_statuses(LAB, good, last, [])[0]
    assert s.problem() == "last run E (error)"


def test_status_task_renders_a_table():
    answers = {"bk1server": [
        (r"systemctl is-active --quiet bacula-director", Result()),
        (r"ORDER BY name, endtime DESC", Result(GOOD)),
        (r"ORDER BY name, jobid DESC", Result(LAST)),
        (r"FROM pool p", Result(POOLS)),
    ]}
    run = RecordingRun(LAB, answers=answers)
    backup.status.runbook(run)
    assert "e2-fs" in run.output and "stale" in run.output and "no good run yet" in run.output
    assert run.session("bk1server").reported("failed")


# --- the drill -------------------------------------------------------------------------------

H = {n: c * 64 for n, c in (("a", "a"), ("b", "b"), ("c", "c"), ("d", "d"))}


def test_tree_comparison_tells_changes_since_the_backup_from_differences():
    source = {"/etc/a": H["a"], "/etc/b": H["b"], "/etc/new": H["c"], "/etc/x/changed": H["d"]}
    restored = {"/etc/a": H["a"], "/etc/b": H["c"], "/etc/gone": H["d"], "/etc/x/changed": H["a"]}
    c = backup.compare_trees(source, restored, changed={"/etc/new", "/etc/x"})
    assert c.identical == 1
    assert c.differences == ["/etc/b: differs", "/etc/gone: only in the restore"]
    assert c.changed_since == ["/etc/new: missing from the restore (new since the backup)",
                               "/etc/x/changed: differs (changed since the backup)"]


def test_sha256_listings_are_parsed_and_rooted():
    text = f"{H['a']}  /var/tmp/hastack-drill/e1-fs/etc/a b\n{H['b']}  /var/tmp/hastack-drill/e1-fs/etc/c\nnoise\n"
    assert backup.parse_sums(text, strip="/var/tmp/hastack-drill/e1-fs") == {"/etc/a b": H["a"], "/etc/c": H["b"]}


def test_tree_listing_quotes_every_path():
    cmd = backup.tree_listing("/var/tmp/hastack-drill/e1-fs", ["/etc"], since=1700000000)
    assert "find /var/tmp/hastack-drill/e1-fs/etc -type f -print0 | sort -z | xargs -0 -r sha256sum" in cmd
    assert "find /etc -newermt @1700000000 -print" in cmd
    hostile = backup.tree_listing("", ["/tmp/$(reboot)"])
    assert "'/tmp/$(reboot)'" in hostile


def test_database_drill_compares_with_the_dumps_own_snapshot_and_reports_live_changes():
    out = """== restored
public.users|3|m1
public.archive|10|m2
== backup
public.users|3|m1
public.archive|11|m3
== live
public.users|3|m1
public.archive|12|m4
"""
    c = backup.compare_databases(backup.parse_manifests(out))
    assert c.identical == 1
    assert c.differences == ["table public.archive: 10 rows restored, 11 dumped"]
    assert c.changed_since == ["table public.archive: 10 rows in the backup, 12 live now"]
    same = out.replace("public.archive|11|m3", "public.archive|10|m2")
    assert backup.compare_databases(backup.parse_manifests(same)).differences == []


def test_drill_fails_naming_the_difference():
    good = "20|e1-fs|I|T|2026-03-01 01:00:02|2026-03-01 01:00:10|2|100|8|60\n"
    restore_row = "21|RestoreFiles|F|T|2026-03-01 02:00:02|2026-03-01 02:00:10|2|100|8|5\n"
    answers = {
        "bk1server": [
            (r"systemctl is-active --quiet bacula-director", Result()),
            (r"^bconsole", lambda c, s: Result("Job queued. JobId=21\n" if s.startswith("restore") else "")),
            (r"e1-fs.*ORDER BY endtime DESC LIMIT 1", Result(good)),
            (r"extract\(epoch from starttime\)::bigint FROM job WHERE jobid = 20", Result("1700000000\n")),
            (r"FROM job WHERE jobid = 21", Result(restore_row)),
        ],
        "e1server": [
            (r"-newermt", Result(f"{H['a']}  /etc/a\n{H['b']}  /etc/b\n== changed\n")),
            (r"hastack-drill/e1-fs/etc", Result(f"{H['a']}  /var/tmp/hastack-drill/e1-fs/etc/a\n"
                                               f"{H['c']}  /var/tmp/hastack-drill/e1-fs/etc/b\n")),
        ],
    }
    run = RecordingRun(LAB, answers=answers)
    with pytest.raises(StepFailed, match=r"e1-fs: /etc/b: differs"):
        backup.drill.runbook(run, job="e1-fs")
    e1 = run.session("e1server")
    assert e1.changes[0].startswith("rm -rf /var/tmp/hastack-drill/e1-fs && mkdir -p")
    assert e1.changes[-1] == "rm -rf /var/tmp/hastack-drill/e1-fs"  # cleaned up
    restore = [s for c, s in run.session("bk1server").stdins if s.startswith("restore")][0]
    assert restore.startswith("restore client=e1server-fd restoreclient=e1server-fd fileset=e1-fs-FS ")
    assert "where=/var/tmp/hastack-drill/e1-fs current select all done yes" in restore


def test_every_command_of_the_tier_quotes_what_it_is_given():
    """A hostile directory never reaches a shell unquoted (the validators refuse it
    first; the helpers quote it anyway)."""
    hostile = "/tmp/x'; reboot; '"
    assert shlex.split(backup.empty_dir_probe(hostile))[3] == hostile
    assert q_roundtrip(backup.tree_listing(hostile, ["/etc"]), hostile + "/etc")


def q_roundtrip(cmd: str, word: str) -> bool:
    lexer = shlex.shlex(cmd, posix=True, punctuation_chars=True)
    lexer.whitespace_split = True
    return word in list(lexer)


def test_excluded_paths_are_out_of_the_fileset_and_of_the_drill_listing(tmp_path):
    text = render("bacula-dir.conf")
    fileset = text[text.index('Name = "mon1-grfn-FS"'):]
    fileset = fileset[:fileset.index("\n}\n")]
    assert 'Exclude {\n    File = "/var/lib/prometheus/metrics2/wal"' in fileset
    # The listing runs for real: an excluded folder's files are neither compared nor "changed".
    (tmp_path / "keep").mkdir()
    (tmp_path / "keep/a").write_text("a")
    (tmp_path / "wal").mkdir()
    (tmp_path / "wal/live").write_text("busy")
    out = subprocess.run(["sh", "-c", backup.tree_listing("", [str(tmp_path)], since=0, exclude=[str(tmp_path / "wal")])],
                         capture_output=True, text=True, check=True).stdout
    assert str(tmp_path / "keep/a") in out and "wal/live" not in out


def test_an_exclude_must_be_below_a_path_of_its_job():
    import yaml
    from fabfile.core.inventory import InventoryError, parse
    data = yaml.safe_load((ROOT / "inventory/lab.yml").read_text())
    data["backup"]["jobs"]["e1-fs"]["exclude"] = ["/var/log"]
    with pytest.raises(InventoryError, match=r"backup.jobs.e1-fs.exclude.0: /var/log is below none of the job's paths"):
        parse(yaml.safe_dump(data), ROOT / "inventory/lab.yml")
