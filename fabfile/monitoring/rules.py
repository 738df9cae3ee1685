"""The alerting rules' variables: what configs/monitoring/etc/prometheus/rules/
hastack.rules.yml.j2 needs from the inventory (which groups the site has, the
thresholds of `monitoring.thresholds`, windows that fit the scrape interval)."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from fabfile.core.inventory import Inventory

RULES_TEMPLATE = "monitoring/etc/prometheus/rules/hastack.rules.yml.j2"
RULES_FILE = "/etc/prometheus/rules/hastack.rules.yml"


def _number(value: float) -> int | float:
    """26.0 -> 26 (PromQL reads both, people read the first)."""
    return int(value) if float(value).is_integer() else value


def _duration(seconds: float) -> str:
    """A PromQL duration: 300 -> 5m, 30 -> 30s, 2.5 -> 2500ms (no fractions allowed)."""
    ms = round(seconds * 1000)
    for unit, size in (("h", 3_600_000), ("m", 60_000), ("s", 1000)):
        if ms % size == 0:
            return f"{ms // size}{unit}"
    return f"{ms}ms"


def rule_vars(inv: Inventory) -> dict:
    from fabfile.core.inventory import Monitoring, Thresholds
    from fabfile.core.topology import BACKUP, cluster_nodes, galera_nodes, pg_replicas

    t = inv.monitoring.thresholds if inv.monitoring else Thresholds()
    scrape = inv.monitoring.scrape_interval if inv.monitoring else Monitoring.model_fields["scrape_interval"].default
    return {
        # Groups: a stack the inventory does not have gets no rules.
        "galera_nodes": len(galera_nodes(inv)) if inv.mail else 0,
        "pacemaker_nodes": cluster_nodes(inv) if inv.mail else [],
        "postgres": inv.xmpp is not None,
        "pg_replicas": len(pg_replicas(inv)) if inv.xmpp else 0,
        "backup": bool(inv.with_role(BACKUP)),
        # Thresholds.
        "disk_free_percent": _number(t.disk_free_percent),
        "memory_available_percent": _number(t.memory_available_percent),
        "replication_lag": _duration(t.replication_lag_seconds),
        "certificate_days": t.certificate_days,
        "backup_age_hours": _number(t.backup_age_hours),
        # increase() needs a few samples in its window: 5m, or 4 scrapes when they are rarer.
        "rate_window": _duration(max(300, 4 * scrape)),
    }
