"""The small core every tier stands on.

- ``inventory``: the site (hosts, networks, VIPs, stacks), validated before any
  connection; ``Inventory.service_address`` / ``peer_addresses``.
- ``topology``: facts of the site several tiers need (who runs what, where,
  on which port, with which database account); tiers read them here, never
  from another tier.
- ``flows``: who talks to whom on which port (firewall and gateway rules).
- ``remote``: ``Run`` (one operator command) and ``HostSession`` (one host in
  it): probe / sh / ensure / template / put / packages / service / wait_for,
  ``Run.answering`` + ``Run.on_one`` for one-host operations, ``memo`` for
  state of a run.
- ``shell``: the one quoting path (``q``, ``join``) and a command's ``Result``;
  ``errors``: ``UserError``, ``StepFailed``, ``HostFailed``; ``sql``: SQL
  literals and the psql/mysql command lines; ``prompt``: the hidden password
  prompt and confirmations; ``wait``: polling with a deadline.
- ``templates`` (Jinja2 over configs/), ``secrets``, ``report``, ``tasks``
  (``@runbook`` / ``@task``), ``testing`` (the recording host for unit tests).

Listing the tasks (``inv --list``, ``inv --help TASK``) imports no heavy
library: paramiko/fabric, pydantic, jinja2, rich, cryptography and bcrypt load
when a task runs. Tiers name ``Run``, ``HostSession`` and ``Inventory`` in
annotations only (under ``TYPE_CHECKING``); tests/unit/test_tasks.py checks it.
"""

from .errors import HostFailed, StepFailed, UserError
from .shell import Result, join, q
from .tasks import inventory_path, load_inventory, runbook, task

__all__ = [
    "HostFailed", "HostSession", "Result", "Run", "StepFailed", "UserError",
    "inventory_path", "join", "load_inventory", "q", "runbook", "task",
]

# Run and HostSession need paramiko and fabric (~0.3 s to import): they are
# loaded on first use (PEP 562), so that `inv --list` and `inv --help TASK` do
# not pay for them. Tiers name them in annotations only (under TYPE_CHECKING).
_REMOTE = ("HostSession", "Run")


def __getattr__(name: str):
    if name in _REMOTE:
        from . import remote  # lazy: see _REMOTE

        return getattr(remote, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
