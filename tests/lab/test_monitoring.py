"""Monitoring on the lab: Prometheus's HTTP API (over HTTPS through nginx, our
CA verified, basic auth) and a real browser.

- every target the inventory implies is `up` (the expected list is computed
  here from the inventory's roles, not read from the rendered config);
- the blackbox probes of every VIP succeed; a service whose certificate comes
  from another CA fails the same probe;
- a Galera node powered off: the Galera alert fires within its `for:` (the
  seconds are printed) and resolves after the node is back and `pxc.deploy`
  ran; the replica's PostgreSQL stopped: the replication alert fires, and
  resolves once it runs again;
- chromium opens Prometheus's UI over HTTPS, runs a query, saves a screenshot.
"""

from __future__ import annotations

import http.client
import json
import socket
import ssl
import subprocess
import sys
import time
import urllib.parse
from pathlib import Path
from types import SimpleNamespace

import pytest
import yaml

from fabfile.core.secrets import token
from tests.lab.browser import lab_browser, screenshot

pytestmark = pytest.mark.lab

# What the test expects from the inventory's roles (its own table, not the tier's).
JOBS_BY_ROLE = {
    "galera": ["mysqld"],
    "postgres_primary": ["postgres"],
    "postgres_replica": ["postgres"],
    "mail_backend": ["hacluster", "postfix"],
    "webmail": ["nginx"],
}


def ok(out) -> None:
    assert out.returncode == 0, f"{out.args}\n{out.stdout[-5000:]}\n{out.stderr[-3000:]}"


class _Https(http.client.HTTPSConnection):
    """HTTPS to ``address`` for ``name``: the certificate is checked for the name."""

    def __init__(self, name: str, address: str, ctx: ssl.SSLContext):
        super().__init__(name, 443, context=ctx, timeout=30)
        self._address = address

    def connect(self):
        sock = socket.create_connection((self._address, 443), self.timeout)
        self.sock = self._context.wrap_socket(sock, server_hostname=self.host)


@pytest.fixture(scope="module")
def m(lab, tmp_path_factory):
    inv = lab.inv
    if inv.monitoring is None:
        pytest.skip("the lab inventory has no monitoring section")
    ok(lab.invoke("monitoring.deploy"))
    mon = inv.with_role("monitoring")[0]
    folder = tmp_path_factory.mktemp("monitoring")
    ca = folder / "ca.crt"
    ok(lab.invoke("pki.export-ca", "--path", str(ca)))
    secrets = yaml.safe_load(inv.path.with_name(inv.path.stem + ".secrets.yml").read_text())
    password = secrets["monitoring_web_password"]
    ctx = ssl.create_default_context(cafile=str(ca))
    name, address = inv.fqdn(mon), inv.management_address(mon)

    def get(path: str, **params) -> dict:
        conn = _Https(name, address, ctx)
        import base64

        auth = base64.b64encode(f"admin:{password}".encode()).decode()
        conn.request("GET", path + ("?" + urllib.parse.urlencode(params) if params else ""),
                     headers={"Authorization": f"Basic {auth}"})
        resp = conn.getresponse()
        body = resp.read()
        assert resp.status == 200, f"{path}: {resp.status} {body[:300]!r}"
        return json.loads(body)

    def query(expr: str) -> list[dict]:
        return get("/api/v1/query", query=expr)["data"]["result"]

    return SimpleNamespace(inv=inv, mon=mon, ca=ca, password=password, name=name, address=address, get=get,
                           query=query, folder=folder)


def expected_targets(inv) -> set[tuple[str, str]]:
    out = {("prometheus", "mon1server"), ("alertmanager", "mon1server")}
    for host, h in inv.hosts.items():
        out.add(("node", host))
        for role in h.roles:
            for job in JOBS_BY_ROLE.get(role, []):
                out.add((job, host))
    if inv.mail is not None and inv.mail.db_proxy == "haproxy":
        out.add(("haproxy", "dbproxy"))  # HAProxy's own endpoint, on the dbproxy VIP (where HAProxy runs)
    return out


def wait_for(what: str, probe, timeout: float, interval: float = 5):
    deadline = time.monotonic() + timeout
    while True:
        got = probe()
        if got:
            return got
        if time.monotonic() > deadline:
            pytest.fail(f"{what}: not within {timeout:.0f} s")
        time.sleep(interval)


def test_every_expected_target_is_up(m):
    want = expected_targets(m.inv)

    def all_up():
        active = m.get("/api/v1/targets", state="active")["data"]["activeTargets"]
        health = {(t["labels"]["job"], t["labels"]["instance"]): t["health"] for t in active
                  if t["labels"]["job"] != "probe"}
        down = {k: v for k, v in health.items() if k in want and v != "up"}
        missing = want - set(health)
        return (not down and not missing, health, down, missing)

    deadline = time.monotonic() + 120
    while True:
        good, health, down, missing = all_up()
        if good or time.monotonic() > deadline:
            break
        time.sleep(5)
    assert not missing, f"targets Prometheus does not scrape: {sorted(missing)}"
    assert not down, f"targets not up: {down}"
    print(f"\n{len(want)} expected targets up: " + ", ".join(f"{j}/{i}" for j, i in sorted(want)))


