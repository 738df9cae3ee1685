"""Grafana (production only) without hosts: the dashboards (JSON, datasource,
every query parsed by promtool, every metric name one of the exporters'),
the PromQL lexer that names them, the provisioning templates for the shipped
inventories, and `grafana.converge` on recording hosts: repository, pinned
key, package, provisioning, service, admin password."""

from __future__ import annotations

import configparser
import json
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from fabfile.core import Result, templates
from fabfile.core.errors import HostFailed, UserError
from fabfile.core.inventory import load
from fabfile.core.testing import RecordingRun, files_present, packages_present
from fabfile.monitoring import grafana

ROOT = Path(__file__).resolve().parents[2]
LAB = load(ROOT / "inventory/lab.yml")
HOST = "mon1server"
DASHBOARDS = {f.name: json.loads(f.read_text()) for f in grafana.dashboard_files()}
SHIPPED = ["hosts.json", "mail-cluster.json", "galera.json", "postgresql-ejabberd.json", "backups.json"]
SECRETS = {grafana.ADMIN_PASSWORD_SECRET: "Adm1nPassw0rdFromSecrets", grafana.SECRET_KEY_SECRET: "K3yK3yK3yK3yK3y"}


def panels(dashboard: dict) -> list[dict]:
    return list(grafana._panels(dashboard["panels"]))


# --- the dashboards ----------------------------------------------------------------------------


def test_the_five_dashboards_ship_with_unique_uids_and_titles():
    assert sorted(DASHBOARDS) == sorted(SHIPPED)
    uids = [d["uid"] for d in DASHBOARDS.values()]
    titles = [d["title"] for d in DASHBOARDS.values()]
    assert len(set(uids)) == len(uids) and len(set(titles)) == len(titles)
    for name, d in DASHBOARDS.items():
        assert re.fullmatch(r"[a-z0-9-]{1,40}", d["uid"]), name  # Grafana's uid limit
        assert d["editable"] is False and "hastack" in d["tags"], name


@pytest.mark.parametrize("name", SHIPPED)
def test_every_panel_and_query_uses_the_provisioned_datasource(name):
    d = DASHBOARDS[name]
    ids = [p["id"] for p in panels(d)]
    assert len(set(ids)) == len(ids), f"{name}: panel ids repeat"
    queries = 0
    for p in panels(d):
        g = p["gridPos"]
        assert g["x"] + g["w"] <= 24, f"{name}: {p['title']} is wider than the grid"
        if p["type"] == "row":
            continue
        assert p["datasource"] == {"type": "prometheus", "uid": grafana.DATASOURCE_UID}, p["title"]
        assert p["targets"], f"{name}: {p['title']} queries nothing"
        for t in p["targets"]:
            assert t["datasource"]["uid"] == grafana.DATASOURCE_UID and t["expr"].strip(), p["title"]
            queries += 1
    for var in d["templating"]["list"]:
        assert var["datasource"]["uid"] == grafana.DATASOURCE_UID, var["name"]
    assert queries >= 5


def test_no_two_panels_of_a_dashboard_overlap():
    for name, d in DASHBOARDS.items():
        cells: dict[tuple[int, int], str] = {}
        for p in panels(d):
            g = p["gridPos"]
            for x in range(g["x"], g["x"] + g["w"]):
                for y in range(g["y"], g["y"] + g["h"]):
                    assert (x, y) not in cells, f"{name}: {p['title']} overlaps {cells[(x, y)]}"
                    cells[(x, y)] = p["title"]


def promtool() -> str:
    found = shutil.which("promtool") or str(Path(sys.executable).parent / "promtool")
    if not Path(found).is_file():
        pytest.fail("promtool not found (on PATH or beside the venv's python): `./run test` installs it "
                    "from Debian's prometheus package into .venv/bin")
    return found


def check_rules(exprs: list[str], tmp_path: Path) -> subprocess.CompletedProcess:
    rules = {"groups": [{"name": "dashboards", "rules": [
        {"record": f"hastack_dashboard_expr_{n}", "expr": e} for n, e in enumerate(exprs)]}]}
    f = tmp_path / "rules.yml"
    f.write_text(yaml.safe_dump(rules, sort_keys=False))
    return subprocess.run([promtool(), "check", "rules", str(f)], capture_output=True, text=True)


