"""Task wiring: `inv --list` shows the collections, every option is documented."""

import subprocess
import sys
from pathlib import Path

import pytest
from invoke import Collection

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
import tasks  # noqa: E402


def inv(*args):
    return subprocess.run([sys.executable, "-m", "invoke", *args], cwd=ROOT, capture_output=True, text=True)


def test_list_shows_collections():
    out = inv("--list")
    assert out.returncode == 0, out.stderr
    for name in ("lab.up", "lab.down", "base.deploy", "deploy.all"):
        assert name in out.stdout


def _all_tasks(coll: Collection, prefix=""):
    for name, task in coll.tasks.items():
        yield prefix + name, task
    for name, sub in coll.collections.items():
        yield from _all_tasks(sub, f"{prefix}{name}.")


@pytest.mark.parametrize("name,task", list(_all_tasks(tasks.ns)), ids=lambda x: x if isinstance(x, str) else "")
def test_every_task_has_docstring_and_argument_help(name, task):
    assert task.__doc__ and task.__doc__.strip(), f"{name} has no docstring"
    for arg in task.get_arguments():
        assert arg.help, f"{name}: argument --{arg.name} has no help text"


def test_unknown_host_is_refused_without_traceback():
    out = inv("base.deploy", "--hosts", "nosuchhost")
    assert out.returncode == 1
    assert "Traceback" not in out.stderr
    assert "--hosts names unknown host(s): nosuchhost" in out.stderr


# What `inv --list` and `inv --help TASK` must not import: they show tasks, they
# connect, validate, render, report and sign nothing (issue 17: lazy imports).
HEAVY = ("paramiko", "fabric.connection", "pydantic", "jinja2", "rich", "cryptography", "bcrypt", "yaml")
# invoke itself loads PyYAML (its vendored cyaml imports yaml._yaml): what invoke
# already loaded is not counted against the tasks.
SHOWN_ONLY = f"""
import sys
import invoke
from invoke.main import program

before = set(sys.modules)
if sys.argv[1:] == ["import"]:
    import tasks  # noqa: F401
else:
    try:
        program.run(["inv", *sys.argv[1:]], exit=False)
    except SystemExit as exc:
        assert not exc.code, exc
print("heavy:", sorted(m for m in {HEAVY!r} if m in sys.modules and m not in before))
"""


@pytest.mark.parametrize("args", [["import"], ["--list"], ["--help", "deploy.all"], ["--help", "pki.issue"]],
                         ids=" ".join)
def test_listing_and_help_import_no_heavy_library(args):
    out = subprocess.run([sys.executable, "-c", SHOWN_ONLY, *args], cwd=ROOT, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert out.stdout.splitlines()[-1] == "heavy: []", f"{args}: {out.stdout.splitlines()[-1]}"


def test_a_run_stopped_by_an_error_never_ends_with_nothing_to_do(tmp_path):
    """A chain stopped by a refusal (the Galera cluster needs `pxc.bootstrap`) after
    only ok results: the summary says it stopped, not that everything is as it should be."""
    import io

    from fabfile.core.report import Report

    out = io.StringIO()
    report = Report("deploy.all", log_dir=tmp_path, file=out)
    report.result("pxc1", "ok", "packages")
    report.recap(stopped="mail: the Galera cluster has no Primary component; run `inv pxc.bootstrap`\nmore")
    text = out.getvalue()
    assert "nothing to do" not in text
    assert "1 ok, 0 changed, 0 failed on 1 hosts; stopped early: mail: the Galera cluster has no Primary" in text
    report.close()
    out = io.StringIO()
    report = Report("deploy.all", log_dir=tmp_path, file=out)
    report.result("pxc1", "ok", "packages")
    report.recap()
    assert "nothing to do, everything already as it should be" in out.getvalue()
    report.close()
