"""Facts read in one command (fabfile/core/facts.py): the known-paths table's
command run for real against a folder, the JSON file of known paths (what is
kept, what is dropped, a dry run writes nothing), and HostSession answering
put/directory/packages from the tables: one command for a converged host, path
by path again once something changed."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
from pathlib import Path

from fabfile.core import Result, facts
from fabfile.core.facts import FileFact, Known
from fabfile.core.inventory import load
from fabfile.core.testing import RecordingRun, packages_present

ROOT = Path(__file__).resolve().parents[2]
LAB = load(ROOT / "inventory/lab.yml", roles_file=False)


def test_the_read_command_lists_files_directories_and_nothing_for_a_missing_path(tmp_path):
    f = tmp_path / "it's a file"
    f.write_text("hello\n")
    os.chmod(f, 0o640)
    d = tmp_path / "dir"
    d.mkdir(mode=0o750)
    os.chmod(d, 0o750)
    missing = tmp_path / "missing; touch pwned"
    paths = [str(f), str(d), str(missing)]
    out = subprocess.run(["sh", "-c", facts.read_command(paths)], capture_output=True, text=True, check=True)
    table = facts.parse(paths, out.stdout)
    user = subprocess.run(["id", "-un"], capture_output=True, text=True).stdout.strip()
    group = subprocess.run(["id", "-gn"], capture_output=True, text=True).stdout.strip()
    assert table[str(f)] == FileFact(True, f"{user}:{group}:640", hashlib.sha256(b"hello\n").hexdigest())
    assert table[str(d)] == FileFact(True, f"{user}:{group}:750", None)
    assert table[str(missing)] == facts.ABSENT
    assert not (tmp_path / "pwned").exists()


def test_package_states_from_dpkg_query():
    table = facts.package_states("postgresql installed\nvim not-installed\nlibc6 installed\nlibc6 config-files\n")
    assert table == {"postgresql": True, "vim": False, "libc6": True}


def test_known_paths_keep_what_was_managed_or_still_exists(tmp_path):
    path = tmp_path / "lab.paths.json"
    path.write_text(json.dumps({"a": {"paths": ["/etc/old", "/etc/gone", "relative", "/etc/x\ty"],
                                      "units": ["nginx", "bad unit; id"]},
                                "b": {"paths": ["/etc/b"], "units": []}}))
    known = Known(path)
    assert known.paths_of("a") == ["/etc/old", "/etc/gone"]  # unsafe and relative entries are never listed
    assert known.units_of("a") == ["nginx"]
    known.seen("a", {"/etc/old": FileFact(True, "root:root:644", "x"), "/etc/gone": facts.ABSENT})
    known.touched("a", "/etc/new")
    known.touched("a", "/etc/tab\there")
    known.touched_unit("a", "php8.2-fpm")
    known.save()
    assert json.loads(path.read_text()) == {"a": {"paths": ["/etc/new", "/etc/old"], "units": ["nginx", "php8.2-fpm"]},
                                            "b": {"paths": ["/etc/b"], "units": []}}


def test_a_dry_run_and_a_missing_or_broken_file_change_nothing(tmp_path):
    path = tmp_path / "lab.paths.json"
    dry = Known(path, persist=False)
    dry.touched("a", "/etc/x")
    dry.save()
    assert not path.exists()
    path.write_text("{not json")
    broken = Known(path)
    assert broken.paths_of("a") == []


class TableRun(RecordingRun):
    def __init__(self, inv, table: Path, **kw):
        super().__init__(inv, **kw)
        self.known = Known(table, persist=not kw.get("check", False))


def files_answer(files: dict[str, tuple[str, str | None]]):
    """The host's answer to the table's one command, and to a path's own stat."""
    def answer(h, cmd, stdin):
        if cmd.startswith("stat --printf="):
            stats = [f"{p}\t{meta}\t{'directory' if text is None else 'regular file'}" for p, (meta, text) in files.items()]
            sums = [f"{hashlib.sha256(text.encode()).hexdigest()}  {p}" for p, (_, text) in files.items() if text is not None]
            return Result("\n".join(stats) + "\n==\n" + "\n".join(sums) + "\n")
        return None
    return answer


