"""The core's execution paths against real lab hosts over real SSH: parallel
steps, upload only when changed, validator before replace, check mode, and
clean refusals for unreachable hosts and unknown host keys."""

import hashlib
import time
from pathlib import Path

import pytest
import yaml

from fabfile.core import Run, StepFailed, UserError
from fabfile.core.inventory import load

pytestmark = pytest.mark.lab

HOSTS = "e1server,e2server"
PATH = "/tmp/hastack-core-test.conf"


def new_run(inv, check=False, only=HOSTS):
    return Run(inv, title="core-test", only=only, check=check)


def counts(run, status):
    return sum(c[status] for c in run.report.counts.values())


def cat(lab, host, path=PATH):
    return lab.run(host, f"cat {path}").stdout


@pytest.fixture
def clean(lab):
    for host in HOSTS.split(","):
        lab.run(host, f"rm -f {PATH} /tmp/hastack-core-marker")
    yield
    for host in HOSTS.split(","):
        lab.run(host, f"rm -f {PATH} /tmp/hastack-core-marker")


def test_upload_only_when_changed(lab, clean):
    run = new_run(lab.inventory)
    run.step("put", run.hosts(), lambda h: h.put(f"name = {h.name}\n", PATH, mode="0640"))
    assert counts(run, "changed") == 2
    assert cat(lab, "e1server") == "name = e1server\n"
    assert lab.run("e2server", f"stat -c %a {PATH}").stdout.strip() == "640"

    again = new_run(lab.inventory)
    again.step("put", again.hosts(), lambda h: h.put(f"name = {h.name}\n", PATH, mode="0640"))
    assert counts(again, "changed") == 0 and counts(again, "ok") == 2

    mode_only = new_run(lab.inventory)
    mode_only.step("put", mode_only.hosts(), lambda h: h.put(f"name = {h.name}\n", PATH, mode="0600"))
    assert counts(mode_only, "changed") == 2
    assert lab.run("e1server", f"stat -c %a {PATH}").stdout.strip() == "600"


def test_validator_runs_before_replace(lab, clean):
    run = new_run(lab.inventory, only="e1server")
    run.step("put", ["e1server"], lambda h: h.put("valid = yes\n", PATH))
    bad = new_run(lab.inventory, only="e1server")
    with pytest.raises(StepFailed, match="rejected by `grep -q valid"):
        bad.step("put", ["e1server"], lambda h: h.put("broken\n", PATH, validate="grep -q valid {}"))
    assert cat(lab, "e1server") == "valid = yes\n"
    assert lab.run("e1server", f"ls {PATH}.hastack-new").returncode != 0  # no temp file left

    # A checker that only reads the live path: swapped in, then rolled back.
    live = new_run(lab.inventory, only="e1server")
    with pytest.raises(StepFailed, match="old file restored"):
        live.step("put", ["e1server"], lambda h: h.put("broken\n", PATH, validate=f"grep -q valid {PATH}"))
    assert cat(lab, "e1server") == "valid = yes\n"


def test_check_mode_changes_nothing(lab, clean):
    run = new_run(lab.inventory)
    run.step("put", run.hosts(), lambda h: h.put("old\n", PATH))
    check = new_run(lab.inventory, check=True)

    def act(h):
        h.put("new\n", PATH)
        h.sh("touch /tmp/hastack-core-marker")

    check.step("check", check.hosts(), act)
    assert counts(check, "would change") == 4 and counts(check, "changed") == 0
    assert cat(lab, "e1server") == "old\n"
    assert lab.run("e1server", "test -e /tmp/hastack-core-marker").returncode == 1
    log = check.report.log_path.read_text()
    assert "-old" in log and "+new" in log  # the diff was shown


def test_steps_run_in_parallel(lab):
    run = new_run(lab.inventory, only=None)
    spans = {}

    def timed(h):
        started = time.monotonic()
        h.probe("sleep 2")
        spans[h.name] = (started, time.monotonic())

    run.step("sleep", run.hosts(), timed)
    assert len(spans) == len(lab.inventory.hosts)
    latest_start = max(s for s, _ in spans.values())
    earliest_end = min(e for _, e in spans.values())
    assert latest_start < earliest_end, "every host's command overlapped the others"


def test_failure_names_host_command_and_status(lab):
    run = new_run(lab.inventory)
    with pytest.raises(StepFailed) as info:
        run.step("fail", run.hosts(), lambda h: h.sh("echo boom >&2; exit 3"))
    text = str(info.value)
    assert "e1server: `echo boom >&2; exit 3` exited 3:\nboom" in text
    assert counts(run, "failed") == 2