def test_every_query_of_every_dashboard_parses_in_promtool(tmp_path):
    exprs = [grafana.grafana_to_promql(e) for d in DASHBOARDS.values() for e in grafana.dashboard_queries(d)]
    assert all("$" not in e for e in exprs)
    out = check_rules(exprs, tmp_path)
    assert out.returncode == 0, out.stdout + out.stderr
    assert f"SUCCESS: {len(exprs)} rules found" in out.stdout


def test_promtool_does_reject_a_broken_query(tmp_path):
    out = check_rules(['sum(rate(up[5m])'], tmp_path)
    assert out.returncode != 0 and "parse error" in out.stdout + out.stderr


def test_every_metric_a_dashboard_names_is_one_an_exporter_exports():
    used = grafana.dashboard_metrics()
    assert sorted(used) == sorted(SHIPPED)
    for name, metrics in used.items():
        assert metrics, name
        unknown = metrics - grafana.exported_names()
        assert not unknown, f"{name} queries metrics no exporter of ours exports: {sorted(unknown)}"
    # EXPORTED lists what the dashboards use, nothing stale
    assert grafana.exported_names() == set().union(*used.values())
    assert grafana.EVENT_ONLY <= grafana.exported_names()


def test_exported_names_belong_to_their_jobs():
    prefixes = {"node": ("node_", "hastack_backup_"), "postgres": ("pg_",), "mysqld": ("mysql_",),
                "hacluster": ("ha_cluster_",), "haproxy": ("haproxy_",), "postfix": ("postfix_",),
                "nginx": ("nginx_",), "probe": ("probe_",), "prometheus": ("prometheus_",),
                "alertmanager": ("alertmanager_",)}
    assert set(grafana.EXPORTED) == {"*", *prefixes}
    for job, names in grafana.EXPORTED.items():
        if job != "*":
            assert all(n.startswith(prefixes[job]) for n in names), job


def test_each_system_has_its_dashboard_and_the_xmpp_one_uses_the_probe_node_and_postgres():
    used = grafana.dashboard_metrics()
    assert {"probe_success", "node_cpu_seconds_total", "pg_up", "pg_stat_replication_pg_wal_lsn_diff"} \
        <= used["postgresql-ejabberd.json"]
    assert any('module="xmpp_starttls"' in e for e in grafana.dashboard_queries(DASHBOARDS["postgresql-ejabberd.json"]))
    assert {"ha_cluster_corosync_quorate", "postfix_showq_message_size_bytes_count", "nginx_up",
            "haproxy_server_status", "probe_success"} <= used["mail-cluster.json"]
    assert {"mysql_global_status_wsrep_cluster_size", "mysql_global_status_wsrep_local_state"} <= used["galera.json"]
    assert "hastack_backup_last_success_timestamp_seconds" in used["backups.json"]
    assert {"node_filesystem_avail_bytes", "up"} <= used["hosts.json"]


# --- the PromQL lexer --------------------------------------------------------------------------