def test_a_converged_host_answers_every_file_from_one_command(tmp_path):
    table = tmp_path / "lab.paths.json"
    table.write_text(json.dumps({"e1server": {"paths": ["/etc/a.conf", "/etc/b.conf", "/etc/d"]}}))
    files = {"/etc/a.conf": ("root:root:644", "A\n"), "/etc/b.conf": ("root:root:600", "B\n"),
             "/etc/d": ("root:root:755", None)}
    run = TableRun(LAB, table, responder=files_answer(files), answers={"e1server": [packages_present("vim")]})
    h = run.session("e1server")
    assert h.put("A\n", "/etc/a.conf") is False
    assert h.put("B\n", "/etc/b.conf", mode="0600") is False
    assert h.directory("/etc/d") is False
    assert h.packages(["vim"]) is False and h.installed("vim") and not h.installed("emacs")
    assert [c.split()[0] for c in h.commands] == ["stat", "dpkg-query"]
    assert h.changes == []


def test_after_a_change_each_path_is_probed_again(tmp_path):
    table = tmp_path / "lab.paths.json"
    table.write_text(json.dumps({"e1server": {"paths": ["/etc/a.conf", "/etc/b.conf"]}}))
    files = {"/etc/a.conf": ("root:root:644", "A\n"), "/etc/b.conf": ("root:root:644", "B\n")}
    run = TableRun(LAB, table, responder=files_answer(files))
    h = run.session("e1server")
    assert h.put("A2\n", "/etc/a.conf") is True  # from the table: differs, uploaded
    assert "mv -f /etc/a.conf.hastack-new /etc/a.conf" in h.commands
    h.put("B\n", "/etc/b.conf")  # something changed: the table may be stale, the path is probed
    assert any(c.startswith("stat -c '%U:%G:%a' /etc/b.conf") for c in h.commands)
    run.close()
    assert Known(table).paths_of("e1server") == ["/etc/a.conf", "/etc/b.conf"]


def test_a_new_path_is_probed_and_remembered_for_the_next_run(tmp_path):
    table = tmp_path / "lab.paths.json"
    run = TableRun(LAB, table)
    h = run.session("e1server")
    h.put("new\n", "/etc/new.conf")
    assert h.commands[0].startswith("stat -c '%U:%G:%a' /etc/new.conf")  # no table yet: the path itself
    run.close()
    assert json.loads(table.read_text()) == {"e1server": {"paths": ["/etc/new.conf"], "units": []}}


def test_check_mode_reads_the_table_and_writes_no_state(tmp_path):
    table = tmp_path / "lab.paths.json"
    table.write_text(json.dumps({"e1server": {"paths": ["/etc/a.conf"]}}))
    before = table.read_text()
    files = {"/etc/a.conf": ("root:root:644", "A\n")}
    run = TableRun(LAB, table, responder=files_answer(files), check=True)
    h = run.session("e1server")
    assert h.put("A changed\n", "/etc/a.conf") is True
    h.put("other\n", "/etc/other.conf")
    run.close()
    assert table.read_text() == before


