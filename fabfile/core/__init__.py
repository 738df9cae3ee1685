"""The small core every tier uses: inventory, execution, templates, secrets, reporting."""

import sys

import six

# patchwork 1.0.1 imports invoke.vendor.six, which invoke 2 no longer vendors.
sys.modules.setdefault("invoke.vendor.six", six)

from .errors import StepFailed, UserError  # noqa: E402
from .remote import HostFailed, HostSession, Run  # noqa: E402
from .tasks import inventory_path, load_inventory, runbook, task  # noqa: E402

__all__ = [
    "HostFailed", "HostSession", "Run", "StepFailed", "UserError",
    "inventory_path", "load_inventory", "runbook", "task",
]
