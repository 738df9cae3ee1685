"""No operator input reaches a shell unquoted. Every runbook task that takes a
value (positional or option) is driven through the recording host with
metacharacters in that value (`;`, `$()`, backticks, quotes, spaces, newlines,
pipes, ...). Each run either refuses the value before any command and any
connection, or every recorded command that carries it parses (shlex) back
to the same literal word. The hosts answer as a healthy site would, so the
tasks get as far as running their commands.

The inventory's own values go through the validator (tests/unit/test_bad_input.py)
and the same quoting path.
"""

from __future__ import annotations

import inspect
import shlex
from pathlib import Path

import pytest
from invoke import Collection

import tasks
from fabfile.core import Result, UserError
from fabfile.core.inventory import load
from fabfile.core.testing import RecordingRun

ROOT = Path(__file__).resolve().parents[2]
LAB = load(ROOT / "inventory/lab.yml")

MARK = "zq"  # makes every value findable in the recorded commands
METACHARACTERS = [";id", "$(id)", "`id`", "'", '"', " x", "\nid", "|id", "&&id", ">f", "\\", "*", "#"]

# Valid values for the arguments that are not under test.
VALID = {
    "user": "alice", "address": "bob@lab.test", "domain": "example.org", "goto": "carol@lab.test",
    "description": "a domain", "name": "Bob", "password": "pw-pw-pw-1",
}
NODE = {"cluster.standby": "postfix01", "cluster.unstandby": "postfix01", "pxc.bootstrap": None,
        "postgres.replica": "psql2server", "postgres.rejoin": "psql1server", "ejabberd.remove-node": "e2server"}
# The rescue tasks' other required names (the tested value replaces one of them).
RESCUE = {"dead": "e2server", "with_": "r1server"}
# Other required values, per task (the tested value replaces one of them).
REQUIRED = {("postgres.restore", "to"): "2026-01-01 00:00:00", ("backup.run", "job"): "e1-fs"}

def _postfixadmin(cmd, stdin):
    """The Postfixadmin database through the proxy: domain lab.test exists, no mailbox or alias yet."""
    if stdin and stdin.startswith("SELECT domain FROM domain"):
        return Result(stdout="lab.test\n")
    if stdin and stdin.startswith("SELECT"):
        return Result(stdout="")
    return Result()


# A healthy site as far as the ops tasks ask: answers by command.
HEALTHY = [
    (r"^ejabberdctl status", Result(stdout="The node ejabberd@e1server is started\n")),
    (r"^ejabberdctl check_account", Result(exited=1)),  # not registered yet: register goes ahead
    (r"ip -o -4 addr show", Result(stdout="inet 10.200.11.110/24\n")),
    (r"^mysql .* -e 'SELECT 1'", Result(stdout="1\n")),
    (r"^mysql --defaults-extra-file=/etc/postfixadmin/hastack-client.cnf .* postfix$", _postfixadmin),
    (r"^crm_mon -1", Result(stdout="<crm_mon><nodes><node name=\"postfix01\" online=\"true\" standby=\"false\" "
                                   "type=\"member\"/><node name=\"postfix02\" online=\"true\" standby=\"false\" "
                                   "type=\"member\"/></nodes></crm_mon>\n")),
]


def _tasks(coll: Collection, prefix=""):
    for name, task in coll.tasks.items():
        yield prefix + name, task
    for name, sub in coll.collections.items():
        yield from _tasks(sub, f"{prefix}{name}.")


def _value_args(task) -> list[str]:
    """The arguments of a runbook body that take a string from the operator."""
    body = getattr(task.body, "runbook", None)
    if body is None:
        return []
    out = []
    for p in list(inspect.signature(body).parameters.values())[1:]:
        if p.name in ("hosts", "check") or p.name.endswith("_file"):
            continue
        if p.default is inspect.Parameter.empty or p.default is None or isinstance(p.default, str):
            out.append(p.name)
    return out


RUNBOOKS = {name: task for name, task in _tasks(tasks.ns) if getattr(task.body, "runbook", None)}
CASES = [(name, arg, meta) for name, task in RUNBOOKS.items() for arg in _value_args(task) for meta in METACHARACTERS]


def test_the_tasks_that_take_values_are_all_here():
    covered = {name for name, _, _ in CASES}
    for name in ("ejabberd.register-user", "ejabberd.unregister-user", "ejabberd.change-password",
                 "mail.add-domain", "mail.add-mailbox", "mail.add-alias", "mail.set-password",
                 "cluster.standby", "cluster.unstandby", "postgres.replica", "pxc.bootstrap"):
        assert name in covered, name


def _kwargs(name: str, task, arg: str, value: str) -> dict:
    kw = {}
    for p in list(inspect.signature(task.body.runbook).parameters.values())[1:]:
        if p.name == arg:
            kw[p.name] = value
        elif p.name in VALID and p.name in _value_args(task):
            kw[p.name] = VALID[p.name]
        elif p.name in ("node", "host") and p.default is inspect.Parameter.empty:
            kw[p.name] = NODE[name]
        elif p.name in RESCUE:
            kw[p.name] = RESCUE[p.name]
        elif (name, p.name) in REQUIRED:
            kw[p.name] = REQUIRED[name, p.name]
    if "password" in kw and arg != "password":
        kw["password"] = VALID["password"]
    if "yes" in inspect.signature(task.body.runbook).parameters:
        kw["yes"] = True
    return kw


@pytest.mark.parametrize("name,arg,meta", CASES, ids=[f"{n}-{a}-{m!r}" for n, a, m in CASES])
def test_values_reach_commands_only_quoted(name, arg, meta):
    task = RUNBOOKS[name]
    value = f"{MARK}{meta}{MARK}"
    run = RecordingRun(LAB, answers={"*": HEALTHY}, secrets={"pki_ca_key": "-", "pki_ca_cert": "-"})
    try:
        task.body.runbook(run, **_kwargs(name, task, arg, value))
    except UserError as exc:
        if not any(MARK in c for _, c in run.all_commands()):
            assert str(exc)
            return
    else:
        carried = [c for _, c in run.all_commands() if MARK in c]
        if arg == "password":  # never on a command line, on stdin (or only its hash)
            assert not carried, f"{name}: the password is on a command line"
        elif not carried:  # accepted and not on any command line: it went as data on stdin
            stdins = [i for h in run._sessions.values() for _, i in h.stdins]
            assert any(MARK in i for i in stdins), f"{name} --{arg}: accepted {value!r} but it went nowhere"
    carried = [c for _, c in run.all_commands() if MARK in c]
    for cmd in carried:
        words = shlex.split(cmd)  # parses: no unbalanced quote
        assert value in words or value.lower() in words or any(w.startswith("--") and w.endswith(value) for w in words), \
            f"{name} --{arg} {value!r}: the value is not one word of: {cmd}"
    # A refused value reached no host at all.
    if not carried and not run.all_commands():
        assert run.connected == []


def test_a_legal_xmpp_name_like_x_semicolon_id_never_runs_id():
    run = RecordingRun(LAB, answers={"*": HEALTHY})
    RUNBOOKS["ejabberd.register-user"].body.runbook(run, "x;id", password="pw-pw-pw-1")
    register = [c for _, c in run.all_commands() if " register " in c]
    assert register and shlex.split(register[0])[:4] == ["ejabberdctl", "register", "x;id", "xmpp.lab.test"]
    assert all("pw-pw-pw-1" not in c for _, c in run.all_commands())
