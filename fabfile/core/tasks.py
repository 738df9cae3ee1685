"""The task decorator every collection uses, and how a task finds its inventory."""

from __future__ import annotations

import functools
from pathlib import Path

from invoke import Context
from invoke import task as invoke_task
from invoke.exceptions import Exit

from .errors import UserError
from .inventory import Inventory, load

PROJECT_ROOT = Path(__file__).resolve().parents[2]
DEFAULT_INVENTORY = "inventory/lab.yml"


def inventory_path(c: Context) -> Path:
    """The inventory chosen through invoke's config: `inventory:` in invoke.yaml,
    `inv -f FILE`, or the INVOKE_INVENTORY environment variable."""
    path = Path(c.config.get("inventory") or DEFAULT_INVENTORY).expanduser()
    if not path.is_absolute() and not path.exists() and (PROJECT_ROOT / path).exists():
        path = PROJECT_ROOT / path
    return path


def load_inventory(c: Context) -> Inventory:
    return load(inventory_path(c))


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