def test_known_units_are_read_in_one_systemctl_show_until_something_changes(tmp_path):
    table = tmp_path / "lab.paths.json"
    table.write_text(json.dumps({"e1server": {"units": ["nginx", "ejabberd"]}}))

    def answer(h, cmd, stdin):
        if cmd.startswith("systemctl show") and cmd.endswith(" nginx ejabberd"):
            block = "LoadState=loaded\nUnitFileState=enabled\nActiveState=active\nConditionResult=yes\n"
            return Result(block + "\n" + block)
        return None
    run = TableRun(LAB, table, responder=answer)
    h = run.session("e1server")
    h.service("nginx")
    h.service("ejabberd")
    assert [c for c in h.commands if c.startswith("systemctl show")] == [
        facts.units_command(["nginx", "ejabberd"], h.UNIT_PROPERTIES)]
    assert h.changes == []
    h.sh("true")  # a change: the table may be stale from now on
    h.service("nginx")
    shows = [c for c in h.commands if c.startswith("systemctl show")]
    assert len(shows) == 2 and shows[-1].endswith(" nginx")


def test_units_that_do_not_line_up_are_probed_one_by_one():
    assert facts.parse_units(["a", "b"], "ActiveState=active\n") is None
    assert facts.parse_units(["a"], "ActiveState=active\nLoadState=loaded\n") == {
        "a": {"ActiveState": "active", "LoadState": "loaded"}}


def test_a_change_on_one_host_makes_every_host_probe_again(tmp_path):
    table = tmp_path / "lab.paths.json"
    table.write_text(json.dumps({"e1server": {"paths": ["/etc/a.conf"]}, "e2server": {"paths": ["/etc/a.conf"]}}))
    files = {"/etc/a.conf": ("root:root:644", "A\n")}
    run = TableRun(LAB, table, responder=files_answer(files))
    run.session("e1server").sh("pcs cluster setup")  # acts on the other nodes too
    e2 = run.session("e2server")
    e2.put("A\n", "/etc/a.conf")
    assert e2.commands[0].startswith("stat -c '%U:%G:%a' /etc/a.conf")


SKIPPED = ("LoadState=loaded\nUnitFileState=enabled\nActiveState=inactive\nConditionResult=no\n"
           "ConditionTimestampMonotonic=123\n")


def test_a_unit_skipped_by_its_conditions_is_evaluated_again_in_the_tables_round_trip(tmp_path):
    """The first run evaluates timesyncd's conditions in a probe of their own and
    remembers that they failed; the next run evaluates them again inside the
    table's one command (no probe of their own) and still leaves the unit alone."""
    table = tmp_path / "lab.paths.json"
    table.write_text(json.dumps({"e1server": {"units": ["systemd-timesyncd"]}}))
    first = TableRun(LAB, table, responder=lambda h, cmd, stdin: (
        Result(SKIPPED) if cmd.startswith("systemctl show") else
        Result("systemd-timesyncd fail\n") if cmd.startswith("for u in ") else None))
    h = first.session("e1server")
    h.service("systemd-timesyncd")
    assert [c for c in h.commands if c.startswith("for u in ")] == [facts.conditions_command(["systemd-timesyncd"])]
    assert h.changes == [] and h.reported("ok") == ["service systemd-timesyncd skipped by its unit conditions"]
    first.close()
    assert json.loads(table.read_text())["e1server"]["skipped"] == ["systemd-timesyncd"]

    for result, changes in (("fail", []), ("pass", ["systemctl start systemd-timesyncd"])):
        def answer(h, cmd, stdin, result=result):
            if cmd.startswith("systemctl show"):
                assert cmd == facts.units_command(["systemd-timesyncd"], h.UNIT_PROPERTIES, ["systemd-timesyncd"])
                return Result(SKIPPED + "==hastack-conditions==\n" + f"systemd-timesyncd {result}\n")
            return None
        again = TableRun(LAB, table, responder=answer)
        h = again.session("e1server")
        h.service("systemd-timesyncd")
        assert not [c for c in h.commands if c.startswith("for u in ")]
        assert h.changes == changes