@pytest.mark.parametrize("expr, names", [
    ("up", {"up"}),
    ('sum by (job, code) (rate(http_requests_total{job="api", code=~"5.."}[5m]))', {"http_requests_total"}),
    ("a / on (instance) group_left (nodename, release) node_uname_info", {"a", "node_uname_info"}),
    ("a * ignoring(mode) group_right b", {"a", "b"}),
    ('{__name__="foo", job="x"}', {"foo"}),
    ("foo offset 5m + bar @ start() - baz @ 1609746000", {"foo", "bar", "baz"}),
    ("max_over_time(rate(foo[5m])[1h30m:1m])", {"foo"}),
    ('label_replace(up, "dst", "$1", "src", "(.*)")', {"up"}),
    ("label_replace(x, `dst`, `$1`, `src`, `(.*)`)", {"x"}),
    ('count_values("version", build_info)', {"build_info"}),
    ("sum without (instance, job) (x) > bool 0.5e3", {"x"}),
    ("x # a comment naming metric_y\n + z", {"x", "z"}),
    ('absent(nonexistent{job="x"}) or vector(0)', {"nonexistent"}),
    ('"a string with some_metric in it"', set()),
    ("Inf + NaN + -inf + 0x1F + 1e-3 + .5 + 2", set()),
    ("job:up:sum / instance:node_cpu:rate5m", {"job:up:sum", "instance:node_cpu:rate5m"}),
    ("SUM(x) BY (y) AND ON() Count(z)", {"x", "z"}),
    ("topk(3, sort_desc(x)) unless y", {"x", "y"}),
    ("time() - timestamp(up)", {"up"}),
    ('histogram_quantile(0.9, sum by (le) (rate(d_bucket{le!="+Inf"}[5m])))', {"d_bucket"}),
    ("by_metric + on_metric + sum_total + group_x", {"by_metric", "on_metric", "sum_total", "group_x"}),
    ('x{a="}", b=~"{["} and y', {"x", "y"}),
])
def test_promql_metrics(expr, names):
    assert grafana.promql_metrics(expr) == names


@pytest.mark.parametrize("expr, error", [
    ("frobnicate(x)", r"unknown function frobnicate\(\)"),
    ('{__name__=~"node_.*"}', r"=~ matcher on __name__ names no metric"),
    ("sum(rate(x[5m])", r"unclosed bracket \(expected '\)'\)"),
    ("x{a='b']", r"unbalanced '\]'"),
    ("x ! y", r"unexpected"),
])
def test_promql_metrics_refuses_what_it_cannot_name(expr, error):
    with pytest.raises(ValueError, match=error):
        grafana.promql_metrics(expr)


def test_grafana_variables_become_something_promtool_parses():
    g = grafana.grafana_to_promql
    assert g('rate(x{i=~"$instance"}[$__rate_interval])') == 'rate(x{i=~"grafana_var"}[5m])'
    assert g('x{a="${sys:regex}", b="[[old]]"}[$__range]') == 'x{a="grafana_var", b="grafana_var"}[1h]'
    assert g('label_replace(x, "d", "$1", "s", "(.*)")') == 'label_replace(x, "d", "$1", "s", "(.*)")'


@pytest.mark.parametrize("query, expr", [
    ('label_values(node_uname_info{system=~"$system"}, instance)', 'node_uname_info{system=~"$system"}'),
    ('label_values(up{a="x,y", b=~"(c|d)"}, job)', 'up{a="x,y", b=~"(c|d)"}'),
    ("label_values(instance)", None),
    ("query_result(sum by (job) (up))", "sum by (job) (up)"),
    ("label_names()", None),
    ("node_load1", None),
])
def test_the_promql_of_a_template_variable(query, expr):
    assert grafana._variable_expr(query) == expr


# --- templates -----------------------------------------------------------------------------------


def inventory_with_grafana(tmp_path, name: str, **monitoring):
    data = yaml.safe_load((ROOT / "inventory" / name).read_text())
    data["monitoring"] = {"alert_email": "ops@example.com", **(data.get("monitoring") or {}), "grafana": True,
                          **monitoring}
    p = tmp_path / name
    p.write_text(yaml.safe_dump(data))
    return load(p)


def render_all(inv, secrets=SECRETS) -> dict[str, str]:
    host = inv.with_role("monitoring")[0]
    secret = secrets.__getitem__
    v = grafana.template_vars(inv, host, secret)
    return {dest: templates.render(name, inv, host, secret, **v) for name, dest in grafana.TEMPLATES.items()}


def ini(text: str) -> configparser.ConfigParser:
    c = configparser.ConfigParser(comment_prefixes=(";", "#"), interpolation=None)
    c.read_string(text)
    return c