def _inventory_variant(lab, tmp_path, change):
    data = yaml.safe_load(lab.inventory.path.read_text())
    data["ssh"]["key_file"] = str(lab.inventory.key_file)
    data["ssh"]["known_hosts"] = str(lab.inventory.known_hosts_file)
    change(data)
    path = tmp_path / "variant.yml"
    path.write_text(yaml.safe_dump(data))
    return load(path)


def test_unreachable_host_is_one_line_and_nothing_changes(lab, tmp_path, clean):
    def move_e2(data):
        data["hosts"]["e2server"]["addresses"]["mgmt"] = "10.200.0.250"  # nobody answers there
        data["ssh"]["connect_timeout"] = 2

    inv = _inventory_variant(lab, tmp_path, move_e2)
    run = new_run(inv)
    with pytest.raises(UserError) as info:
        run.step("put", run.hosts(), lambda h: h.put("x\n", PATH))
    assert "e2server (10.200.0.250:22): unreachable" in str(info.value)
    assert lab.run("e1server", f"test -e {PATH}").returncode == 1  # e1server untouched too


def test_changed_host_key_is_refused(lab, tmp_path):
    known = tmp_path / "known_hosts"
    lines = Path(lab.inventory.known_hosts_file).read_text().splitlines()
    e1 = lab.inventory.management_address("e1server")
    e2_key = next(l for l in lines if l.startswith(lab.inventory.management_address("e2server") + " "))
    known.write_text(e1 + " " + e2_key.split(" ", 1)[1] + "\n")  # e1server with e2server's key

    inv = _inventory_variant(lab, tmp_path, lambda d: d["ssh"].update(known_hosts=str(known)))
    with pytest.raises(UserError, match=r"e1server \(10.200.0.10:22\): host key does not match"):
        new_run(inv, only="e1server").connect(["e1server"])
    with pytest.raises(UserError, match=r"e2server \(10.200.0.11:22\): host key is not in"):
        new_run(inv, only="e2server").connect(["e2server"])


def test_standard_input_arrives_whole_and_ends(lab, clean):
    """Input on stdin (SQL, passwords, debconf answers) reaches the command as
    written, in one go, and is closed so that the command ends."""
    text = "".join(f"line {i}: {'x' * 60} ';$(id)`id`\n" for i in range(200))  # 15 kB
    run = new_run(lab.inventory, only="e1server")
    got = {}
    started = time.monotonic()
    run.step("stdin", ["e1server"], lambda h: got.update(r=h.sh(f"cat > {PATH} && sha256sum {PATH}", stdin=text)))
    print(f"\n{len(text)} bytes on stdin over SSH: {time.monotonic() - started:.2f} s")
    assert got["r"].stdout.split()[0] == hashlib.sha256(text.encode()).hexdigest()
    assert cat(lab, "e1server") == text


def test_a_command_gives_its_output_streams_and_status_whole_and_a_timeout_ends_it(lab):
    """Commands run on a channel of the host's connection (core/remote.py
    `channel_run`): megabytes on stdout and stderr at once arrive whole and apart,
    with the exit status; a command past its timeout is cut off and says so; a
    command killed by a signal has no exit status (-1)."""
    run = new_run(lab.inventory, only="e1server")
    h = run.session("e1server")
    r = h.probe("head -c 3000000 /dev/zero | tr '\\0' o; seq 1 300000 >&2; exit 7")
    assert (len(r.stdout), r.stdout.strip("o"), r.exited) == (3000000, "", 7)
    assert r.stderr.splitlines() == [str(i) for i in range(1, 300001)]
    started = time.monotonic()
    r = h.probe("echo begun; sleep 30", timeout=2)
    assert time.monotonic() - started < 5
    assert r.exited == -1 and r.stdout == "begun\n" and "CommandTimedOut: no exit after 2 s" in r.stderr
    assert h.probe("kill -9 $$").exited == -1
    started = time.monotonic()
    for _ in range(50):
        assert h.probe("true").ok
    each = (time.monotonic() - started) / 50
    print(f"\na command's round trip: {each * 1000:.1f} ms")
    run.close()


def test_a_command_that_ends_without_reading_its_input_still_gives_its_output_and_status(lab):
    """psql refused by a stopped server never reads the SQL on its stdin: the
    channel may be closed before the input is written; the command's own words
    and exit status come back, not an error about the socket."""
    run = new_run(lab.inventory, only="e1server")
    h = run.session("e1server")
    for _ in range(20):
        r = h.probe("echo 'no server' >&2; exit 2", stdin="SELECT 1;\n" * 1000)
        assert (r.stderr, r.exited) == ("no server\n", 2)
    run.close()
