"""The monitoring tier without hosts: scrape targets and probes computed from
the inventory, the firewall rows of every exporter, the server's configs as
Prometheus's own checker (promtool) reads them, the inventory's monitoring
settings, and the runbook on recording hosts."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from fabfile import monitoring
from fabfile.core import Result, flows, templates, topology
from fabfile.core.errors import HostFailed
from fabfile.core.inventory import InventoryError, load
from fabfile.core.testing import RecordingRun

ROOT = Path(__file__).resolve().parents[2]
LAB = load(ROOT / "inventory/lab.yml")


def SECRET(name: str) -> str:
    return f"S{abs(hash(name)) % 10**8:08d}x"


def render(name: str, inv=LAB, host: str = "mon1server") -> str:
    return templates.render(name, inv, host, SECRET, **monitoring.template_vars(inv, host, SECRET))


def promtool() -> str:
    found = shutil.which("promtool") or str(Path(sys.executable).parent / "promtool")
    if not Path(found).exists():
        pytest.fail("promtool is missing: `./run setup`'s test step puts Debian's into .venv/bin")
    return found


def lab_without_monitoring(tmp_path):
    data = yaml.safe_load((ROOT / "inventory/lab.yml").read_text())
    del data["monitoring"]
    p = tmp_path / "lab.yml"
    p.write_text(yaml.safe_dump(data))
    return load(p)


def test_every_host_has_a_node_exporter_and_each_tier_its_own():
    jobs = monitoring.scrape_jobs(LAB)
    assert {t["instance"] for t in jobs["node"]} == set(LAB.hosts)
    assert {t["instance"] for t in jobs["mysqld"]} == set(LAB.with_role("galera"))
    assert {t["instance"] for t in jobs["postgres"]} == {"psql1server", "psql2server"}
    assert {t["instance"] for t in jobs["hacluster"]} == set(LAB.with_role("mail_backend"))
    # lab: db_proxy haproxy, which runs where the dbproxy VIP is: scraped there, once
    assert jobs["haproxy"] == [{"address": "10.200.11.116:8405", "instance": "dbproxy", "system": "mail"}]
    assert {t["instance"] for t in jobs["postfix"]} == set(LAB.with_role("mail_backend"))
    assert {t["instance"] for t in jobs["nginx"]} == {"ngx01", "ngx02"}
    # each on the address the monitoring host shares with it, else across the gateway
    by = {t["instance"]: t for t in jobs["node"]}
    assert by["pxc1"]["address"] == "10.200.11.120:9100" and by["pxc1"]["system"] == "mail"
    assert by["psql1server"]["address"] == "10.200.1.10:9100" and by["psql1server"]["system"] == "xmpp"
    assert by["e1server"]["address"] == "10.200.1.2:9100"  # the DMZ, routed by gw1server


def test_probes_dial_each_vip_by_the_name_its_certificate_has():
    got = {(p["module"], p["vip"], p["target"]) for p in monitoring.probes(LAB)}
    assert got == {("smtp_starttls", "mail", "mail.lab.test:587"), ("imaps", "mail", "mail.lab.test:993"),
                   ("https", "webmail", "https://webmail.lab.test/"), ("xmpps", "xmpp", "xmpp.lab.test:5223")}


def test_exporter_ports_open_to_the_monitoring_host_only(tmp_path):
    mon = {"10.200.11.130/32", "10.200.1.13/32"}  # mon1server's addresses (mail, internal)
    for host in set(LAB.hosts) - {"mon1server"}:  # its own scrapes come in on lo
        rules = flows.input_rules(LAB, host)
        for e in topology.exporters(LAB, host):
            srcs = {r.src for r in rules if r.ports == str(e.port)}
            assert srcs and srcs <= mon, (host, e.job, srcs)
    # the gateway forwards the scrapes and the XMPP probe into the DMZ, from mon1server only
    fwd = {(r.src, r.dst, r.ports) for r in flows.forward_rules(LAB, "gw1server")}
    assert ("10.200.1.13/32", "10.200.1.2/32", "9100") in fwd and ("10.200.1.13/32", "10.200.1.4/32", "5223") in fwd
    # the UIs: HTTPS from the management network
    ui = [r for r in flows.input_rules(LAB, "mon1server") if r.ports == "443"]
    assert [r.src for r in ui] == ["10.200.0.0/24"]
    # no monitoring section: no exporter, no rule, no account
    plain = lab_without_monitoring(tmp_path)
    assert all(not topology.exporters(plain, h) for h in plain.hosts)
    assert not any(r.ports in ("9100", "9104", "443") for h in plain.hosts for r in flows.input_rules(plain, h))
    assert "exporter" not in {a.user for a in topology.db_accounts(plain)}


def test_mysqld_exporter_account_is_local_with_process_only():
    acc = {a.user: a for a in topology.db_accounts(LAB)}["exporter"]
    assert acc.hosts == ("localhost",) and acc.grants == {"*": ("PROCESS",)}
    cnf = render("monitoring/etc/prometheus/mysqld-exporter.cnf.j2", host="pxc1")
    assert f"password = {SECRET('pxc_exporter_password')}" in cnf and "socket = /run/mysqld/mysqld.sock" in cnf


def test_exporters_listen_on_the_scraped_address_only():
    node = render("monitoring/etc/default/prometheus-node-exporter.j2", host="pxc1")
    assert '--web.listen-address=10.200.11.120:9100' in node
    pg = render("monitoring/etc/default/prometheus-postgres-exporter.j2", host="psql2server")
    assert "DATA_SOURCE_NAME='host=/run/postgresql user=prometheus dbname=postgres sslmode=disable'" in pg
    assert "password=" not in pg  # peer authentication over the socket
    assert "10.200.1.11:9187" in pg
    stub = render("monitoring/etc/nginx/sites-available/hastack-stub-status.j2", host="ngx01")
    assert "listen 127.0.0.1:8080;" in stub and "deny all;" in stub
    haproxy = templates.render("dbproxy/etc/haproxy/haproxy.cfg.j2", LAB, "postfix01", SECRET,
                               **__import__("fabfile.dbproxy").dbproxy.template_vars(LAB, "postfix01", SECRET))
    assert "bind 10.200.11.116:8405" in haproxy and "use-service prometheus-exporter" in haproxy


def test_server_configs_pass_prometheus_own_checks(tmp_path):
    tool = promtool()
    (tmp_path / "prometheus.yml").write_text(render("monitoring/etc/prometheus/prometheus.yml.j2"))
    (tmp_path / "rules.yml").write_text(render("monitoring/etc/prometheus/rules/hastack.rules.yml.j2"))
    for args in (["check", "config", "--syntax-only", "prometheus.yml"], ["check", "rules", "rules.yml"]):
        out = subprocess.run([tool, *args], cwd=tmp_path, capture_output=True, text=True)
        assert out.returncode == 0, out.stdout + out.stderr
    conf = yaml.safe_load((tmp_path / "prometheus.yml").read_text())
    jobs = {j["job_name"]: j for j in conf["scrape_configs"]}
    assert set(jobs) == {"prometheus", "alertmanager", "probe", *monitoring.scrape_jobs(LAB)}
    node = [sc["labels"]["instance"] for sc in jobs["node"]["static_configs"]]
    assert sorted(node) == sorted(LAB.hosts)
    assert conf["alerting"]["alertmanagers"][0]["static_configs"][0]["targets"] == ["127.0.0.1:9093"]


def test_alerts_go_by_mail_through_the_mail_vip_verified_against_our_ca():
    am = yaml.safe_load(render("monitoring/etc/prometheus/alertmanager.yml.j2"))
    assert am["global"]["smtp_smarthost"] == "mail.lab.test:25" and am["global"]["smtp_require_tls"] is True
    email = am["receivers"][0]["email_configs"][0]
    assert email["to"] == "mailadmin@lab.test"
    assert email["tls_config"] == {"ca_file": "/etc/ssl/hastack/ca.crt", "server_name": "mail.lab.test"}
    bb = yaml.safe_load(render("monitoring/etc/prometheus/blackbox.yml.j2"))
    for name, module in bb["modules"].items():
        proto = module.get("tcp") or module.get("http")
        assert proto["tls_config"] == {"ca_file": "/etc/ssl/hastack/ca.crt"}, name
        assert "insecure_skip_verify" not in str(module)


def test_uis_on_the_management_address_over_https_with_basic_auth():
    site = render("monitoring/etc/nginx/sites-available/hastack-monitoring.j2")
    assert "listen 10.200.0.16:443 ssl;" in site and "auth_basic_user_file /etc/nginx/hastack-monitoring.htpasswd;" in site
    assert "proxy_pass http://127.0.0.1:9090;" in site and "proxy_pass http://127.0.0.1:9093;" in site
    line = render("monitoring/etc/nginx/hastack-monitoring.htpasswd.j2").splitlines()[-1]
    user, hashed = line.split(":", 1)
    import bcrypt

    assert user == "admin" and bcrypt.checkpw(SECRET(monitoring.WEB_SECRET).encode(), hashed.encode())
    assert render("monitoring/etc/nginx/hastack-monitoring.htpasswd.j2") == \
        render("monitoring/etc/nginx/hastack-monitoring.htpasswd.j2")  # the same file every run
    for unit in ("prometheus", "prometheus-alertmanager", "prometheus-blackbox-exporter"):
        assert "127.0.0.1:" in render(f"monitoring/etc/default/{unit}.j2")


@pytest.mark.parametrize("change, where", [
    ({"alert_email": "not an address"}, "monitoring.alert_email"),
    ({"alert_email": "ops@example.com; rm -rf /"}, "monitoring.alert_email"),
    ({"thresholds": {"disk_free_percent": "ten"}}, "monitoring.thresholds.disk_free_percent"),
    ({"thresholds": {"replication_lag_seconds": -1}}, "monitoring.thresholds.replication_lag_seconds"),
    ({"smarthost": "mail.example.com"}, "monitoring.smarthost"),
    ({"colour": "blue"}, "monitoring.colour"),
])
def test_bad_monitoring_settings_name_the_key(tmp_path, change, where):
    data = yaml.safe_load((ROOT / "inventory/lab.yml").read_text())
    data["monitoring"].update(change)
    p = tmp_path / "inv.yml"
    p.write_text(yaml.safe_dump(data))
    with pytest.raises(InventoryError) as err:
        load(p)
    assert where in str(err.value) and str(p) in str(err.value)


def test_a_monitoring_section_needs_a_host_with_the_role(tmp_path):
    data = yaml.safe_load((ROOT / "inventory/lab.yml").read_text())
    data["hosts"]["mon1server"]["roles"] = ["spare"]
    p = tmp_path / "inv.yml"
    p.write_text(yaml.safe_dump(data))
    with pytest.raises(InventoryError, match="monitoring: the monitoring section needs exactly one host"):
        load(p)


def test_exporters_on_a_galera_node_install_configure_and_start():
    run = RecordingRun(LAB)
    h = run.session("pxc1")
    monitoring.exporters(h)
    cmds = "\n".join(c for _, c in run.all_commands())
    assert "prometheus-mysqld-exporter" in cmds and "prometheus-node-exporter" in cmds
    assert "systemctl start prometheus-mysqld-exporter" in cmds or "systemctl restart prometheus-mysqld-exporter" in cmds
    assert run.secrets.get("pxc_exporter_password") not in cmds  # in a file (its content goes by stdin), not a command line


def test_postgres_role_is_created_for_peer_login_with_pg_monitor():
    run = RecordingRun(LAB, answers={"psql1server": [(r"FROM pg_roles WHERE rolname", Result())]})
    h = run.session("psql1server")
    monitoring._pg_role(h)
    cmds = "\n".join(c for _, c in run.all_commands())
    assert "CREATE ROLE" in cmds and "GRANT pg_monitor TO" in cmds and "PASSWORD" not in cmds


def test_server_refuses_without_its_certificate():
    run = RecordingRun(LAB)
    with pytest.raises(HostFailed, match="pki.deploy"):
        monitoring.server(run.session("mon1server"))


def test_server_with_certificate_checks_configs_before_they_replace_the_live_ones():
    checkers = r"^(promtool check|amtool check-config|prometheus-blackbox-exporter --config.check|nginx -t)"
    run = RecordingRun(LAB, answers={"mon1server": [(r"^test -s ", Result()), (checkers, Result())]})
    monitoring.server(run.session("mon1server"))
    cmds = "\n".join(c for _, c in run.all_commands())
    assert "promtool check rules" in cmds and "promtool check config" in cmds
    assert "amtool check-config" in cmds and "--config.check" in cmds and "nginx -t" in cmds


def test_postfix_exporter_joins_postdrop_and_adm_and_restarts_for_them():
    """The exporter's user joins postdrop (showq) and, with rsyslog, adm (the mail
    log), each matched whole; new groups restart the running exporter."""
    e = next(e for e in topology.exporters(LAB, "postfix01") if e.job == "postfix")
    run = RecordingRun(LAB, answers={"postfix01": [
        (r"^dpkg-query -W", Result("rsyslog installed\n")),
        (r"^id -nG prometheus \| tr ' ' '\\n' \| grep -qxF adm$", Result()),
        (r"^systemctl show ", Result("LoadState=loaded\nUnitFileState=enabled\nActiveState=active\n"))]})
    h = run.session("postfix01")
    monitoring._Exporters.postfix(h, monitoring.exporter_vars(LAB, "postfix01", lambda *a: "x"), e)
    assert "id -nG prometheus | tr ' ' '\\n' | grep -qxF postdrop" in h.commands
    assert "usermod -a -G postdrop prometheus" in h.changes and not any("-G adm" in c for c in h.changes)
    assert f"systemctl restart {e.package}" in h.changes