def test_the_probes_of_every_vip_succeed_with_certificate_expiry(m):
    vips = {name for name, v in m.inv.vips.items() if v.names and name in ("mail", "webmail", "xmpp")}

    def results():
        got = {(r["metric"]["vip"], r["metric"]["module"]): r["value"][1] for r in m.query("probe_success")}
        return got if {v for v, _ in got} >= vips and all(x == "1" for x in got.values()) else None

    got = wait_for("every VIP probe succeeding", results, timeout=120)
    expiry = m.query("probe_ssl_earliest_cert_expiry - time()")
    days = {r["metric"]["vip"]: float(r["value"][1]) / 86400 for r in expiry}
    assert set(days) >= vips and all(d > 21 for d in days.values()), days
    print(f"\nprobes: {sorted(got)}; certificate days left: { {k: round(v) for k, v in days.items()} }")


# Dashboard metrics the lab cannot have, and why (the README's fidelity table).
NOT_IN_THE_LAB = {
    "ha_cluster_drbd_connections": "no DRBD in a container",
    "ha_cluster_drbd_connections_sync": "no DRBD in a container",
    "ha_cluster_drbd_resources": "no DRBD in a container",
    "node_timex_offset_seconds": "a container keeps the machine's clock: no time sync of its own",
    "node_timex_sync_status": "a container keeps the machine's clock: no time sync of its own",
    "node_textfile_mtime_seconds": "no textfile metrics until the backup tier writes them",
}


def test_every_dashboard_metric_is_exported_here(m):
    """Each metric the Grafana dashboards query has series in the lab's
    Prometheus, except those that only exist after an event and those the lab
    cannot have (listed above with the reason)."""
    from fabfile.monitoring import grafana

    wanted = set().union(*grafana.dashboard_metrics().values()) - set(grafana.EVENT_ONLY) - set(NOT_IN_THE_LAB)
    missing = sorted(name for name in wanted if not m.get("/api/v1/series", **{"match[]": name})["data"])
    assert not missing, f"dashboard metrics no exporter here exports: {missing}"
    print(f"\n{len(wanted)} dashboard metrics present in Prometheus")


def test_a_certificate_from_another_ca_fails_the_probe(lab, m):
    """Two TLS servers on the monitoring host for its own name: one with the
    certificate our CA issued, one self-signed. The blackbox exporter's https
    module accepts the first and refuses the second."""
    host, fqdn = m.mon, m.name
    script = (
        "set -e; d=$(mktemp -d); cd $d; "
        f"openssl req -x509 -newkey rsa:2048 -nodes -days 2 -subj /CN={fqdn} -addext subjectAltName=DNS:{fqdn} "
        "-keyout other.key -out other.crt 2>/dev/null; "
        f"(timeout 60 openssl s_server -quiet -www -accept 18443 -cert /etc/ssl/hastack/{host}.crt "
        f"-key /etc/ssl/hastack/{host}.key >/dev/null 2>&1 &); "
        "(timeout 60 openssl s_server -quiet -www -accept 18444 -cert other.crt -key other.key >/dev/null 2>&1 &); "
        "sleep 1; "
        f"for port in 18443 18444; do curl -s 'http://127.0.0.1:9115/probe?module=https&target=https://{fqdn}:'$port/ "
        "| grep '^probe_success'; done"
    )
    out = lab.run(host, script, timeout=90)
    ok(out)
    ours, other = out.stdout.split("\n")[:2]
    assert ours.strip() == "probe_success 1", out.stdout
    assert other.strip() == "probe_success 0", out.stdout


def _firing(m, alertname: str, **labels) -> list[dict]:
    alerts = m.get("/alertmanager/api/v2/alerts", active="true", silenced="false", inhibited="true")
    return [a for a in alerts if a["labels"].get("alertname") == alertname
            and all(a["labels"].get(k) == v for k, v in labels.items())]


def _rule(m, name: str) -> dict:
    """The alerting rule ``name`` as Prometheus loaded it (its query and `for:`)."""
    groups = m.get("/api/v1/rules", type="alert")["data"]["groups"]
    rules = [r for g in groups for r in g["rules"] if r["name"] == name]
    assert rules, f"Prometheus has no alerting rule {name}"
    return rules[0]


