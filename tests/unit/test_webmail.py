"""The webmail tier without hosts: Roundcube's, its plugins', php-fpm's and
nginx's files as rendered for the shipped inventories (PHP files checked with
`php -l` when PHP is installed), the inventory's webmail settings, the
firewall and grants it relies on, and the runbook on recording hosts."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from fabfile import webmail
from fabfile.core import Result, flows, templates, topology
from fabfile.core.errors import HostFailed, UserError
from fabfile.core.inventory import Inventory, InventoryError, load
from fabfile.core.testing import RecordingRun, files_present
from fabfile.pxc.facts import sql_changes, table_grants_waiting
from tests.unit.shipped import INVENTORIES

ROOT = Path(__file__).resolve().parents[2]
LAB = load(ROOT / "inventory/lab.yml")
WEBMAIL_INVENTORIES = [p for p in INVENTORIES if load(p).with_role("webmail")]
TEMPLATES = [t for t in templates.template_names() if t.startswith("webmail/")]
PHP_TEMPLATES = [t for t in TEMPLATES if t.endswith(".php.j2")]


def SECRET(name: str) -> str:
    return f"S{abs(hash(name)) % 10**8:08d}x"


def render(name: str, inv: Inventory = LAB, host: str = "ngx01") -> str:
    return templates.render(name, inv, host, SECRET, **webmail.template_vars(inv, host, SECRET))


def php_config(text: str) -> dict[str, str]:
    """$config['key'] = value; lines -> {key: value source}."""
    return dict(re.findall(r"^\$config\['(\w+)'\] = (.*);$", text, re.M))


@pytest.mark.parametrize("path", WEBMAIL_INVENTORIES, ids=lambda p: p.name)
@pytest.mark.parametrize("name", TEMPLATES)
def test_every_template_renders_for_every_front_end(path, name, tmp_path):
    inv = load(path)
    for host in inv.with_role("webmail"):
        text = render(name, inv, host)
        if name.endswith(".php.j2"):
            assert text.startswith("<?php\n")
            if shutil.which("php"):
                f = tmp_path / "c.php"
                f.write_text(text)
                out = subprocess.run(["php", "-l", str(f)], capture_output=True, text=True)
                assert out.returncode == 0, out.stdout + out.stderr


def test_roundcube_reaches_the_database_through_the_proxy_and_mail_on_the_vip_verified():
    c = php_config(render("webmail/etc/roundcube/config.inc.php.j2"))
    dbproxy = LAB.vips["dbproxy"].address
    assert c["db_dsnw"] == f"'mysql://roundcube:{SECRET('mail_db_roundcube')}@{dbproxy}:3306/roundcube'"
    assert c["des_key"] == f"'{SECRET(webmail.DES_KEY_SECRET)}'"
    assert c["session_storage"] == "'db'"
    assert c["imap_host"] == "'ssl://mail.lab.test:993'"
    assert c["smtp_host"] == "'tls://mail.lab.test:587'"
    text = render("webmail/etc/roundcube/config.inc.php.j2")
    assert "'verify_peer' => true" in text and "'peer_name' => 'mail.lab.test'" in text
    assert "'cafile' => '/etc/ssl/hastack/ca.crt'" in text
    assert "=> false" not in text.replace("'allow_self_signed' => false", "")
    assert c["imap_conn_options"] == c["smtp_conn_options"] == c["managesieve_conn_options"] == "$tls"
    assert c["product_name"] == "'Lab webmail'"
    assert c["username_domain"] == "'lab.test'"
    assert c["display_product_info"] == "0" and c["enable_installer"] == "false"
    assert c["plugins"] == "['password', 'managesieve', 'archive', 'zipdownload', 'hastack_anonymous']"


def test_inventory_values_are_php_literals(tmp_path):
    data = yaml.safe_load((ROOT / "inventory/lab.yml").read_text())
    data["webmail"]["product_name"] = "Bob's \\ webmail';system('id');//"
    p = tmp_path / "inv.yml"
    p.write_text(yaml.safe_dump(data))
    text = render("webmail/etc/roundcube/config.inc.php.j2", load(p))
    assert php_config(text)["product_name"] == "'Bob\\'s \\\\ webmail\\';system(\\'id\\');//'"


def test_password_plugin_writes_postfixadmins_table_with_the_mail_tiers_hash():
    c = php_config(render("webmail/etc/roundcube/plugins/password/config.inc.php.j2"))
    pw = SECRET("mail_db_roundcube_password")
    assert c["password_db_dsn"] == f"'mysql://roundcube_password:{pw}@{LAB.vips['dbproxy'].address}:3306/postfix'"
    assert c["password_query"].startswith("'UPDATE mailbox SET password = %P")
    assert "WHERE username = %u" in c["password_query"]
    assert c["password_algorithm"] == "'blowfish-crypt'"  # {BLF-CRYPT}$2y$..., what mail.mailbox_hash makes
    assert c["password_blowfish_cost"] == "10"
    assert c["password_confirm_current"] == "true"


def test_managesieve_plugin_uses_starttls_on_the_mail_vip_verified():
    text = render("webmail/etc/roundcube/plugins/managesieve/config.inc.php.j2")
    c = php_config(text)
    assert c["managesieve_host"] == "'tls://mail.lab.test:4190'"
    assert c["managesieve_vacation"] == "1"
    assert "'verify_peer' => true" in text and "'peer_name' => 'mail.lab.test'" in text


def test_nginx_site_https_only_hsts_no_installer_no_version():
    text = render("webmail/etc/nginx/sites-available/roundcube.j2")
    http, https = text.split("server {")[1:]
    assert "listen 80 default_server;" in http and "return 301 https://$host$request_uri;" in http
    assert "listen 443 ssl" in https
    assert "ssl_certificate /etc/ssl/hastack/ngx01.crt;" in https
    assert 'Strict-Transport-Security "max-age=31536000" always' in https
    assert "server_tokens off;" in text and "fastcgi_hide_header X-Powered-By;" in https
    assert "root /var/lib/roundcube/public_html;" in https
    assert re.search(r"location ~ \^/\(installer\|[^)]*\)\(/\|\$\) \{ return 404; \}", https)
    assert "server_name webmail.lab.test ngx01.lab.test ngx01;" in https
    fpm = render("webmail/etc/php/8.2/fpm/conf.d/90-hastack.ini.j2")
    assert "expose_php = Off" in fpm and "display_errors = Off" in fpm


def test_roundcube_accounts_connect_from_the_proxy_hosts_only_with_a_table_grant():
    accounts = {a.user: a for a in topology.db_accounts(LAB)}
    proxies = {str(LAB.hosts[h].addresses["mail"]) for h in LAB.with_role("mail_backend")}
    assert set(accounts["roundcube"].hosts) == proxies
    assert accounts["roundcube_password"].grants == {"postfix.mailbox": ("SELECT", "UPDATE")}
    # MySQL refuses a grant on a table that does not exist: before the mail tier made it, the grant waits
    fresh = [s for s, _ in sql_changes(LAB, "", SECRET)]
    assert not any("`postfix`.`mailbox`" in s for s in fresh)
    assert table_grants_waiting(LAB, "") == ["postfix.mailbox"]
    changes = [s for s, _ in sql_changes(LAB, "table postfix mailbox\n", SECRET)]
    assert table_grants_waiting(LAB, "table postfix mailbox\n") == []
    assert any(s.startswith("GRANT SELECT, UPDATE ON `postfix`.`mailbox` TO 'roundcube_password'@") for s in changes)
    # converged: the table grant read back from TABLE_PRIVILEGES asks for nothing more
    state = "table postfix mailbox\n" + "\n".join(f"grant 'roundcube_password'@'{h}' postfix.mailbox {p}"
                      for h in proxies for p in ("SELECT", "UPDATE"))
    again = [s for s, _ in sql_changes(LAB, state, SECRET)]
    assert not any("`postfix`.`mailbox`" in s for s in again)


def test_firewall_opens_the_webmail_vip_to_the_client_networks_and_galera_to_proxies_only():
    rules = flows.input_rules(LAB, "ngx01")
    web = [r for r in rules if r.ports == "80,443"]
    assert [(r.src, r.dst) for r in web] == [("10.200.11.0/24", "10.200.11.100/32")]
    galera = [r for r in flows.input_rules(LAB, "pxc1") if r.ports == "3306"]
    ngx = {str(LAB.hosts[h].addresses["mail"]) + "/32" for h in LAB.with_role("webmail")}
    assert galera and not ngx & {r.src for r in galera}


def _inventory(tmp_path, edit) -> Path:
    data = yaml.safe_load((ROOT / "inventory/lab.yml").read_text())
    edit(data)
    p = tmp_path / "inv.yml"
    p.write_text(yaml.safe_dump(data))
    return p


def test_a_plugin_debian_does_not_ship_is_refused_by_the_validator(tmp_path):
    p = _inventory(tmp_path, lambda d: d["webmail"].__setitem__("plugins", ["password", "carddav"]))
    with pytest.raises(InventoryError, match=r"inv\.yml: webmail\.plugins\.1: 'carddav' is not a Roundcube plugin"):
        load(p)


def test_unknown_client_network_is_refused(tmp_path):
    p = _inventory(tmp_path, lambda d: d["webmail"].__setitem__("client_networks", ["internet"]))
    with pytest.raises(InventoryError, match=r"webmail\.client_networks\.0: unknown network 'internet'"):
        load(p)


def test_a_missing_mail_vip_or_name_is_refused_before_any_host_is_touched(tmp_path):
    inv = load(_inventory(tmp_path, lambda d: d["vips"].pop("mail")))
    run = RecordingRun(inv)
    with pytest.raises(UserError, match=r"vips\.mail is missing"):
        webmail.converge(run)
    assert run.all_commands() == []
    inv = load(_inventory(tmp_path, lambda d: d["vips"]["mail"].pop("names")))
    with pytest.raises(UserError, match=r"vips\.mail\.names is empty"):
        webmail.preflight(RecordingRun(inv))


UPLOAD = (r"^(mkdir -p |chown |mv -f |cp -a |rm -f |php -l |nginx -t)", Result())


def recording(answers=None, **kw) -> RecordingRun:
    answers = dict(answers or {})
    answers["*"] = [*answers.get("*", []), UPLOAD]
    run = RecordingRun(LAB, answers=answers, **kw)
    run.secrets.get = lambda name, *a: SECRET(name)
    return run


def test_a_front_end_without_its_certificate_fails_before_any_change():
    run = recording()
    h = run.session("ngx01")
    with pytest.raises(HostFailed, match=r"/etc/ssl/hastack/ngx01.crt or its key is missing: run `inv pki.deploy"):
        topology.require_certificate(h)
    assert h.changes == []


def webmail_files(host: str) -> dict[str, tuple[str, str]]:
    out = {}
    for name, dest, meta in (
            ("roundcube/config.inc.php", "/etc/roundcube/config.inc.php", "root:www-data:640"),
            ("roundcube/plugins/password/config.inc.php", "/etc/roundcube/plugins/password/config.inc.php",
             "root:www-data:640"),
            ("roundcube/plugins/managesieve/config.inc.php", "/etc/roundcube/plugins/managesieve/config.inc.php",
             "root:www-data:640"),
            ("roundcube/hastack-client.cnf", webmail.CLIENT_CNF, "root:root:600"),
            ("php/8.2/fpm/conf.d/90-hastack.ini", "/etc/php/8.2/fpm/conf.d/90-hastack.ini", "root:root:644"),
            ("nginx/sites-available/roundcube", "/etc/nginx/sites-available/roundcube", "root:root:644")):
        out[dest] = (render(f"webmail/etc/{name}.j2", LAB, host), meta)
    out[webmail.OWN_PLUGIN_FILE] = (render(f"webmail{webmail.OWN_PLUGIN_FILE}.j2", LAB, host), "root:root:644")
    return files_present({path: (meta, text) for path, (text, meta) in out.items()})


def webmail_files_paths() -> list[str]:
    return ["/etc/roundcube/config.inc.php", "/etc/roundcube/plugins/password/config.inc.php",
            "/etc/roundcube/plugins/managesieve/config.inc.php", webmail.CLIENT_CNF,
            "/etc/php/8.2/fpm/conf.d/90-hastack.ini", "/etc/nginx/sites-available/roundcube", webmail.OWN_PLUGIN_FILE]


RUNNING = [(r"^systemctl is-enabled", Result(stdout="enabled\n")), (r"^systemctl is-active", Result())]


def test_configure_converged_changes_nothing_and_fresh_writes_every_file():
    plugin_dir = (r"^stat -c '%U:%G:%a' /var/lib/roundcube/plugins/hastack_anonymous$", Result(stdout="root:root:755\n"))
    run = recording({"ngx01": [plugin_dir,
                               webmail_files("ngx01"),
                               (r"^test \"\$\(readlink", Result()),
                               (r"^! test -e /etc/nginx/sites-enabled/default$", Result()), *RUNNING]})
    h = run.session("ngx01")
    webmail.configure(h)
    assert h.changes == []
    fresh = recording({"ngx01": [*RUNNING]})
    h = fresh.session("ngx01")
    webmail.configure(h)
    written = {c.split()[-1] for c in h.commands if c.startswith("mv -f ")}
    assert set(webmail_files_paths()) <= written
    assert "systemctl reload nginx" in h.changes


SHIPPED = (r"^grep -ho .*mysql.initial.sql", Result(stdout="'roundcube-version', '2022081200'\n"))


def test_schema_created_once_when_the_database_is_empty():
    run = recording({"ngx01": [
        (r"^test -s /etc/roundcube/hastack-client.cnf$", Result()),
        (r"^mysql .* roundcube$",
         lambda cmd, stdin: Result(exited=1, stderr="ERROR 1146: Table 'roundcube.system' doesn't exist")
         if "roundcube-version" in (stdin or "") else Result()),
        SHIPPED]})
    h = run.session("ngx01")
    webmail.schema(h)
    assert h.changes == [f"mysql --defaults-extra-file={webmail.CLIENT_CNF} --batch --skip-column-names roundcube "
                         "< /usr/share/roundcube/SQL/mysql.initial.sql"]


def test_schema_at_the_shipped_version_is_left_alone_and_an_older_one_updated():
    def at(version):
        return recording({"ngx01": [
            (r"^test -s ", Result()),
            (r"^mysql .* roundcube$", lambda cmd, stdin: Result(stdout=f"{version}\n")
             if "roundcube-version" in (stdin or "") else Result()),
            SHIPPED]})
    run = at("2022081200")
    webmail.schema(run.session("ngx01"))
    assert run.session("ngx01").changes == []
    run = at("2020122900")
    webmail.schema(run.session("ngx01"))
    assert run.session("ngx01").changes == [
        "/usr/share/roundcube/bin/updatedb.sh --package=roundcube --dir=/usr/share/roundcube/SQL"]


def test_a_table_without_primary_key_fails_the_schema_step():
    run = recording({"ngx01": [
        (r"^test -s ", Result()),
        (r"^mysql .* roundcube$", lambda cmd, stdin: Result(stdout="2022081200\n")
         if "roundcube-version" in (stdin or "") else Result(stdout="legacy_table\n")),
        SHIPPED]})
    with pytest.raises(HostFailed, match="without a primary key.*legacy_table"):
        webmail.schema(run.session("ngx01"))


def test_tasks_are_registered():
    from tasks import ns
    assert {"webmail.deploy", "webmail.status"} <= set(ns.task_names)


def test_deploy_mail_runs_webmail_after_the_mail_tier_and_its_table_grant_then_its_vip():
    from fabfile import deploy, keepalived, mail, pxc
    names = [getattr(t, "__name__", type(t).__name__) for t in deploy.MAIL]
    order = [deploy.MAIL.index(t) for t in (pxc, mail, deploy._TableGrants, webmail)]
    assert order == sorted(order), names
    vips = [t for t in deploy.MAIL + deploy.XMPP if isinstance(t, deploy._Vips)]
    assert [(t.names, t in deploy.MAIL) for t in vips] == [(("webmail",), True), (("xmpp",), False)]
    assert deploy.MAIL.index(vips[0]) > deploy.MAIL.index(webmail)
    assert keepalived not in deploy.XMPP + deploy.MAIL  # never all VIPs at once from one chain


def test_dry_run_on_fresh_front_ends_changes_nothing_and_says_what_it_would_do():
    """`deploy.all --check` before anything exists: no certificate, no packages,
    no schema; every step still runs, nothing is changed, the would-be changes are shown."""
    run = RecordingRun(LAB, check=True, secrets={"mail_db_roundcube": "x", "mail_db_roundcube_password": "y"})
    webmail.converge(run)
    changing = [(h, c) for h, c in run.all_commands()
                if not re.match(r"(test |stat |dpkg-query |systemctl (is-|show)|grep |readlink|! test |"
                                r"mysql .*system|ip -o|cat |sha256sum )", c)]
    assert changing == [], changing
    out = run.output
    assert "ngx01.crt is missing: `inv pki.deploy` would issue it" in out
    assert "would create Roundcube's schema" in out
    assert "would run: install curl mariadb-client nginx php-fpm" in out
