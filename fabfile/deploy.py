"""Deploy whole systems: each tier in the order the systems need.

Order: the tiers every host gets (base -> firewall -> gateway -> pki), then the
XMPP service and the mail cluster, each only when the inventory describes it,
then, side by side, monitoring (its exporters need the services and their
accounts) and Bacula (its jobs back up hosts of both systems and the monitoring
host's data, which need not exist yet when the jobs are configured). The
WAL archive (walarchive) follows PostgreSQL in the XMPP chain.
keepalived serves a VIP of each system: the XMPP chain ends with the xmpp VIP,
the mail chain with the webmail VIP (after Roundcube, which its check watches).
The two systems run side by side when no host belongs to both (each still in
its own order); a failure in one stops the other before its next step. Beside
them a third chain installs the packages of the tiers that come last on their
hosts (webmail, monitoring, Bacula: `install(run)`, which needs nothing of the
systems; on a host two chains install onto, one apt runs at a time): the
front ends and the monitoring and backup hosts are not idle until the mail
cluster stands, and those tiers only configure when their turn comes. Each
tier module has `converge(run)`; a new tier adds itself to one list here.
"""

from invoke import Collection

from . import base, firewall, gateway, pki
from . import ejabberd, keepalived, postgres, walarchive
from . import dbproxy, mail, pxc
from . import backup, cluster, drbd, monitoring, webmail
from .core import runbook, topology

class _Vips:
    """keepalived for some VIPs only, as one tier of a chain (each host still gets all its VIPs)."""

    def __init__(self, *names: str):
        self.names = names
        self.preflight = keepalived.preflight

    def converge(self, run) -> None:
        keepalived.converge(run, vips=self.names)


COMMON = [base, firewall, gateway, pki]  # the gateway forwards once its FORWARD chain is in place
XMPP = [postgres, walarchive, ejabberd, _Vips("xmpp")]
class _TableGrants:
    """pxc's accounts step again: a grant on one table waits until the mail tier made it."""

    converge = staticmethod(pxc.table_grants)


# galera -> database proxy -> mail services (vmail uid first) -> storage and cluster
# -> grants on the mail tier's tables -> webmail and its VIP
MAIL = [pxc, dbproxy, mail, drbd, cluster, _TableGrants, webmail, _Vips("webmail")]
MONITORING = [monitoring]
# Tiers whose packages install beside the systems (their `install(run)`), before their turn.
EARLY_PACKAGES = [webmail, monitoring, backup]
# Bacula's clients may be hosts of either system and the monitoring host (its data).
BACKUP = [backup]
XMPP_ROLES = (topology.EJABBERD, topology.PG_PRIMARY, topology.PG_REPLICA)
MAIL_ROLES = (topology.GALERA, topology.MAIL_BACKEND, topology.WEBMAIL)
BUSY_ROLES = (topology.GALERA, topology.MAIL_BACKEND)


def _preflight(run, tiers) -> None:
    # What every tier must find true is checked before the first one touches a
    # host (a firewall table that would lock SSH out, a missing fence secret,
    # --hosts naming part of a cluster): a refused deploy changed nothing.
    for tier in tiers:
        if hasattr(tier, "preflight"):
            tier.preflight(run)


def _converge(run, tiers) -> None:
    _preflight(run, tiers)
    for tier in tiers:
        tier.converge(run)


def _chain(run, tiers):
    def converge() -> None:
        for tier in tiers:
            tier.converge(run)
    return converge


def _installs(run, tiers, among):
    def install() -> None:
        for tier in tiers:
            tier.install(run, among)
    return install


@runbook(default=True)
def all(run):
    """Deploy everything in the inventory: the common tiers, then both systems side by side."""
    systems = {}
    if run.inv.xmpp is not None:
        systems["xmpp"] = XMPP
    if run.inv.mail is not None:
        systems["mail"] = MAIL
    _preflight(run, COMMON + [t for tiers in systems.values() for t in tiers] + MONITORING + BACKUP)
    for tier in COMMON:
        tier.converge(run)
    # not on the hosts the mail chain keeps busy from its first step to its last (Galera,
    # the back ends): an apt there would hold up the chain that ends last
    packages = _installs(run, EARLY_PACKAGES, set(run.hosts()) - set(run.inv.with_role(*BUSY_ROLES)))
    shared = set(run.inv.with_role(*XMPP_ROLES)) & set(run.inv.with_role(*MAIL_ROLES))
    if shared:  # a host in both systems: one after the other
        run.report.note(f"deploy: {', '.join(sorted(shared))} belong to both systems; they deploy one after the other")
        run.side_by_side({"systems": _chain(run, [t for tiers in systems.values() for t in tiers]),
                          "packages": packages})
    else:
        run.side_by_side({**{name: _chain(run, tiers) for name, tiers in systems.items()}, "packages": packages})
    # Both need the systems and neither needs the other: side by side (on the hosts they
    # share, one apt at a time).
    run.side_by_side({"monitoring": _chain(run, MONITORING), "backup": _chain(run, BACKUP)})


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


@runbook(name="monitoring")
def monitoring_(run):
    """Only monitoring: exporters everywhere, Prometheus and Alertmanager (the systems must have run)."""
    _converge(run, MONITORING)


@runbook(name="backup")
def backup_(run):
    """Only Bacula: the director, storage and catalog on the backup host, the file daemons (the systems must have run)."""
    _converge(run, BACKUP)


ns = Collection("deploy", all, common, xmpp, mail, monitoring_, backup_)