def test_status_on_the_healthy_lab_is_green(lab, m):
    out = lab.invoke("status", "--json")
    lines = json.loads(out.stdout)
    # yellow only where a tier is missing on purpose: backups (the backup tier is not built yet)
    bad = [line for line in lines if line["level"] != "green" and line["component"] != "backup"]
    assert out.returncode == 0 and not bad, f"{bad}\n{out.stderr[-2000:]}"
    components = {line["component"] for line in lines}
    assert {"galera", "pacemaker", "postgres", "ejabberd", "vip", "alerts"} <= components, components
    print(f"\ninv status: {len(lines)} lines, all green")


MAIL_CLIENT = Path(__file__).with_name("mail_client.py")


def _alert_mailbox(lab, m) -> tuple[str, str]:
    """monitoring.alert_email as a mailbox of the mail cluster, with a password this test knows."""
    box = m.inv.monitoring.alert_email
    if inv_domain(m.inv) != box.split("@")[1]:
        pytest.skip("monitoring.alert_email is not in the lab's mail domain")
    listing = lab.invoke("mail.list").stdout
    password = token(16)
    ok(lab.invoke("mail.set-password" if f"mailbox {box}" in listing else "mail.add-mailbox", box,
                  "--password", password))
    return box, password


def inv_domain(inv) -> str:
    return inv.mail.domain if inv.mail is not None else ""


def _fetch(lab, m, user: str, password: str, subject: str, wait: int) -> dict:
    """IMAP from a host of the mail network (the monitoring host's own namespace)."""
    spec = {"host": str(m.inv.vips["mail"].address), "ca": str(m.ca), "timeout": 30,
            "fetch": {"user": user, "password": password, "subject": subject, "wait": wait}}
    out = subprocess.run(["ip", "netns", "exec", lab.plan.netns(m.mon), sys.executable, str(MAIL_CLIENT)],
                         input=json.dumps(spec), capture_output=True, text=True, timeout=wait * 2 + 120)
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_galera_alert_fires_when_a_node_dies_and_resolves_after_pxc(lab, m):
    """...and Alertmanager mails it to monitoring.alert_email through the mail cluster."""
    rule = _rule(m, "GaleraClusterSizeLow")
    victim = m.inv.with_role("galera")[-1]
    box, password = _alert_mailbox(lab, m)
    t0 = time.monotonic()
    ok(lab.invoke("lab.power", victim, "off", timeout=120))
    try:
        wait_for(f"alert {rule['name']}", lambda: _firing(m, rule["name"]), timeout=rule["duration"] + 120)
        fired = time.monotonic() - t0
        print(f"\n{rule['name']} (for: {rule['duration']:.0f} s) fired {fired:.0f} s after {victim} went down")
        status = lab.invoke("status", "--json")
        red = [line for line in json.loads(status.stdout) if line["level"] == "red"]
        assert status.returncode != 0 and any(victim in json.dumps(line) for line in red), red
        got = _fetch(lab, m, box, password, f"[FIRING:1] {rule['name']}", wait=120)
        assert got["found"]["imaps"] >= 1, got
        print(f"the alert's mail reached {box} {time.monotonic() - t0:.0f} s after the power cut")
    finally:
        ok(lab.invoke("lab.power", victim, "on", timeout=300))
        lab.converge("pxc.deploy")
    wait_for(f"alert {rule['name']} resolved", lambda: not _firing(m, rule["name"]), timeout=240)
    print(f"resolved {time.monotonic() - t0:.0f} s after the power cut")


def test_replication_alert_fires_when_the_replica_stops_and_resolves(lab, m):
    rule = _rule(m, "PostgreSQLReplicaNotStreaming")
    replica = m.inv.with_role("postgres_replica")[0]
    t0 = time.monotonic()
    ok(lab.run(replica, "systemctl stop postgresql@15-main"))
    try:
        wait_for(f"alert {rule['name']}", lambda: _firing(m, rule["name"]), timeout=rule["duration"] + 120)
        print(f"\n{rule['name']} (for: {rule['duration']:.0f} s) fired {time.monotonic() - t0:.0f} s after the stop")
    finally:
        ok(lab.run(replica, "systemctl start postgresql@15-main"))
    wait_for(f"alert {rule['name']} resolved", lambda: not _firing(m, rule["name"]), timeout=240)


def test_prometheus_ui_in_a_real_browser(lab, m):
    # a browser on the management network (the UI listens there only), from the spare's namespace
    client = next(h for h in m.inv.hosts if h != m.mon)
    with lab_browser(lab.plan.netns(client), m.ca, {m.name: m.address}, m.folder) as browser:
        ctx = browser.new_context(http_credentials={"username": "admin", "password": m.password})
        page = ctx.new_page()
        page.goto(f"https://{m.name}/graph?g0.expr=up&g0.tab=1", wait_until="networkidle")
        page.get_by_text('job="node"').first.wait_for(timeout=30_000)
        screenshot(page, "test_monitoring", "prometheus-up-query")
        page.goto(f"https://{m.name}/alertmanager/#/alerts", wait_until="networkidle")
        screenshot(page, "test_monitoring", "alertmanager")
        assert "Alertmanager" in page.title()
