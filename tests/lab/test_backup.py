"""Bacula on real lab hosts (issue 13): the director, storage daemon and catalog on
the backup host, a file daemon on each job's client, TLS between all of them.

- Every job of the inventory runs to T (OK) from `inv backup.run`; `inv
  backup.status` shows each with its last good run; the node exporter's textfile
  has each job's success time.
- `inv backup.drill` restores each job's newest backup to a scratch folder and
  finds every file identical; a file whose content changed under the same
  mtime (silent corruption) is reported as exactly that difference and fails
  the drill.
- The dump: a user registered through ejabberd is in the dump `inv
  backup.restore` brings back.
- Bad input (unknown job, a non-empty target, a host that is no client) is
  refused with nothing changed; a second `inv backup.deploy` changes nothing
  and restarts no daemon.
"""

from __future__ import annotations

import uuid

import pytest

from fabfile.core import topology
from tests.lab.labhost import recap
from tests.lab.test_xmpp import ok

pytestmark = pytest.mark.lab

DAEMONS = ("bacula-director", "bacula-sd")


@pytest.fixture(scope="module")
def bacula(lab):
    inv = lab.inv
    if topology.backup_host(inv) is None or not inv.backup_jobs:
        pytest.skip("the lab inventory has no backup host or no Bacula job")
    lab.converge("backup.deploy")
    return {"inv": inv, "bk": topology.backup_host(inv), "jobs": dict(inv.backup_jobs)}


def started_at(lab, host: str, unit: str) -> str:
    return lab.run(host, f"systemctl show -p ActiveEnterTimestampMonotonic --value {unit}", check=True).stdout.strip()


def test_every_job_runs_ok(lab, bacula):
    for job in bacula["jobs"]:
        out = lab.invoke("backup.run", job, timeout=1800)
        ok(out)
        assert f"{job}: T (OK)" in out.stdout, out.stdout[-3000:]
    status = lab.invoke("backup.status")
    ok(status)
    for job in bacula["jobs"]:
        line = next((line for line in status.stdout.splitlines() if f" {job} " in line), "")
        assert " ok " in line, status.stdout
    metrics = lab.run(bacula["bk"], "cat /var/lib/prometheus/node-exporter/hastack_backup.prom", check=True).stdout
    for job in bacula["jobs"]:
        assert f'hastack_backup_last_success_timestamp_seconds{{backup_job="{job}"}}' in metrics, metrics


def test_the_drill_finds_every_file_identical_and_a_corrupted_one(lab, bacula):
    out = lab.invoke("backup.drill", timeout=1800)
    ok(out)
    for job in bacula["jobs"]:
        assert f"{job}: " in out.stdout and "no difference" in out.stdout, out.stdout[-4000:]
    # Silent corruption: the content changes, the size and mtime stay.
    job = next(name for name, j in bacula["jobs"].items() if "/etc" in j.paths)
    client = bacula["jobs"][job].client
    target = "/etc/hastack-drill-probe"
    lab.run(client, f"printf 'aaaa\\n' > {target} && touch -d '2026-01-01 00:00:00' {target}", check=True)
    try:
        ok(lab.invoke("backup.run", job, "--level", "Incremental", timeout=1800))
        lab.run(client, f"printf 'bbbb\\n' > {target} && touch -d '2026-01-01 00:00:00' {target}", check=True)
        out = lab.invoke("backup.drill", "--job", job, timeout=1800)
        assert out.returncode == 1, out.stdout[-3000:]
        differences = [line for line in out.stdout.splitlines() if "differs" in line and "changed since" not in line]
        assert differences and all(target in line for line in differences), out.stdout[-3000:]
        assert "Traceback" not in out.stdout + out.stderr
    finally:
        lab.run(client, f"rm -f {target}")
    ok(lab.invoke("backup.run", job, "--level", "Incremental", timeout=1800))