@pytest.mark.parametrize("inventory", ["lab.yml", "example.yml"])
def test_grafana_ini_https_with_the_host_certificate_no_phoning_home(inventory, tmp_path):
    inv = inventory_with_grafana(tmp_path, inventory, scrape_interval=30)
    host = inv.with_role("monitoring")[0]
    files = render_all(inv)
    text = files[grafana.INI]
    assert text.startswith("; Managed by hastack (configs/monitoring/etc/grafana/grafana.ini.j2)")
    c = ini(text)
    mgmt = inv.management_address(host)
    for key, value in {"protocol": "https", "http_port": "3000", "http_addr": mgmt,
                       "cert_file": f"/etc/ssl/hastack/{host}.crt", "cert_key": f"/etc/ssl/hastack/{host}.key",
                       "root_url": f"https://{mgmt}:3000/"}.items():
        assert c["server"][key] == value, key
    assert {k: c["analytics"][k] for k in ("reporting_enabled", "check_for_updates", "check_for_plugin_updates")} \
        == dict.fromkeys(("reporting_enabled", "check_for_updates", "check_for_plugin_updates"), "false")
    assert c["auth.anonymous"]["enabled"] == "false" and c["users"]["allow_sign_up"] == "false"
    assert c["snapshots"]["external_enabled"] == "false"
    assert c["security"]["admin_user"] == "admin"
    assert c["security"]["admin_password"] == f'"""{SECRETS[grafana.ADMIN_PASSWORD_SECRET]}"""'
    assert c["security"]["secret_key"] == f'"""{SECRETS[grafana.SECRET_KEY_SECRET]}"""'
    assert c["paths"]["provisioning"] == grafana.PROVISIONING

    ds = yaml.safe_load(files[grafana.DATASOURCES_YAML])
    assert ds["apiVersion"] == 1
    [prom] = ds["datasources"]
    assert {k: prom[k] for k in ("uid", "type", "url", "access", "isDefault", "editable")} == {
        "uid": "prometheus", "type": "prometheus", "url": "http://127.0.0.1:9090", "access": "proxy",
        "isDefault": True, "editable": False}
    assert prom["jsonData"]["timeInterval"] == "30s"

    dash = yaml.safe_load(files[grafana.DASHBOARDS_YAML])
    [provider] = dash["providers"]
    assert provider["type"] == "file" and provider["allowUiUpdates"] is False
    assert provider["options"]["path"] == grafana.DASHBOARDS_DIR == "/var/lib/grafana/dashboards/hastack"
    assert provider["disableDeletion"] is False  # a dashboard whose file we removed goes


def test_a_secret_with_comment_characters_stays_whole_and_a_quote_is_refused(tmp_path):
    inv = inventory_with_grafana(tmp_path, "lab.yml")
    odd = {**SECRETS, grafana.ADMIN_PASSWORD_SECRET: "a;b#c d'e\\f"}
    c = ini(render_all(inv, odd)[grafana.INI])
    assert c["security"]["admin_password"] == '"""a;b#c d\'e\\f"""'
    with pytest.raises(UserError, match=r"secret 'grafana_admin_password' cannot go into grafana\.ini"):
        grafana.template_vars(inv, HOST, {**SECRETS, grafana.ADMIN_PASSWORD_SECRET: 'x"""y'}.__getitem__)


def test_the_default_scrape_interval_without_a_monitoring_section(tmp_path):
    data = yaml.safe_load((ROOT / "inventory/example.yml").read_text())
    data.pop("monitoring", None)
    (tmp_path / "inv.yml").write_text(yaml.safe_dump(data))
    inv = load(tmp_path / "inv.yml")
    assert grafana.template_vars(inv, "mon1server", SECRETS.__getitem__)["grafana_scrape_interval"] == "15s"
    assert render_all(inv)[grafana.INI].startswith("; Managed by hastack")


# --- converge on recording hosts -------------------------------------------------------------------

NOW = time.time()
FAR = int(NOW + 400 * 86400)


def colons(*keys: tuple[str, str, int | None]) -> str:
    """A `gpg --with-colons` listing of (fingerprint, validity, expiry) primary keys, each with a subkey."""
    out = []
    for fpr, validity, expires in keys:
        out += [f"pub:{validity}:3072:1:{fpr[-16:]}:1692894825:{expires or ''}::-:::scESC::::::23::0:",
                f"fpr:::::::::{fpr}:",
                "uid:-::::1755868989::5AF1078213A2BE652E6CBC82391A4481165C458D::Grafana Labs <engineering@grafana.com>::::::::::0:",
                "sub:-:3072:1:488427A542157EA4:1692894825:1818940985:::::e::::::23:",
                "fpr:::::::::AEF6B95F255D2E8FFE882226488427A542157EA4:"]
    return "\n".join(out) + "\n"


