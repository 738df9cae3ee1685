"""Deploy whole systems: each tier in the order the systems need.

Order: base (identity, apt, packages) -> gateway (routes between the XMPP
segments) -> firewall (default-drop rules generated from the roles) -> pki
(our CA, a certificate per host). Each later tier adds itself here.
"""

from . import base, firewall, gateway, pki
from .core import runbook

TIERS = [base, gateway, firewall, pki]


@runbook(default=True)
def all(run):
    """Deploy everything in the inventory, tier by tier (base first)."""
    for tier in TIERS:
        tier.converge(run)
