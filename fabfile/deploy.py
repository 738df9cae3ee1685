"""Deploy whole systems: each tier in the order the systems need."""

from . import base
from .core import runbook


@runbook(default=True)
def all(run):
    """Deploy everything in the inventory, tier by tier (base first)."""
    base.converge(run)