ARMORED = "-----BEGIN PGP PUBLIC KEY BLOCK-----\n\nmQGNBGTnhmkBDADUE+SzjRRyitIm1siGxiHlIlnn6KO4C4GfEuV+PNzqxvwYO+1r\n" \
          "=Zc9k\n-----END PGP PUBLIC KEY BLOCK-----\n"
OLD = "4E40DDF6D76E284A4A6780E48C8C34C524098CB6"  # Grafana's key retired in 2023, still in gpg-full.key
DOWNLOAD = colons((OLD, "-", None), (grafana.KEY_FINGERPRINT, "-", FAR)) + grafana._KEY_MARK + "\n" + ARMORED
# the lab inventory has an apt proxy: the key comes through it, as apt will reach the repository
FETCH = (r"^d=\$\(mktemp -d\) && .*curl -fsSL --max-time 60 --proxy http://10\.200\.0\.1:3142 "
         r"-o \"\$d/key\" https://apt\.grafana\.com/gpg-full\.key")
KEYRING_PROBE = (r"^test -s /etc/apt/keyrings/grafana\.asc && d=\$\(mktemp -d\) && trap .* EXIT && "
                 r"gpg --batch --no-tty --homedir \"\$d\" --show-keys --with-colons /etc/apt/keyrings/grafana\.asc$")
RUNNING = [(r"^systemctl is-enabled", Result(stdout="enabled\n")), (r"^systemctl is-active", Result())]
HEALTHY = (r"^for i in \$\(seq 120\); do curl .*/api/health", Result())


def installed(*names: str):
    return packages_present(*names)


def recording(rules, check=False) -> tuple[RecordingRun, object, dict]:
    run = RecordingRun(LAB, answers={HOST: rules}, secrets=dict(SECRETS), check=check)
    h = run.session(HOST)
    return run, h, h.tier_vars(grafana.template_vars)


def api_user(code: str):
    return r"^curl -sS --max-time 10 --cacert /etc/ssl/hastack/ca\.crt -o /dev/null -w '%\{http_code\}' -K - " \
           r"https://10\.200\.0\.16:3000/api/user$", Result(stdout=code)


def test_a_fresh_host_gets_the_key_the_repository_grafana_its_files_and_a_running_service():
    stale = (r"^find /var/lib/grafana/dashboards/hastack -maxdepth 1", Result(stdout="hosts.json\nold.json\n"))
    run, h, v = recording([(FETCH, Result(stdout=DOWNLOAD)), stale, HEALTHY, api_user("401")])
    grafana.converge(h, v)
    changes, commands = h.changes, h.commands

    def at(pattern: str) -> int:
        return next(i for i, c in enumerate(commands) if re.search(pattern, c))

    tools = at(r"^DEBIAN_FRONTEND=noninteractive apt-get install .* ca-certificates curl gpg \|\|")
    keyring = at(r"^mv -f /etc/apt/keyrings/grafana\.asc\.hastack-new /etc/apt/keyrings/grafana\.asc$")
    source = at(r"^mv -f /etc/apt/sources\.list\.d/grafana\.list\.hastack-new ")
    update = at(r"^j=\$\(cksum < /etc/hostname .*timeout \$t apt-get update")
    package = at(r"^DEBIAN_FRONTEND=noninteractive apt-get install .* grafana \|\|")
    group = at(r"^usermod -a -G ssl-cert grafana$")
    ini_at = at(r"^mv -f /etc/grafana/grafana\.ini\.hastack-new ")
    start = at(r"^systemctl start grafana-server$")
    reset = at(r"grafana cli .*admin reset-admin-password --password-from-stdin$")
    fetch = at(FETCH)
    assert tools < fetch < keyring < source < update < package < group < ini_at < start < reset
    assert "systemctl enable grafana-server" in changes
    assert "rm -f /var/lib/grafana/dashboards/hastack/old.json" in changes
    assert not any("hosts.json" in c for c in changes if c.startswith("rm "))

    up = h.uploads
    assert up["/etc/apt/keyrings/grafana.asc.hastack-new"] == ARMORED  # our key only, as gpg exported it
    assert up["/etc/apt/sources.list.d/grafana.list.hastack-new"].splitlines()[-1] == \
        "deb [signed-by=/etc/apt/keyrings/grafana.asc] https://apt.grafana.com stable main"
    assert up["/etc/apt/sources.list.d/grafana.list.hastack-new"].startswith("# Managed by hastack")
    for dest in grafana.TEMPLATES.values():
        assert f"chown root:grafana {dest}.hastack-new && chmod 0640 {dest}.hastack-new" in h.commands
    for f in grafana.dashboard_files():
        assert up[f"{grafana.DASHBOARDS_DIR}/{f.name}.hastack-new"] == f.read_text()
    assert "protocol = https" in up["/etc/grafana/grafana.ini.hastack-new"]
    # the admin password goes on standard input only, never on a command line
    pw = SECRETS[grafana.ADMIN_PASSWORD_SECRET]
    assert not any(pw in c for c in h.commands if "hastack-new" not in c)
    assert (commands[reset], pw + "\n") in h.stdins
    assert any(c.endswith("/api/user") and s == f'user = "admin:{pw}"\n' for c, s in h.stdins)
    assert commands[reset].startswith("runuser -u grafana -- grafana cli --homepath /usr/share/grafana "
                                     "--config /etc/grafana/grafana.ini ")


