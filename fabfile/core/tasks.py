"""The task decorator every collection uses, and how a task finds its inventory."""

from __future__ import annotations

import functools
import os
import inspect
import traceback
from pathlib import Path
from typing import TYPE_CHECKING

from invoke import Context
from invoke import task as invoke_task
from invoke.config import Config
from invoke.config import AmbiguousMergeError
from invoke.exceptions import Exit, UncastableEnvVar

from .errors import UserError

if TYPE_CHECKING:
    from .inventory import Inventory

PROJECT_ROOT = Path(__file__).resolve().parents[2]
DEFAULT_INVENTORY = "inventory/lab.yml"
# invoke reads INVOKE_* environment variables only for keys it already knows.
CONFIG_DEFAULTS = {"inventory": DEFAULT_INVENTORY, "check": False}


def _guard_config_files() -> None:
    """invoke's own config files (invoke.yaml beside tasks.py, `inv -f FILE`,
    INVOKE_RUNTIME_CONFIG) end in a traceback when they are malformed; make that
    one line naming the file and the problem, exit status 1."""
    if getattr(Config._load_file, "hastack_guard", False):
        return
    original = Config._load_file

    def _load_file(self, prefix: str, absolute: bool = False, merge: bool = True) -> None:
        where = getattr(self, f"_{prefix}_path", None) if absolute else None
        if where is not None and not Path(where).expanduser().exists():
            raise Exit(f"error: invoke config {where}: no such file", code=1)
        try:
            original(self, prefix, absolute=absolute, merge=False)
        except Exception as exc:  # YAML/JSON errors, UnicodeDecodeError, unknown suffix, a directory, ...
            mark = getattr(exc, "problem_mark", None)
            what = getattr(exc, "problem", None) or str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            if mark is not None:
                what = f"malformed YAML at line {mark.line + 1}, column {mark.column + 1}: {what}"
                where = where or getattr(mark, "name", None)
            raise Exit(f"error: invoke config {where or prefix + ' file'}: {what}", code=1) from None
        data = getattr(self, f"_{prefix}")
        if data is not None and not isinstance(data, dict):
            raise Exit(f"error: invoke config {getattr(self, f'_{prefix}_path', None) or prefix}: "
                       f"must be a mapping of settings, not a {type(data).__name__}", code=1)
        if merge and getattr(self, f"_{prefix}_path", None) is not None:
            self.merge()

    _load_file.hastack_guard = True
    Config._load_file = _load_file
    load_shell_env = Config.load_shell_env

    def _load_shell_env(self) -> None:
        try:
            load_shell_env(self)
        except (UncastableEnvVar, ValueError, TypeError):  # INVOKE_X=... where a config file made X a list, ...
            clashes = [f"{name}: the invoke config makes '{name[7:].lower()}' "
                       f"{type(self.get(name[7:].lower())).__name__} {self.get(name[7:].lower())!r}"
                       for name in sorted(os.environ) if name.startswith("INVOKE_")
                       and not isinstance(self.get(name[7:].lower()), (str, bool, type(None)))]
            raise Exit("error: environment variable " + ("; ".join(clashes) or "INVOKE_*: cannot be cast")
                       + " (it must be a single value)", code=1) from None

    Config.load_shell_env = _load_shell_env
    merge = Config.merge

    def _merge(self) -> None:
        try:
            merge(self)
        except AmbiguousMergeError as exc:  # e.g. `inventory: {path: ...}` where a single value belongs
            files = [p for p in (getattr(self, "_project_path", None), getattr(self, "_runtime_path", None)) if p]
            raise Exit(f"error: invoke config {', '.join(map(str, files)) or ''}: a setting has the wrong shape: "
                       f"{exc}", code=1) from None

    Config.merge = _merge


_guard_config_files()


def inventory_path(c: Context) -> Path:
    """The inventory chosen through invoke's config: `inventory:` in invoke.yaml,
    `inv -f FILE`, or the INVOKE_INVENTORY environment variable."""
    value = c.config.get("inventory")
    if value is None:
        value = DEFAULT_INVENTORY
    if value == "":
        raise UserError("invoke config: 'inventory' is empty: name an inventory file (or leave it unset for "
                        f"{DEFAULT_INVENTORY})")
    if not isinstance(value, str):
        raise UserError(f"invoke config: 'inventory' must be the path of one inventory file, "
                        f"not a {type(value).__name__} ({value!r})")
    if "\0" in value:
        raise UserError("invoke config: 'inventory' holds a NUL character")
    path = Path(value).expanduser()
    if not path.is_absolute() and not path.exists() and (PROJECT_ROOT / path).exists():
        path = PROJECT_ROOT / path
    return path


def load_inventory(c: Context, *, roles_file: bool = True) -> Inventory:
    # pydantic and yaml are loaded when a task reads its inventory, not when
    # the tasks are listed (`inv --list` stays fast).
    from .inventory import load

    return load(inventory_path(c), roles_file=roles_file)


