"""The mail tier without hosts: postfix's, dovecot's and Postfixadmin's files
as rendered for every shipped inventory with a mail cluster (checked by parsing
them here: no postconf/doveconf needed), the hashes, address validation, the
SQL the ops tasks write, and the primary-key patch of Postfixadmin's upgrade.php."""

from __future__ import annotations

import re
from pathlib import Path

import bcrypt
import pytest

from fabfile import dbproxy, mail, pki, pxc
from fabfile.core import templates
from fabfile.core.errors import UserError
from fabfile.core.inventory import load
from fabfile.core.secrets import Secrets
from tests.unit.shipped import INVENTORIES

ROOT = Path(__file__).resolve().parents[2]
MAIL_INVENTORIES = [p for p in INVENTORIES if load(p).mail is not None]
LAB = load(ROOT / "inventory/lab.yml")
MAIL_TEMPLATES = [t for t in templates.template_names() if t.startswith("mail/")]


@pytest.fixture
def secrets(tmp_path):
    return Secrets(tmp_path / "secrets.yml")


def render(name: str, secrets, inv=LAB, host="postfix01") -> str:
    return templates.render(f"mail/etc/{name}", inv, host, secrets.get)


def postfix_params(text: str) -> dict[str, str]:
    """main.cf / mysql map: NAME = VALUE lines (continuations joined), comments dropped."""
    out: dict[str, str] = {}
    last = None
    for line in text.splitlines():
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        if line[0].isspace() and last:
            out[last] += " " + line.strip()
            continue
        name, _, value = line.partition("=")
        last = name.strip()
        assert last not in out, f"{last} set twice"
        out[last] = value.strip()
    return out


def master_services(text: str) -> dict[tuple[str, str], list[str]]:
    """master.cf: (service, type) -> [fields..., -o options...]."""
    out: dict[tuple[str, str], list[str]] = {}
    key = None
    for line in text.splitlines():
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        if line[0].isspace():
            out[key] += line.split()
            continue
        fields = line.split()
        assert len(fields) >= 8, line
        key = (fields[0], fields[1])
        assert key not in out, f"{key} defined twice"
        out[key] = fields[2:]
    return out


@pytest.mark.parametrize("path", MAIL_INVENTORIES, ids=lambda p: p.name)
def test_every_template_renders_for_every_back_end(path, secrets):
    inv = load(path)
    for host in mail.backends(inv):
        for name in MAIL_TEMPLATES:
            text = templates.render(name, inv, host, secrets.get)
            assert "Managed by hastack" in text
            assert "None" not in text.replace("NOT NULL", "")


def test_main_cf_virtual_domains_lmtp_tls_and_no_open_relay(secrets):
    p = postfix_params(render("postfix/main.cf.j2", secrets))
    assert p["mydestination"] == "localhost"  # the mail domain is virtual, never local
    assert LAB.mail.domain not in p["mydestination"]
    assert p["mynetworks"] == "127.0.0.0/8"  # no local network may relay without AUTH
    assert p["smtpd_relay_restrictions"].replace(" ", "").split(",")[-1] == "reject_unauth_destination"
    assert p["smtpd_sasl_auth_enable"] == "no"  # only submission offers AUTH
    assert p["smtpd_tls_auth_only"] == "yes"
    assert p["virtual_transport"] == "lmtp:unix:private/dovecot-lmtp"
    assert p["smtpd_sasl_type"] == "dovecot" and p["smtpd_sasl_path"] == "private/auth"
    for m in mail.POSTFIX_MAPS:
        assert f"proxy:mysql:/etc/postfix/mysql-virtual-{m}.cf" in p.values()
    assert p["smtpd_tls_cert_file"] == pki.cert_path("postfix01")
    assert p["smtpd_tls_key_file"] == pki.key_path("postfix01")
    assert p["myhostname"] == LAB.vips["mail"].names[0]


def test_master_cf_submission_requires_tls_and_auth_smtp_does_not_offer_auth(secrets):
    s = master_services(render("postfix/master.cf.j2", secrets))
    sub = s[("submission", "inet")]
    opts = dict(o.split("=", 1) for o in sub[sub.index("-o"):] if o != "-o")
    assert opts["smtpd_tls_security_level"] == "encrypt"
    assert opts["smtpd_sasl_auth_enable"] == "yes"
    assert opts["smtpd_client_restrictions"] == "permit_sasl_authenticated,reject"
    assert opts["smtpd_relay_restrictions"] == "permit_sasl_authenticated,reject"
    assert s[("smtp", "inet")][-1] == "smtpd" and "-o" not in s[("smtp", "inet")]
    for needed in ("pickup", "cleanup", "qmgr", "rewrite", "bounce", "defer", "trace", "verify", "proxymap",
                   "smtp", "lmtp", "error", "retry", "discard", "local", "virtual", "anvil", "scache", "showq"):
        assert any(name == needed for name, _ in s), needed
    assert all(fields[2] == "n" for fields in s.values())  # no chroot: sockets and maps reached directly