def test_the_fetch_is_read_only_and_keeps_only_the_pinned_key():
    cmd = grafana._fetch_key_command()
    assert "--proxy" not in cmd and "--proxy http://p:3142 -o" in grafana._fetch_key_command("http://p:3142")
    assert "--export-options export-minimal --export B53AE77BADB630A683046005963FA27710458545" in cmd
    assert cmd.index("--import") < cmd.index("--list-keys") < cmd.index(grafana._KEY_MARK) < cmd.index("--export ")
    assert "rm -rf" in cmd and "trap" in cmd and "/etc/apt" not in cmd


def test_a_download_without_the_pinned_key_is_refused_before_anything_changes():
    other = colons(("0123456789ABCDEF0123456789ABCDEF01234567", "-", FAR)) + grafana._KEY_MARK + "\n"
    run, h, v = recording([installed(*grafana.KEY_TOOLS), (FETCH, Result(stdout=other))])
    with pytest.raises(HostFailed, match=r"gpg-full\.key holds 0123456789ABCDEF0123456789ABCDEF01234567, not "
                                         r"Grafana's pinned signing key B53AE77BADB630A683046005963FA27710458545: "
                                         r"refusing to trust it \(nothing was changed\)"):
        grafana.converge(h, v)
    assert h.changes == [] and h.uploads == {}


def test_a_revoked_pinned_key_is_refused_too():
    revoked = colons((grafana.KEY_FINGERPRINT, "r", FAR)) + grafana._KEY_MARK + "\n" + ARMORED
    run, h, v = recording([installed(*grafana.KEY_TOOLS), (FETCH, Result(stdout=revoked))])
    with pytest.raises(HostFailed, match=r"is revoked or expired \(nothing was changed\)"):
        grafana.converge(h, v)
    assert h.changes == []


def test_a_failed_download_fails_the_host_naming_the_command():
    run, h, v = recording([installed(*grafana.KEY_TOOLS),
                           (FETCH, Result(stderr="curl: (6) Could not resolve host: apt.grafana.com", exited=6))])
    with pytest.raises(HostFailed, match=r"exited 6:\ncurl: \(6\) Could not resolve host"):
        grafana.converge(h, v)
    assert h.changes == []