def test_a_run_that_never_asks_about_a_skipped_unit_does_not_evaluate_its_conditions(tmp_path):
    """`inv firewall.deploy` asks about netfilter-persistent only: the table's round
    trip leaves timesyncd's conditions (systemd-analyze, the costly part) alone, and
    they stay recorded as skipped. A later question about timesyncd in the same run
    evaluates them in a probe of their own."""
    table = tmp_path / "lab.paths.json"
    units = ["netfilter-persistent", "systemd-timesyncd"]
    table.write_text(json.dumps({"e1server": {"units": units, "skipped": ["systemd-timesyncd"]}}))
    running = "LoadState=loaded\nUnitFileState=enabled\nActiveState=active\nConditionResult=yes\n" \
              "ConditionTimestampMonotonic=1\n"

    def answer(h, cmd, stdin):
        if cmd.startswith("systemctl show"):
            assert cmd == facts.units_command(units, h.UNIT_PROPERTIES)
            return Result(running + "\n" + SKIPPED)
        if cmd.startswith("for u in "):
            return Result("systemd-timesyncd fail\n")
        return None
    run = TableRun(LAB, table, responder=answer)
    h = run.session("e1server")
    h.service("netfilter-persistent")
    assert not [c for c in h.commands if "systemd-analyze" in c]
    run.close()
    assert json.loads(table.read_text())["e1server"]["skipped"] == ["systemd-timesyncd"]

    run = TableRun(LAB, table, responder=answer)
    h = run.session("e1server")
    h.service("netfilter-persistent")
    h.service("systemd-timesyncd")
    assert [c for c in h.commands if c.startswith("for u in ")] == [facts.conditions_command(["systemd-timesyncd"])]
    assert h.changes == [] and h.reported("ok")[-1] == "service systemd-timesyncd skipped by its unit conditions"


def test_the_conditions_part_of_the_units_command_runs_in_a_shell(tmp_path):
    """The command run by bash against stand-ins of systemctl and systemd-analyze: a
    unit's Condition*= lines become the expressions evaluated; a unit without any
    passes; a unit that resets a condition is evaluated with --unit=."""
    units = {"a.service": "[Unit]\nConditionVirtualization=!container\n  ConditionPathExists=|/x y \n",
             "plain.service": "[Unit]\nDescription=none\n", "b;id": "[Unit]\nConditionPathExists=\n"}
    (tmp_path / "units.json").write_text(json.dumps(units))
    (tmp_path / "systemctl").write_text(
        "#!/usr/bin/env python3\nimport json, sys\n"
        f"units = json.load(open({str(tmp_path / 'units.json')!r}))\n"
        "if sys.argv[1] == 'show': print('ActiveState=inactive')\n"
        "else: print('# /lib/systemd/system/' + sys.argv[3]); print(units[sys.argv[3]], end='')\n")
    (tmp_path / "systemd-analyze").write_text(
        "#!/usr/bin/env python3\nimport sys\n"
        f"open({str(tmp_path / 'calls')!r}, 'a').write(repr(sys.argv[2:]) + '\\n')\n"
        "sys.exit(1 if any('!container' in a or a == '--unit=b;id' for a in sys.argv[2:]) else 0)\n")
    for tool in ("systemctl", "systemd-analyze"):
        (tmp_path / tool).chmod(0o755)
    cmd = facts.units_command(["a.service"], ("ActiveState",), ["a.service", "plain.service", "b;id"])
    out = subprocess.run(["bash", "-c", cmd], capture_output=True, text=True,
                         env={**os.environ, "PATH": f"{tmp_path}:{os.environ['PATH']}"}).stdout
    assert out == ("ActiveState=inactive\n==hastack-conditions==\n"
                   "a.service fail\nplain.service pass\nb;id fail\n")
    assert (tmp_path / "calls").read_text().splitlines() == [
        repr(["ConditionVirtualization=!container", "ConditionPathExists=|/x y"]), repr(["--unit=b;id"])]
    parsed = facts.parse_units(["a.service"], "ActiveState=inactive\n==hastack-conditions==\na.service fail\n")
    assert parsed == {"a.service": {"ActiveState": "inactive", facts.CONDITIONS: "fail"}}
