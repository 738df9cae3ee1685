"""Deploy whole systems: each tier in the order the systems need.

Order: the tiers every host gets (base -> firewall -> gateway -> pki), then the
XMPP service and the mail cluster, each only when the inventory describes it.
Each tier module has `converge(run)`; a new tier adds itself to one list here.
"""

from invoke import Collection

from . import base, firewall, gateway, pki
from . import ejabberd, keepalived, postgres
from . import dbproxy, mail, pxc
from . import cluster, drbd
from .core import runbook

COMMON = [base, firewall, gateway, pki]  # the gateway forwards once its FORWARD chain is in place
XMPP = [postgres, ejabberd, keepalived]
MAIL = [pxc, dbproxy, mail, drbd, cluster]  # galera -> database proxy -> mail services (vmail uid first) -> storage and cluster


def _converge(run, tiers) -> None:
    # What every tier must find true is checked before the first one touches a
    # host (a firewall table that would lock SSH out, a missing fence secret,
    # --hosts naming part of a cluster): a refused deploy changed nothing.
    for tier in tiers:
        if hasattr(tier, "preflight"):
            tier.preflight(run)
    for tier in tiers:
        tier.converge(run)


@runbook(default=True)
def all(run):
    """Deploy everything in the inventory, tier by tier (base first)."""
    tiers = COMMON + (XMPP if run.inv.xmpp is not None else []) + (MAIL if run.inv.mail is not None else [])
    _converge(run, tiers)


@runbook
def common(run):
    """Only the tiers every host gets: base, firewall, gateway, pki."""
    _converge(run, COMMON)


@runbook
def xmpp(run):
    """Only the XMPP service's tiers (the common tiers must have run)."""
    _converge(run, XMPP)


@runbook
def mail(run):
    """Only the mail cluster's tiers (the common tiers must have run)."""
    _converge(run, MAIL)


ns = Collection("deploy", all, common, xmpp, mail)