@pytest.mark.parametrize("keyring, fetched", [
    (colons((grafana.KEY_FINGERPRINT, "-", FAR)), False),  # ours, valid for long: kept, nothing fetched
    (colons((grafana.KEY_FINGERPRINT, "-", None)), False),  # no expiry
    (colons((grafana.KEY_FINGERPRINT, "-", int(NOW + 5 * 86400))), True),  # expires soon: fetched again
    (colons((grafana.KEY_FINGERPRINT, "e", int(NOW - 86400))), True),  # expired
    (colons((grafana.KEY_FINGERPRINT, "-", FAR), (OLD, "-", None)), True),  # another key beside ours
    (colons((OLD, "-", None)), True),  # not ours
])
def test_the_keyring_is_kept_while_it_holds_our_valid_key_alone(keyring, fetched):
    run, h, v = recording([installed(*grafana.KEY_TOOLS), (KEYRING_PROBE, Result(stdout=keyring)),
                           (FETCH, Result(stdout=DOWNLOAD))])
    grafana.signing_key(h, now=NOW)
    assert any(re.search(FETCH, c) for c in h.commands) is fetched
    assert ("/etc/apt/keyrings/grafana.asc.hastack-new" in h.uploads) is fetched


def converged_rules() -> list:
    run = RecordingRun(LAB, secrets=dict(SECRETS))
    v = grafana.template_vars(LAB, HOST, run.secret)
    files = {dest: ("root:grafana:640", templates.render(name, LAB, HOST, run.secret, **v))
             for name, dest in grafana.TEMPLATES.items()}
    files[grafana.SOURCES_LIST] = ("root:root:644", grafana.sources_list())
    files[f"{grafana.DATA}/dashboards"] = ("root:grafana:755", None)
    files[grafana.DASHBOARDS_DIR] = ("root:grafana:755", None)
    for f in grafana.dashboard_files():
        files[f"{grafana.DASHBOARDS_DIR}/{f.name}"] = ("root:grafana:644", f.read_text())
    names = "".join(f.name + "\n" for f in grafana.dashboard_files())
    return [installed(*grafana.KEY_TOOLS, *grafana.PACKAGES),
            (KEYRING_PROBE, Result(stdout=colons((grafana.KEY_FINGERPRINT, "-", FAR)))),
            (r"^id -nG grafana ", Result()), files_present(files),
            (r"^find /var/lib/grafana/dashboards/hastack ", Result(stdout=names)),
            *RUNNING, HEALTHY, api_user("200")]


def test_a_converged_host_changes_nothing_and_fetches_nothing():
    run, h, v = recording(converged_rules())
    grafana.converge(h, v)
    assert h.changes == []
    assert not any("curl -fsSL" in c for c in h.commands)
    assert "Grafana's admin password is the one in the secrets" in h.reported("ok")
    assert any(m.startswith(f"{grafana.KEYRING}: Grafana's key {grafana.KEY_FINGERPRINT} (valid until ")
               for m in h.reported("ok"))


def test_a_changed_ini_restarts_grafana():
    rules = converged_rules()
    rules.insert(0, (r"^stat -c '%U:%G:%a' /etc/grafana/grafana\.ini ", Result(exited=1)))
    run, h, v = recording(rules)
    grafana.converge(h, v)
    assert h.changes == ["systemctl restart grafana-server"]
    assert [c for c in h.commands if c.startswith("mv -f")] == [
        "mv -f /etc/grafana/grafana.ini.hastack-new /etc/grafana/grafana.ini"]


def test_an_unexpected_api_answer_fails_the_host():
    rules = converged_rules()
    rules.insert(0, api_user("502"))
    run, h, v = recording(rules)
    with pytest.raises(HostFailed, match=r"/api/user answered 502 to the admin login"):
        grafana.converge(h, v)


def test_check_mode_on_a_fresh_host_changes_nothing_and_says_what_it_would_do():
    run, h, v = recording([], check=True)
    grafana.converge(h, v)
    assert h.changes == [] and h.uploads == {}
    would = h.reported("would change")
    assert f"would fetch {grafana.KEY_URL} and keep key {grafana.KEY_FINGERPRINT} in {grafana.KEYRING}" in would
    assert any("apt-get update" in m for m in would)
    assert any("install grafana" in m for m in would)
    assert f"{grafana.INI} would be created" in would
    assert "would check Grafana's admin password on https://10.200.0.16:3000 once it runs" in would
    assert not any(re.search(FETCH, c) for c in h.commands)
