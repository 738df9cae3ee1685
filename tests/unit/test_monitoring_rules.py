"""Prometheus alerting rules (configs/monitoring/etc/prometheus/rules/hastack.rules.yml.j2):
rendered for the shipped inventories they pass `promtool check rules`, and every
alert fires, and stays quiet, as tests/unit/promtool/*_test.yml expect
(`promtool test rules`); the groups and thresholds follow the inventory."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from fabfile.core import templates
from fabfile.core.inventory import Thresholds, load, parse
from fabfile.monitoring.rules import RULES_TEMPLATE, _duration, rule_vars
from tests.unit.shipped import INVENTORIES

ROOT = Path(__file__).resolve().parents[2]
LAB = ROOT / "inventory/lab.yml"
FIXTURES = sorted((Path(__file__).parent / "promtool").glob("*_test.yml"))
RULES_NAME = "hastack.rules.yml"  # what the fixtures' rule_files name, beside them

# Alerts whose subject is not one host: they name what they are about instead.
NO_INSTANCE = {"PacemakerResourceNotRunning": "a resource stopped on every node has no node"}


def promtool() -> str:
    found = shutil.which("promtool")
    venv = Path(sys.executable).parent / "promtool"
    if found is None and venv.is_file():
        found = str(venv)
    if found is None:
        pytest.fail("promtool not found (neither on PATH nor next to the venv's python): "
                    "install Debian 12's `prometheus` package or copy its promtool into .venv/bin")
    return found


def no_secret(name):
    raise AssertionError(f"the rules need no secret, asked for {name}")


def render(inv) -> str:
    host = inv.with_role("monitoring")[0]
    return templates.render(RULES_TEMPLATE, inv, host, no_secret, **rule_vars(inv))


def rules_of(text: str) -> dict[str, dict]:
    return {r["alert"]: r for g in yaml.safe_load(text)["groups"] for r in g["rules"]}


def groups_of(text: str) -> list[str]:
    return [g["name"] for g in yaml.safe_load(text)["groups"]]


def run(*argv: str, cwd: Path) -> str:
    done = subprocess.run([promtool(), *argv], cwd=cwd, capture_output=True, text=True, timeout=120)
    out = done.stdout + done.stderr
    assert done.returncode == 0, f"promtool {' '.join(argv)} failed:\n{out}"
    return out


def check(text: str, where: Path) -> Path:
    where.mkdir(parents=True, exist_ok=True)
    path = where / RULES_NAME
    path.write_text(text)
    run("check", "rules", RULES_NAME, cwd=where)
    return path


def without(data: dict, sections: tuple[str, ...], roles: set[str]) -> None:
    """Take a stack out of inventory data: its sections, its hosts, its VIPs."""
    for section in sections:
        data.pop(section)
    data["hosts"] = {n: h for n, h in data["hosts"].items() if not roles & set(h["roles"])}
    data["vips"] = {n: v for n, v in data["vips"].items() if v["role"] not in roles}
    jobs = data.get("backup", {}).get("jobs", {})
    data.get("backup", {})["jobs"] = {n: j for n, j in jobs.items() if j["client"] in data["hosts"]}


def variant(tmp_path: Path, change) -> object:
    """inventory/lab.yml changed by ``change(data)``, validated like any inventory."""
    data = yaml.safe_load(LAB.read_text())
    change(data)
    return parse(yaml.safe_dump(data), tmp_path / "variant.yml")


# --- every shipped inventory --------------------------------------------------------------


MONITORED = [p for p in INVENTORIES if load(p).with_role("monitoring")]


@pytest.mark.parametrize("inventory", MONITORED, ids=lambda p: p.name)
def test_rules_render_valid_for_every_shipped_inventory(inventory, tmp_path):
    text = render(load(inventory))
    assert text.startswith("# Managed by hastack (configs/monitoring/etc/prometheus/rules/")
    check(text, tmp_path)


@pytest.mark.parametrize("inventory", ["lab.yml", "example.yml"])
def test_every_alert_fires_and_stays_quiet_as_the_promtool_tests_say(inventory, tmp_path):
    inv = load(ROOT / "inventory" / inventory)
    v = rule_vars(inv)
    # The fixtures' numbers (cluster of 3, 1 replica, default thresholds) are these:
    assumed = {"galera_nodes": 3, "pg_replicas": 1, "backup": True, "rate_window": "5m",
               "replication_lag": "30s", "disk_free_percent": 10, "memory_available_percent": 10,
               "certificate_days": 21, "backup_age_hours": 26}
    assert {k: v[k] for k in assumed} == assumed, f"{inventory}: tests/unit/promtool/ assume {assumed}"
    assert len(v["pacemaker_nodes"]) == 3
    check(render(inv), tmp_path)
    for fixture in FIXTURES:
        shutil.copy(fixture, tmp_path / fixture.name)
    run("test", "rules", *(f.name for f in FIXTURES), cwd=tmp_path)


def test_the_promtool_tests_cover_every_alert_firing_and_quiet():
    alerts = set(rules_of(render(load(LAB))))
    firing, quiet = set(), set()
    for fixture in FIXTURES:
        doc = yaml.safe_load(fixture.read_text())
        assert doc["rule_files"] == [RULES_NAME], fixture.name
        for case in doc["tests"]:
            for t in case["alert_rule_test"]:
                (firing if t["exp_alerts"] else quiet).add(t["alertname"])
    assert alerts - firing == set(), "alerts no promtool test expects to fire"
    assert alerts - quiet == set(), "alerts no promtool test expects to stay quiet"
    assert (firing | quiet) - alerts == set(), "promtool tests of alerts that do not exist"


def test_the_promtool_tests_catch_a_slower_galera_alert(tmp_path):
    """The fixtures check the `for:` too: the lab expects Galera to page within 1m."""
    rule = 'mysql_global_status_wsrep_cluster_status{job="mysqld"} != 1\n        for: '
    text = render(load(LAB))
    assert rule + "1m" in text
    check(text.replace(rule + "1m", rule + "2m"), tmp_path)
    shutil.copy(Path(__file__).parent / "promtool/galera_test.yml", tmp_path)
    done = subprocess.run([promtool(), "test", "rules", "galera_test.yml"], cwd=tmp_path,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode != 0 and "GaleraNotPrimary" in done.stdout + done.stderr


def test_every_alert_has_severity_for_and_annotations_naming_the_target():
    for name, rule in rules_of(render(load(LAB))).items():
        assert rule["labels"]["severity"] in ("critical", "warning"), name
        assert rule.get("for"), f"{name} has no `for:`"
        assert set(rule["annotations"]) == {"summary", "description"}, name
        if name not in NO_INSTANCE:
            for key, text in rule["annotations"].items():
                assert "{{ $labels.instance }}" in text, f"{name}.{key} does not name the instance"
        # Jinja left nothing of its own; Prometheus's templates all start with $.
        for text in rule["annotations"].values():
            assert "{{" not in text.replace("{{ $", "")


def test_host_down_and_galera_page_within_a_minute():
    rules = rules_of(render(load(LAB)))
    for name in ("HostDown", "GaleraMysqldDown", "GaleraNotPrimary", "GaleraClusterSizeLow", "GaleraNodeNotSynced"):
        assert rules[name]["for"] in ("30s", "1m"), name


# --- the inventory decides ----------------------------------------------------------------


def test_groups_follow_the_stacks_of_the_inventory(tmp_path):
    lab = render(load(LAB))
    assert groups_of(lab) == ["hosts", "probes", "galera", "pacemaker", "postgresql", "backup"]

    no_mail = render(variant(tmp_path, lambda d: without(
        d, ("mail", "webmail"), {"webmail", "mail_backend", "galera"})))
    assert groups_of(no_mail) == ["hosts", "probes", "postgresql", "backup"]
    check(no_mail, tmp_path / "no_mail")

    no_xmpp = render(variant(tmp_path, lambda d: without(
        d, ("xmpp",), {"ejabberd", "postgres_primary", "postgres_replica"})))
    assert groups_of(no_xmpp) == ["hosts", "probes", "galera", "pacemaker", "backup"]
    check(no_xmpp, tmp_path / "no_xmpp")

    no_backup = render(variant(tmp_path, lambda d: (d["hosts"].pop("bk1server"), d.pop("backup"))))
    assert groups_of(no_backup) == ["hosts", "probes", "galera", "pacemaker", "postgresql"]
    check(no_backup, tmp_path / "no_backup")

    def no_replica(d):
        d["hosts"]["psql2server"]["roles"] = ["spare"]
        d["backup"]["jobs"].pop("psql2-dump")  # its pg_dump ran on the replica
    alone = rules_of(render(variant(tmp_path, no_replica)))
    assert "PostgreSQLDown" in alone and "PostgreSQLArchiverFailing" in alone
    assert "PostgreSQLReplicaNotStreaming" not in alone and "PostgreSQLReplicationLag" not in alone


def test_thresholds_and_counts_come_from_the_inventory(tmp_path):
    def change(d):
        d["monitoring"]["thresholds"] = {"disk_free_percent": 20, "memory_available_percent": 7.5,
                                         "replication_lag_seconds": 2.5, "certificate_days": 30,
                                         "backup_age_hours": 48}
        d["monitoring"]["scrape_interval"] = 120
        for name, last in (("pxc4", 123), ("pxc5", 124)):
            addresses = {"mgmt": f"10.200.0.{last}", "mail": f"10.200.11.{last}"}
            d["hosts"][name] = {"roles": ["galera"], "addresses": addresses}
        d["hosts"]["r1server"]["roles"] = ["postgres_replica"]

    text = render(variant(tmp_path, change))
    check(text, tmp_path)
    rules = rules_of(text)
    assert re.search(r"\* 100\s+< 20\s", rules["HostDiskAlmostFull"]["expr"])
    assert rules["HostMemoryLow"]["expr"].endswith("* 100 < 7.5")
    assert "offset 2500ms" in rules["PostgreSQLReplicationLag"]["expr"]
    assert rules["CertificateExpiring"]["expr"].endswith("< 30 * 86400")
    assert rules["BackupTooOld"]["expr"].endswith("> 48 * 3600")
    assert rules["GaleraClusterSizeLow"]["expr"].endswith("< 5")
    assert rules["PostgreSQLReplicaNotStreaming"]["expr"].rstrip().endswith("< 2")
    assert "[8m]" in rules["PostgreSQLArchiverFailing"]["expr"]  # 4 scrapes of 2m
    assert "below 20%" in rules["HostDiskAlmostFull"]["annotations"]["description"]


def test_inventory_without_monitoring_section_gets_the_default_thresholds(tmp_path):
    inv = variant(tmp_path, lambda d: d.pop("monitoring"))
    t = Thresholds()
    v = rule_vars(inv)
    assert (v["disk_free_percent"], v["certificate_days"]) == (t.disk_free_percent, t.certificate_days)
    assert v["rate_window"] == "5m"  # scrape_interval's default, 15s


@pytest.mark.parametrize("seconds, text", [(30, "30s"), (300, "5m"), (90, "90s"), (2.5, "2500ms"),
                                           (7200, "2h"), (480, "8m"), (30.0, "30s")])
def test_durations_are_promql_durations(seconds, text):
    assert _duration(seconds) == text