@pytest.mark.parametrize("path", MAIL_INVENTORIES, ids=lambda p: p.name)
def test_lookups_go_through_the_db_proxy_as_the_accounts_pxc_creates(path, secrets):
    inv = load(path)
    accounts = {a.user: a for a in pxc.accounts(inv)}
    host = mail.backends(inv)[0]
    port = dbproxy.port(inv)
    want_hosts = mail.db_addresses(inv, host)
    if "dbproxy" in inv.vips:
        assert want_hosts[0] == str(inv.vips["dbproxy"].address)
    for m in mail.POSTFIX_MAPS:
        p = postfix_params(templates.render(f"mail/etc/postfix/mysql-virtual-{m}.cf.j2", inv, host, secrets.get))
        assert p["hosts"].split() == [f"inet:{a}:{port}" for a in want_hosts]
        assert p["user"] == "postfix" and p["dbname"] == "postfix"
        assert p["password"] == secrets.get(accounts["postfix"].secret)
        assert "'%s'" in p["query"]
    sql = templates.render("mail/etc/dovecot/dovecot-sql.conf.ext.j2", inv, host, secrets.get)
    connect = re.search(r"^connect = (.*)$", sql, re.MULTILINE)[1].split()
    assert [c for c in connect if c.startswith("host=")] == [f"host={a}" for a in want_hosts]
    assert f"port={port}" in connect and "user=dovecot" in connect
    assert f"password={secrets.get(accounts['dovecot'].secret)}" in connect
    php = templates.render("mail/etc/postfixadmin/dbconfig.inc.php.j2", inv, host, secrets.get)
    assert f"$dbpass = '{secrets.get(accounts['postfixadmin'].secret)}';" in php


def test_dovecot_imap_starttls_imaps_lmtp_and_auth_sockets_match_postfix(secrets):
    conf = render("dovecot/dovecot.conf.j2", secrets)
    main = postfix_params(render("postfix/main.cf.j2", secrets))
    spool = "/var/spool/postfix/"
    assert f"unix_listener {spool}{main['virtual_transport'].split('unix:')[1]} {{" in conf
    assert f"unix_listener {spool}{main['smtpd_sasl_path']} {{" in conf
    assert re.search(r"inet_listener imaps \{\s+port = 993\s+ssl = yes\s+\}", conf)
    assert re.search(r"inet_listener imap \{\s+port = 143\s+\}", conf)
    assert "ssl = yes\n" in conf and "disable_plaintext_auth = yes" in conf
    assert f"ssl_cert = <{pki.cert_path('postfix01')}" in conf and f"ssl_key = <{pki.key_path('postfix01')}" in conf
    assert conf.count("driver = sql") == 2  # passdb and userdb
    assert "!include" not in conf  # the whole configuration is this file
    assert f"mail_uid = {mail.VMAIL_UID}" in conf
    assert re.search(r"^protocols = imap lmtp$", conf, re.MULTILINE)
    sql = render("dovecot/dovecot-sql.conf.ext.j2", secrets)
    assert f"CONCAT('{mail.MAIL_ROOT}/', maildir) AS home" in sql


def test_postfixadmin_config_and_no_setup_page(secrets):
    local = render("postfixadmin/config.local.php.j2", secrets)
    assert local.startswith("<?php\n")
    setup_hash = re.search(r"\$CONF\['setup_password'\] = '([^']+)';", local)[1]
    assert bcrypt.checkpw(secrets.get("mail_postfixadmin_setup_password").encode(),
                          setup_hash.replace("$2y$", "$2b$", 1).encode())
    assert "$CONF['encrypt'] = 'dovecot:BLF-CRYPT';" in local
    site = render("nginx/sites-available/postfixadmin.j2", secrets)
    assert "location = /setup.php { return 404; }" in site
    assert f"ssl_certificate {pki.cert_path('postfix01')};" in site
    for name in LAB.vips["mail"].names:
        assert name in site


def test_setup_hash_is_stable_and_verifies():
    h1, h2 = mail.setup_password_hash("pw-one-1234"), mail.setup_password_hash("pw-one-1234")
    assert h1 == h2 and h1.startswith("$2y$10$")
    assert mail.setup_password_hash("pw-two-1234") != h1
    assert bcrypt.checkpw(b"pw-one-1234", h1.replace("$2y$", "$2b$", 1).encode())