def test_the_dump_holds_a_user_registered_through_ejabberd(lab, bacula):
    job = next((n for n, j in bacula["jobs"].items() if j.pg_dump), None)
    if job is None:
        pytest.skip("no pg_dump job in the lab inventory")
    client = bacula["jobs"][job].client
    user = f"bk{uuid.uuid4().hex[:8]}"
    ok(lab.invoke("ejabberd.register-user", user, "--password", uuid.uuid4().hex, "--update"))
    # The dump runs on the replica: wait until the row has been replayed there.
    lab.run(client, f"for i in $(seq 60); do runuser -u postgres -- psql -XAt -d ejabberd -c "
                    f"\"SELECT 1 FROM users WHERE username = '{user}'\" | grep -q 1 && exit 0; sleep 0.5; done; exit 1",
            check=True)
    ok(lab.invoke("backup.run", job, timeout=1800))
    where = f"/var/tmp/hastack-restore-{uuid.uuid4().hex[:6]}"
    try:
        out = lab.invoke("backup.restore", "--job", job, "--to", f"{client}:{where}", timeout=1800)
        ok(out)
        dump = lab.run(client, f"cat {where}/var/backups/hastack-dump/{bacula['jobs'][job].pg_dump}.sql",
                       check=True).stdout
        assert f"\n{user}\t" in dump or f"\t{user}\t" in dump, f"{user} not in the restored dump"
        again = lab.invoke("backup.restore", "--job", job, "--to", f"{client}:{where}")
        assert again.returncode == 1 and "--force" in again.stdout + again.stderr, again.stdout
    finally:
        lab.run(client, f"rm -rf {where}")


def test_bad_input_changes_nothing_and_a_second_deploy_restarts_nothing(lab, bacula):
    bk = bacula["bk"]
    before = {unit: started_at(lab, bk, unit) for unit in DAEMONS}
    jobid = lab.run(bk, "runuser -u postgres -- psql -XAt -d bacula -c 'SELECT max(jobid) FROM job'").stdout
    job = next(iter(bacula["jobs"]))
    cases = [
        (("backup.run", "nosuchjob"), "nosuchjob"),
        (("backup.restore", "--job", job, "--to", "gw1server:/var/tmp/x"), "gw1server"),
        (("backup.restore", "--job", job, "--to", f"{bacula['jobs'][job].client}:/etc"), "--force"),
        (("backup.restore", "--job", job, "--to", f"{bacula['jobs'][job].client}:relative/dir"), "relative/dir"),
        (("backup.drill", "--job", "nosuchjob"), "nosuchjob"),
    ]
    for args, expected in cases:
        out = lab.invoke(*args)
        assert out.returncode == 1, out.stdout
        assert expected in out.stdout + out.stderr, out.stdout[-3000:]
        assert "Traceback" not in out.stdout + out.stderr
    assert lab.run(bk, "runuser -u postgres -- psql -XAt -d bacula -c 'SELECT max(jobid) FROM job'").stdout == jobid
    out = lab.invoke("backup.deploy")
    ok(out)
    assert recap(out)[1:] == (0, 0), out.stdout[-3000:]
    assert {unit: started_at(lab, bk, unit) for unit in DAEMONS} == before


def test_a_down_backup_host_is_named_and_nothing_changes(lab, bacula):
    bk = bacula["bk"]
    ok(lab.invoke("lab.power", bk, "off", timeout=300))
    try:
        for args in (("backup.run", next(iter(bacula["jobs"]))), ("backup.status",), ("backup.drill",),
                     ("postgres.backup",), ("postgres.restore", "--to", "2026-12-01 00:00:00")):
            out = lab.invoke(*args)
            assert out.returncode == 1, out.stdout
            assert f"{bk} (" in out.stdout and "unreachable" in out.stdout and "nothing was changed" in out.stdout, \
                out.stdout[-2000:]
            assert "Traceback" not in out.stdout + out.stderr
    finally:
        ok(lab.invoke("lab.power", bk, "on", timeout=300))
    lab.run(bk, "systemctl is-system-running --wait >/dev/null; systemctl is-active bacula-director bacula-sd "
                "hastack-pgbackrest", check=True, timeout=180)