def check_mode(c: Context, flag) -> bool:
    """--check, or `check: true` in invoke's config (INVOKE_CHECK=1); anything
    else than a boolean there is an error."""
    value = c.config.get("check", False)
    if isinstance(value, str) and value.strip().lower() in ("1", "true", "yes", "on", "0", "false", "no", "off", ""):
        value = value.strip().lower() in ("1", "true", "yes", "on")
    if not isinstance(value, bool):
        raise UserError(f"invoke config: 'check' must be true or false, not {value!r}")
    return bool(flag) or value


def task(*args, **kwargs):
    """invoke's @task, except that a UserError ends the run with its message
    (exit status 1) instead of a traceback."""

    def decorate(body):
        @functools.wraps(body)
        def wrapper(c, *a, **kw):
            try:
                return body(c, *a, **kw)
            except UserError as exc:
                raise Exit(f"error: {exc}", code=1) from None

        return invoke_task(**kwargs)(wrapper)

    if len(args) == 1 and callable(args[0]) and not kwargs:
        return decorate(args[0])
    return decorate


COMMON_HELP = {
    "hosts": "only these hosts (comma-separated inventory names), e.g. e1server,e2server",
    "check": "dry run: show the diff of every file and every command that would change a host; change nothing",
}
READONLY_HELP = {"check": "accepted for uniformity: this task only reads, with or without it"}


def runbook(*args, readonly: bool = False, **kwargs):
    """A task that works on hosts. The body gets a `Run` (inventory, selected
    hosts, secrets, check mode, report) instead of the invoke Context, and the
    task gains --hosts and --check. At the end a recap per host is printed; a
    failure ends the run with status 1 and the reason, without a traceback.

    Check mode is on with --check, or `check: true` in invoke's config
    (INVOKE_CHECK=1).

    ``@runbook(readonly=True)``: a task that only reads (a status, a listing).
    What it prints (its tables, notes, per-host lines) is the whole output: no
    recap table and no "N ok, N changed ... nothing to do" line, since there is
    nothing to change. An error still ends it with the message and status 1,
    and a host that failed is named at the end (status 1 too)."""

    tier = kwargs.pop("tier", None)  # the collection it appears in, when not its module's (rescue's tasks)

    def decorate(body):
        sig = inspect.signature(body)
        params = list(sig.parameters.values())[1:]
        params += [
            inspect.Parameter("hosts", inspect.Parameter.KEYWORD_ONLY, default=None),
            inspect.Parameter("check", inspect.Parameter.KEYWORD_ONLY, default=False),
        ]
        ctx_param = inspect.Parameter("c", inspect.Parameter.POSITIONAL_OR_KEYWORD)

        @functools.wraps(body)
        def wrapper(c, *a, hosts=None, check=False, **kw):
            # Imported when the task runs, not when it is declared: paramiko and
            # fabric stay out of `inv --list` and `inv --help TASK`.
            from .remote import Run

            try:
                check = check_mode(c, check)
                run = Run(load_inventory(c), title=_task_title(body, tier), only=hosts, check=check)
            except UserError as exc:
                raise Exit(f"error: {exc}", code=1) from None
            if run.inv.overridden or run.inv.retired:
                run.report.note(f"roles from {run.inv.roles_file} (a rescue's record) over {run.inv.path}: "
                                + "; ".join([f"{h}: {', '.join(run.inv.hosts[h].roles) or 'no roles'}"
                                             for h in run.inv.overridden]
                                            + [f"{h}: retired (left out)" for h in run.inv.retired]))
            try:
                result = body(run, *a, **kw)
            except UserError as exc:
                run.report.error(str(exc))
                if readonly:
                    run.report.end_readonly()
                elif run.report.counts:  # something was done or checked before the error: say what
                    run.report.recap(stopped=str(exc))
                run.close()
                raise Exit(code=1) from None
            except (Exit, KeyboardInterrupt):
                run.close()
                raise
            except Exception as exc:  # a bug: one line for the operator, the traceback in the log
                run.report.log(traceback.format_exc())
                run.report.error(f"internal error in {_task_title(body, tier)}: {type(exc).__name__}: {exc} "
                                 f"(traceback in {run.report.log_path})")
                run.close()
                raise Exit(code=2) from None
            if readonly:
                run.report.end_readonly()
            else:
                run.report.recap()
            run.close()
            if run.report.failed:
                raise Exit(code=1)
            return result

        wrapper.__signature__ = sig.replace(parameters=[ctx_param, *params])
        del wrapper.__wrapped__
        wrapper.runbook = body  # the body, for tests that drive it with a recording Run
        wrapper.readonly = readonly
        kwargs["help"] = {**COMMON_HELP, **(READONLY_HELP if readonly else {}), **kwargs.get("help", {})}
        kwargs.setdefault("auto_shortflags", False)
        return invoke_task(**kwargs)(wrapper)

    if len(args) == 1 and callable(args[0]) and not kwargs:
        return decorate(args[0])
    return decorate


def _task_title(body, tier: str | None = None) -> str:
    """tier.task-name: the tier is the module (or package) under fabfile/ the task lives in,
    or the collection it was declared for (``tier``)."""
    parts = body.__module__.split(".")
    module = tier or (parts[1] if parts[0] == "fabfile" and len(parts) > 1 else parts[-1])
    name = body.__name__.rstrip('_').replace('_', '-')
    return name if name == module else f"{module}.{name}"  # a root task (`inv status`) by its own name
