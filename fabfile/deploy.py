"""Deploy whole systems: each tier in the order the systems need."""

from .core import task


@task(default=True)
def all(c):
    """Deploy everything in the inventory, tier by tier."""
    print("no tiers yet")
