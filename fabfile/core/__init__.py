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
- ``shell``: the one quoting path (``q``, ``join``); ``sql``: SQL literals and
  the psql/mysql command lines; ``prompt``: the hidden password prompt and
  confirmations; ``wait``: polling with a deadline.
- ``templates`` (Jinja2 over configs/), ``secrets``, ``report``, ``tasks``
  (``@runbook`` / ``@task``), ``testing`` (the recording host for unit tests).
"""

import sys

import six

# patchwork 1.0.1 imports invoke.vendor.six, which invoke 2 no longer vendors.
sys.modules.setdefault("invoke.vendor.six", six)

from .errors import StepFailed, UserError  # noqa: E402
from .remote import HostFailed, HostSession, Result, Run  # noqa: E402
from .shell import join, q  # noqa: E402
from .tasks import inventory_path, load_inventory, runbook, task  # noqa: E402

__all__ = [
    "HostFailed", "HostSession", "Result", "Run", "StepFailed", "UserError",
    "inventory_path", "join", "load_inventory", "q", "runbook", "task",
]