def test_mailbox_hash_is_dovecot_blf_crypt():
    h = mail.mailbox_hash("secret-pass-1")
    assert h.startswith("{BLF-CRYPT}$2y$10$")
    assert bcrypt.checkpw(b"secret-pass-1", h.removeprefix("{BLF-CRYPT}").replace("$2y$", "$2b$", 1).encode())
    assert mail.mailbox_hash("secret-pass-1") != h  # salted


@pytest.mark.parametrize("address, want", [
    ("alice@lab.test", ("alice", "lab.test")),
    ("Bob.Smith@Example.ORG", ("bob.smith", "example.org")),
    ("a+tag@sub.example.org", ("a+tag", "sub.example.org")),
    ("x_y-z@ex-ample.com", ("x_y-z", "ex-ample.com")),
])
def test_valid_addresses(address, want):
    assert mail.parse_address(address) == want


@pytest.mark.parametrize("address", [
    "", "alice", "alice@", "@lab.test", "a@b@lab.test", "bad..dots@lab.test", ".lead@lab.test",
    "trail.@lab.test", "sp ace@lab.test", "quote'@lab.test", "semi;colon@lab.test", "alice@localhost",
    "alice@-bad.test", "alice@bad-.test", "alice@lab..test", "alice@1.2.3.4", "a" * 65 + "@lab.test",
    "alice@lab_test.org",
])
def test_malformed_addresses_are_refused(address):
    with pytest.raises(UserError, match="nothing was changed"):
        mail.parse_address(address)


@pytest.mark.parametrize("password", ["", "short", " leading-space", "trailing-space ", "new\nline-123"])
def test_bad_passwords_are_refused(password):
    with pytest.raises(UserError):
        mail.check_password(password)


def test_sql_rows_match_postfixadmin_and_are_quoted():
    assert mail.sql_quote("it's") == "'it\\'s'"
    assert mail.sql_quote("back\\slash") == "'back\\\\slash'"
    sql = mail.mailbox_sql("alice", "lab.test", "{BLF-CRYPT}$2y$10$x", "Alice O'Neil")
    assert "'lab.test/alice/'" in sql  # maildir: domain_path YES, domain_in_mailbox NO
    assert "INSERT INTO alias (address, goto, domain" in sql and "('alice@lab.test', 'alice@lab.test'" in sql
    assert "'Alice O\\'Neil'" in sql
    assert "INSERT INTO log" in sql
    alias = mail.alias_sql("info@lab.test", "lab.test", ["a@lab.test", "b@x.org"])
    assert "'a@lab.test,b@x.org'" in alias


UPGRADE_SNIPPET = '''
function upgrade_5_mysql() {
    db_query_parsed("
        CREATE TABLE {IF_NOT_EXISTS} " . table_by_key('domain_admins') . " (
            `username` varchar(255) NOT NULL default '',
            KEY username (`username`)
        ) {COLLATE} COMMENT='Postfix Admin - Domain Admins';
    ");
    db_query_parsed("
        CREATE TABLE {IF_NOT_EXISTS} " . table_by_key('log') . " (
            `timestamp` {DATETIME},
            KEY timestamp (`timestamp`)
        ) {COLLATE} COMMENT='Postfix Admin - Log';
    ");
    db_query_parsed("
        CREATE TABLE {IF_NOT_EXISTS} " . table_by_key('mailbox') . " (
            `username` varchar(255) NOT NULL default '',
            PRIMARY KEY  (`username`)
        ) {COLLATE} COMMENT='Postfix Admin - Virtual Mailboxes';
    ");
}
'''


def test_upgrade_patch_gives_the_two_tables_a_primary_key():
    out = mail.patch_upgrade(UPGRADE_SNIPPET)
    for table in mail.PK_TABLES:
        assert re.search(rf"table_by_key\('{table}'\) \. \" \(\n\s+`id` {{AUTOINCREMENT}} {{PRIMARY}},\n", out)
    assert out.count("`id`") == 2  # mailbox already has one
    assert out.replace("            `id` {AUTOINCREMENT} {PRIMARY},\n", "") == UPGRADE_SNIPPET


def test_upgrade_patch_refuses_an_unknown_upgrade_php():
    with pytest.raises(UserError, match="not the one this task knows"):
        mail.patch_upgrade(UPGRADE_SNIPPET.replace("table_by_key('log')", "table_by_key('logs')"))


def test_tasks_are_registered():
    import tasks

    names = set(tasks.ns.collections["mail"].task_names)
    assert {"deploy", "add-domain", "add-mailbox", "add-alias", "set-password", "list"} <= names
