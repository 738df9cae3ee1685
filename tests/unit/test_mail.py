"""The mail tier without hosts: postfix's, dovecot's and Postfixadmin's files
as rendered for every shipped inventory with a mail cluster (checked by parsing
them here: no postconf/doveconf needed), the hashes, address validation, the
SQL the ops tasks write, the primary-key patch of Postfixadmin's upgrade.php,
and the runbook and ops on recording hosts: facts in, commands out."""

from __future__ import annotations

import re
import shlex
import shutil
import subprocess
from pathlib import Path

import bcrypt
import pytest

from fabfile import mail
from fabfile.core import Result, templates, topology
from fabfile.core.errors import UserError
from fabfile.core import flows
from fabfile.core.inventory import InventoryError, load
from fabfile.core.secrets import Secrets
from fabfile.core.sql import my_literal
from fabfile.core.testing import RecordingRun, files_present
from fabfile.mail import postfixadmin
from tests.unit.shipped import INVENTORIES

ROOT = Path(__file__).resolve().parents[2]
MAIL_INVENTORIES = [p for p in INVENTORIES if load(p).mail is not None]
LAB = load(ROOT / "inventory/lab.yml")
MAIL_TEMPLATES = [t for t in templates.template_names() if t.startswith("mail/")]


@pytest.fixture
def secrets(tmp_path):
    return Secrets(tmp_path / "secrets.yml")


def render_full(name: str, inv, host, secret) -> str:
    return templates.render(name, inv, host, secret, **mail.template_vars(inv, host, secret))


def render(name: str, secrets, inv=LAB, host="postfix01") -> str:
    return render_full(f"mail/etc/{name}", inv, host, secrets.get)


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
            text = render_full(name, inv, host, secrets.get)
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
    assert p["smtpd_tls_cert_file"] == topology.cert_path("postfix01")
    assert p["smtpd_tls_key_file"] == topology.key_path("postfix01")
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
    accounts = {a.user: a for a in topology.db_accounts(inv)}
    host = mail.backends(inv)[0]
    port = topology.db_proxy_reader_port(inv)  # read-only lookups: the reader path
    want_hosts = topology.db_proxy_addresses(inv, host)
    if "dbproxy" in inv.vips:
        assert want_hosts[0] == str(inv.vips["dbproxy"].address)
    for m in mail.POSTFIX_MAPS:
        p = postfix_params(render_full(f"mail/etc/postfix/mysql-virtual-{m}.cf.j2", inv, host, secrets.get))
        assert p["hosts"].split() == [f"inet:{a}:{port}" for a in want_hosts]
        assert p["user"] == "postfix" and p["dbname"] == "postfix"
        assert p["password"] == secrets.get(accounts["postfix"].secret)
        assert "'%s'" in p["query"]
    sql = render_full("mail/etc/dovecot/dovecot-sql.conf.ext.j2", inv, host, secrets.get)
    connect = re.search(r"^connect = (.*)$", sql, re.MULTILINE)[1].split()
    assert [c for c in connect if c.startswith("host=")] == [f"host={a}" for a in want_hosts]
    assert f"port={port}" in connect and "user=dovecot" in connect
    assert f"password={secrets.get(accounts['dovecot'].secret)}" in connect
    php = render_full("mail/etc/postfixadmin/dbconfig.inc.php.j2", inv, host, secrets.get)
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
    assert f"ssl_cert = <{topology.cert_path('postfix01')}" in conf and f"ssl_key = <{topology.key_path('postfix01')}" in conf
    assert conf.count("driver = sql") == 2  # passdb and userdb
    assert "!include" not in conf  # the whole configuration is this file
    assert f"mail_uid = {mail.VMAIL_UID}" in conf
    assert re.search(r"^protocols = imap lmtp sieve$", conf, re.MULTILINE)
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
    assert f"ssl_certificate {topology.cert_path('postfix01')};" in site
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
    "alice@lab_test.org", "bob\n@lab.test", "bob@lab.test\n", "alice\n@lab.test", " alice@lab.test",
    "x;id@lab.test", "$(id)@lab.test", "`id`@lab.test", "a@lab.test;id",
])
def test_malformed_addresses_are_refused(address):
    with pytest.raises(UserError, match="nothing was changed"):
        mail.parse_address(address)


@pytest.mark.parametrize("password", ["", "short", " leading-space", "trailing-space ", "new\nline-123"])
def test_bad_passwords_are_refused(password):
    with pytest.raises(UserError):
        mail.check_password(password)


def test_sql_rows_match_postfixadmin_and_are_quoted():
    assert my_literal("it's") == "'it\\'s'"
    assert my_literal("back\\slash") == "'back\\\\slash'"
    sql = postfixadmin.mailbox_sql("alice", "lab.test", "{BLF-CRYPT}$2y$10$x", "Alice O'Neil")
    assert "'lab.test/alice/'" in sql  # maildir: domain_path YES, domain_in_mailbox NO
    assert "INSERT INTO alias (address, goto, domain" in sql and "('alice@lab.test', 'alice@lab.test'" in sql
    assert "'Alice O\\'Neil'" in sql
    assert "INSERT INTO log" in sql
    alias = postfixadmin.alias_sql("info@lab.test", "lab.test", ["a@lab.test", "b@x.org"])
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


# --- the runbook and the ops on recording hosts (facts in, commands out) -------------------

SECRET = Secrets(Path("/nonexistent/secrets.yml"), persist=False).get  # generated, in memory
VIP = str(LAB.vips["mail"].address)
DB = postfixadmin.client(topology.db_proxy_addresses(LAB, "postfix01")[0])


def files_in_place(files: dict[str, tuple[str, str]]):
    """A rule: ``files`` (path -> (content, 'owner:group:mode')) are on the host as wanted."""
    return files_present({path: (meta, text) for path, (text, meta) in files.items()})


# what `put` runs around an upload (and the checkers of the new files): they succeed
UPLOAD = (r"^(mkdir -p |chown |mv -f |cp -a |rm -f |postfix check|doveconf -n|php -l |nginx -t)", Result())


def recording(answers=None, **kw) -> RecordingRun:
    answers = dict(answers or {})
    answers["*"] = [*answers.get("*", []), UPLOAD]
    run = RecordingRun(LAB, answers=answers, **kw)
    run.secrets.get = lambda name, *a: SECRET(name)
    return run


def mail_files(host: str) -> dict[str, tuple[str, str]]:
    v = mail.template_vars(LAB, host, SECRET)

    def r(name):
        return templates.render(name, LAB, host, SECRET, **v)
    out = {f"/etc/postfix/mysql-virtual-{m}.cf": (r(f"mail/etc/postfix/mysql-virtual-{m}.cf.j2"), "root:postfix:640")
           for m in mail.POSTFIX_MAPS}
    for name, dest, meta in (
            ("postfix/main.cf", "/etc/postfix/main.cf", "root:root:644"),
            ("postfix/master.cf", "/etc/postfix/master.cf", "root:root:644"),
            ("aliases", "/etc/aliases", "root:root:644"),
            ("dovecot/dovecot-sql.conf.ext", "/etc/dovecot/dovecot-sql.conf.ext", "root:dovecot:640"),
            ("dovecot/dovecot.conf", "/etc/dovecot/dovecot.conf", "root:root:644"),
            ("postfixadmin/dbconfig.inc.php", "/etc/postfixadmin/dbconfig.inc.php", "root:www-data:640"),
            ("postfixadmin/config.local.php", "/etc/postfixadmin/config.local.php", "root:www-data:640"),
            ("postfixadmin/hastack-client.cnf", mail.PFA_CLIENT_CNF, "root:root:600"),
            ("nginx/sites-available/postfixadmin", "/etc/nginx/sites-available/postfixadmin", "root:root:644")):
        out[dest] = (r(f"mail/etc/{name}.j2"), meta)
    return out


RUNNING = [(r"^systemctl is-enabled", Result(stdout="enabled\n")), (r"^systemctl is-active", Result())]


def test_install_step_already_converged_runs_no_command():
    pkgs = "".join(f"{p} installed\n" for p in mail.PACKAGES)
    run = recording({"postfix01": [
        (r"^dpkg-query -W -f='\$\{Package\}", Result(stdout=pkgs)),
        (r"^id -u vmail && id -g vmail$", Result(stdout="5000\n5000\n")),
        (r"^getent ", Result()),
        (r"^stat -c '%U:%G:%a' /var/vmail$", Result(stdout="vmail:vmail:770\n")),
    ]})
    mail.install(run.session("postfix01"))
    assert run.session("postfix01").changes == []


def test_install_on_a_fresh_host_preseeds_installs_and_makes_the_vmail_user():
    run = recording()
    mail.install(run.session("postfix01"))
    changes = run.session("postfix01").changes
    assert changes[0] == "debconf-set-selections"
    assert run.session("postfix01").stdins[0][1] == "".join(line + "\n" for line in mail.DEBCONF)
    assert any(c.startswith("DEBIAN_FRONTEND=noninteractive apt-get install") and " postfixadmin " in c + " "
               for c in changes)
    assert "groupadd -g 5000 vmail" in changes
    assert "useradd -r -u 5000 -g vmail -d /var/vmail -s /usr/sbin/nologin -M vmail" in changes


def test_install_refuses_a_vmail_user_with_another_uid():
    run = recording({"postfix01": [(r"^id -u vmail", Result(stdout="1001\n1001\n"))]})
    with pytest.raises(mail.HostFailed, match="uid/gid 1001/1001.*5000/5000"):
        mail.install(run.session("postfix01"))


def test_config_steps_already_converged_run_no_command():
    run = recording({"postfix01": [
        files_in_place(mail_files("postfix01")), (r"^test /etc/aliases.db -nt /etc/aliases$", Result()),
        (r"^test \"\$\(readlink", Result()), (r"^! test -e /etc/nginx/sites-enabled/default$", Result()),
        (r"^test -d /var/cache/postfixadmin/templates_c", Result()), *RUNNING]})
    h = run.session("postfix01")
    assert mail.configure(h) == {"postfix": False, "postfix_restart": False, "dovecot": False}
    mail.web(h)
    assert h.changes == [] and not h.uploads


def test_setup_hash_is_computed_once_per_host_and_run(monkeypatch):
    calls = []
    real = mail.setup_password_hash
    monkeypatch.setattr(mail, "setup_password_hash", lambda pw: calls.append(pw) or real(pw))
    run = recording()
    h = run.session("postfix01")
    mail.configure(h)
    mail.web(h)
    assert len(calls) == 1
    assert len([u for u in h.uploads if u.startswith("/etc/")]) == 12  # every mail template rendered


def test_services_without_pacemaker_are_enabled_and_started_once():
    started = set()

    def start(cmd, stdin):
        started.add(cmd.split()[-1])
        return Result()
    run = recording({"postfix01": [(r"^systemctl start ", start),
                                   (r"^systemctl is-active (-q )?(\S+)$",
                                    lambda cmd, stdin: Result(exited=0 if cmd.split()[-1] in started else 3))]})
    h = run.session("postfix01")
    mail.services(h, {})
    assert h.changes == ["systemctl start postfix", "systemctl enable postfix", "systemctl enable dovecot",
                         "systemctl start dovecot"]


def test_services_already_converged_run_no_command():
    run = recording({"postfix01": RUNNING})
    mail.services(run.session("postfix01"), {})
    assert run.session("postfix01").changes == []


def test_services_pacemaker_owns_are_only_reloaded_where_running():
    owns = (r"crm_resource --resource (postfix|dovecot) --query-xml", Result())
    run = recording({"postfix01": [owns, (r"^systemctl is-active -q postfix@-$", Result())]})
    mail.services(run.session("postfix01"), {"postfix": True, "dovecot": True})
    assert run.session("postfix01").changes == ["systemctl reload postfix@-"]  # dovecot runs elsewhere
    run = recording({"postfix01": [owns]})
    mail.services(run.session("postfix01"), {})
    assert run.session("postfix01").changes == []


ALIASES_QUERY = "SELECT address, goto, active FROM alias WHERE address IN ('postmaster@lab.test', 'abuse@lab.test');"
BATCHED = re.compile(r"SELECT '(\w+)', hastack_q\.\* FROM \((.*)\) AS hastack_q;")


def answer_sql(table: dict[str, str]):
    """A mysql client answering each query of ``table`` (its stdin -> its output), also
    inside one of postfixadmin.query_many's batches (each row tagged with its query's name)."""
    def answer(cmd, stdin):
        batch = [BATCHED.fullmatch(line) for line in stdin.splitlines()]
        if batch and all(batch):
            return Result(stdout="".join(f"{m[1]}\t{row}\n" for m in batch
                                         for row in table.get(m[2] + ";", "").splitlines()))
        return Result(stdout=table.get(stdin, ""))
    return answer


SCHEMA_DONE = [
    (r"grep -o 'function upgrade_\[0-9\]\*'", Result(stdout="1844\n")),
    (r"-e 'SELECT 1'$", Result()),
    (r"^mysql ", answer_sql({
        "SELECT value FROM config WHERE name = 'version';": "1844\n",
        "SELECT domain FROM domain WHERE domain = 'lab.test';": "lab.test\n",
        "SELECT superadmin, active FROM admin WHERE username = 'admin@lab.test';": "1\t1\n",
        ALIASES_QUERY: "postmaster@lab.test\tmailadmin@lab.test\t1\nabuse@lab.test\tmailadmin@lab.test\t1\n",
    })),
]


def test_schema_already_converged_runs_no_command():
    run = recording({"postfix01": SCHEMA_DONE})
    mail.schema(run.session("postfix01"))
    h = run.session("postfix01")
    assert h.changes == []
    # checked every time, with the domain, the superadmin and the aliases: one round trip
    reads = [stdin for cmd, stdin in h.stdins if cmd == DB and "hastack_q" in stdin]
    assert len(reads) == 1 and mail.NO_PK_SQL.rstrip(";") in reads[0] and ALIASES_QUERY.rstrip(";") in reads[0]
    assert len([c for c in h.commands if c == DB]) == 2  # the version, then the batch


def test_a_table_without_a_primary_key_stops_the_schema_step():
    done = dict(SCHEMA_DONE[:2])
    run = recording({"postfix01": [*done.items(), (r"^mysql ", answer_sql({
        "SELECT value FROM config WHERE name = 'version';": "1844\n", mail.NO_PK_SQL: "vacation_notification\n"}))]})
    with pytest.raises(Exception, match="tables without a primary key .*: vacation_notification"):
        mail.schema(run.session("postfix01"))
    assert run.session("postfix01").changes == []


def test_schema_on_a_new_database_runs_the_patched_upgrade_and_adds_domain_and_admin():
    state = {"version": ""}

    def db(cmd, stdin):
        if stdin == "SELECT value FROM config WHERE name = 'version';":
            return Result(stdout=state["version"])
        return Result()
    upgrade_php = UPGRADE_SNIPPET

    def php(cmd, stdin):
        state["version"] = "1844\n"
        return Result(stdout="updating to version 1844")
    run = recording({"postfix01": [
        (r"grep -o 'function upgrade_\[0-9\]\*'", Result(stdout="1844\n")),
        (r"^cat /usr/share/postfixadmin/public/upgrade.php$", Result(stdout=upgrade_php)),
        (r"-e 'SELECT 1'$", Result()),
        (r"^cd /usr/share/postfixadmin/public && HASTACK_DB_HOST=", php),
        (r"^mysql ", db)]})
    h = run.session("postfix01")
    mail.schema(h)
    assert h.uploads[postfixadmin.UPGRADE_COPY + ".hastack-new"] == mail.patch_upgrade(upgrade_php)
    assert f"cd /usr/share/postfixadmin/public && HASTACK_DB_HOST={VIP.rsplit('.', 1)[0]}" in " ".join(h.commands)
    writes = [stdin for cmd, stdin in h.stdins if cmd == DB and stdin.startswith("START TRANSACTION")]
    assert "INSERT INTO domain" in writes[0] and "'lab.test'" in writes[0]
    assert "INSERT INTO admin" in writes[1] and "'admin@lab.test'" in writes[1]
    assert SECRET("mail_postfixadmin_admin_password") not in "".join(h.commands + writes)


def _op(task, *args, answers=(), **kw):
    run = recording({"*": [(rf"grep -qw 'inet {re.escape(VIP)}'$", Result(exited=1)), *answers],
                     "postfix02": [(rf"grep -qw 'inet {re.escape(VIP)}'$", Result())]})
    task.body.runbook(run, *args, **kw)
    return run


def test_add_mailbox_writes_on_the_vip_holder_with_the_password_on_stdin_only():
    run = _op(mail.add_mailbox, "Bob@Lab.Test", password="long-enough-1", name="Bob Smith", answers=[
        (r"-e 'SELECT 1'$", Result()),
        (r"^mysql ", lambda cmd, stdin: Result(stdout="lab.test\n" if stdin.startswith("SELECT domain") else ""))])
    h = run.session("postfix02")
    assert run.connected[:2] == ["postfix01", "postfix02"] and run.session("postfix01").changes == []
    (change,) = h.changes
    assert change == postfixadmin.client(topology.db_proxy_addresses(LAB, "postfix02")[0])
    sql = h.stdins[-1][1]
    assert "'bob@lab.test'" in sql and "'Bob Smith'" in sql and "{BLF-CRYPT}$2y$10$" in sql
    assert not any("long-enough-1" in c for c in h.commands) and "long-enough-1" not in sql


def test_add_mailbox_refuses_an_unknown_domain_and_changes_nothing():
    with pytest.raises(UserError, match="lab.test is not served here"):
        _op(mail.add_mailbox, "bob@lab.test", password="long-enough-1",
            answers=[(r"-e 'SELECT 1'$", Result()), (r"^mysql ", Result())])


@pytest.mark.parametrize("address", ["bob\n@lab.test", "bob@lab.test\n", "x;id@lab.test", "$(id)@lab.test",
                                     "`id`@lab.test", "a b@lab.test", "o'neil@lab.test", "bob@lab.test;id"])
def test_ops_refuse_bad_addresses_before_connecting(address):
    for task, args, kw in ((mail.add_mailbox, (address,), {"password": "long-enough-1"}),
                           (mail.set_password, (address,), {"password": "long-enough-1"}),
                           (mail.add_alias, (address, "a@lab.test"), {}),
                           (mail.add_alias, ("a@lab.test", address), {})):
        run = recording()
        with pytest.raises(UserError, match="nothing was changed"):
            task.body.runbook(run, *args, **kw)
        assert run.connected == []


def test_add_domain_refuses_a_bad_domain_before_connecting():
    for bad in ("lab.test;id", "lab.test\n", "$(id).test", "exa mple.org"):
        run = recording()
        with pytest.raises(UserError, match="not a valid domain name"):
            mail.add_domain.body.runbook(run, bad)
        assert run.connected == []


def test_password_without_terminal_or_option_is_refused_before_connecting(monkeypatch):
    monkeypatch.setattr("sys.stdin", None)
    for task in (mail.add_mailbox, mail.set_password):
        run = recording()
        with pytest.raises(UserError, match="no password given.*--password-file"):
            task.body.runbook(run, "bob@lab.test")
        assert run.connected == []


def test_password_file_and_the_tasks_positional_arguments(tmp_path):
    (tmp_path / "pw").write_text("from-a-file-1\n")
    run = _op(mail.set_password, "bob@lab.test", password_file=str(tmp_path / "pw"), answers=[
        (r"-e 'SELECT 1'$", Result()), (r"^mysql ", Result(stdout="bob@lab.test\n"))])
    sql = run.session("postfix02").stdins[-1][1]
    assert "UPDATE mailbox SET password = '{BLF-CRYPT}" in sql and "'bob@lab.test'" in sql
    hashed = re.search(r"'\{BLF-CRYPT\}([^']+)'", sql)[1]
    assert bcrypt.checkpw(b"from-a-file-1", hashed.replace("$2y$", "$2b$", 1).encode())
    assert mail.add_mailbox.positional == ["address"] and mail.set_password.positional == ["address"]
    with pytest.raises(UserError, match="at least 8"):
        (tmp_path / "short").write_text("short\n")
        mail.set_password.body.runbook(recording(), "bob@lab.test", password_file=str(tmp_path / "short"))


def test_add_alias_quotes_its_targets():
    run = _op(mail.add_alias, "info@lab.test", "a@lab.test, b@example.org", answers=[
        (r"-e 'SELECT 1'$", Result()),
        (r"^mysql ", lambda cmd, stdin: Result(stdout="lab.test\n" if stdin.startswith("SELECT domain") else ""))])
    sql = run.session("postfix02").stdins[-1][1]
    assert "VALUES ('info@lab.test', 'a@lab.test,b@example.org', 'lab.test'" in sql


def test_db_host_is_asked_once_per_run_and_host():
    run = recording({"postfix01": [(r"-e 'SELECT 1'$", Result()), (r"^mysql ", Result(stdout="x\n"))]})
    h = run.session("postfix01")
    postfixadmin.query(h, "SELECT 1;")
    postfixadmin.query(h, "SELECT 2;")
    assert len([c for c in h.commands if c.endswith("-e 'SELECT 1'")]) == 1


def test_commands_parse_back_to_their_words():
    cmd = postfixadmin.client("10.0.0.1")
    assert shlex.split(cmd) == ["mysql", f"--defaults-extra-file={mail.PFA_CLIENT_CNF}", "-h", "10.0.0.1",
                                "--connect-timeout=5", "-NB", "postfix"]


# --- issue 12: Sieve + ManageSieve, postmaster@/abuse@, Postfixadmin's footer ----------------


def test_dovecot_sieve_at_delivery_and_managesieve_with_starttls(secrets):
    conf = render("dovecot/dovecot.conf.j2", secrets)
    assert {"dovecot-sieve", "dovecot-managesieved"} <= set(mail.PACKAGES)
    assert re.search(r"^protocols = imap lmtp sieve$", conf, re.MULTILINE)
    lmtp = re.search(r"^protocol lmtp \{\n(.*?)^\}", conf, re.MULTILINE | re.DOTALL)[1]
    assert re.search(r"^\s+mail_plugins = \$mail_plugins sieve$", lmtp, re.MULTILINE)
    plugin = re.search(r"^plugin \{\n(.*?)^\}", conf, re.MULTILINE | re.DOTALL)[1]
    # in the user's home: MAIL_ROOT/DOMAIN/LOCAL/ (dovecot-sql's user_query), on the replicated store
    assert "sieve = file:~/sieve;active=~/.dovecot.sieve" in plugin
    assert re.search(r"service managesieve-login \{\s+inet_listener sieve \{\s+port = 4190\s+\}\s+\}", conf)
    # STARTTLS, not TLS on connect; no AUTH before it; the certificate the IMAP listeners use
    assert "ssl = yes\n" in conf and "disable_plaintext_auth = yes" in conf
    assert not re.search(r"inet_listener sieve \{[^}]*ssl = yes", conf)
    assert conf.count("ssl_cert = <") == 1
    # vacation replies and redirects: postfix's sendmail, pickup -> cleanup (virtual aliases) -> LMTP
    assert re.search(r"^sendmail_path = /usr/sbin/sendmail$", conf, re.MULTILINE)
    assert "submission_host" not in conf
    assert ("pickup", "unix") in master_services(render("postfix/master.cf.j2", secrets))
    main = postfix_params(render("postfix/main.cf.j2", secrets))
    assert main["virtual_transport"].startswith("lmtp:") and "authorized_submit_users" not in main


@pytest.mark.skipif(not (shutil.which("doveconf") and Path("/usr/lib/dovecot/managesieve").exists()
                         and Path("/usr/lib/dovecot/modules/lib90_sieve_plugin.so").exists()),
                    reason="dovecot-core, dovecot-sieve and dovecot-managesieved are not installed here")
@pytest.mark.parametrize("path", MAIL_INVENTORIES, ids=lambda p: p.name)
def test_doveconf_accepts_the_rendered_dovecot_conf(path, secrets, tmp_path):
    inv = load(path)
    conf = tmp_path / "dovecot.conf"
    conf.write_text(render_full("mail/etc/dovecot/dovecot.conf.j2", inv, mail.backends(inv)[0], secrets.get))
    out = subprocess.run(["doveconf", "-n", "-c", str(conf)], capture_output=True, text=True, check=False)
    assert out.returncode == 0, out.stderr
    assert "service managesieve-login {" in out.stdout and 'mail_plugins = " sieve"' in out.stdout
    bad = tmp_path / "bad.conf"  # the check is real: an unknown setting fails it
    bad.write_text(conf.read_text() + "\nsieve_no_such_setting = 1\n")
    assert subprocess.run(["doveconf", "-n", "-c", str(bad)], capture_output=True, check=False).returncode != 0


def test_managesieve_is_open_from_the_webmail_hosts_only_on_the_mail_vip():
    vip = f"{LAB.vips['mail'].address}/32"
    webmail = {a for h in LAB.with_role("webmail") for a in LAB.peer_addresses(h, "postfix01")}
    for host in LAB.hosts:
        sieve = [r for r in flows.input_rules(LAB, host) if r.proto == "tcp" and "4190" in r.ports.split(",")]
        if "mail_backend" in LAB.hosts[host].roles:
            assert {r.src for r in sieve} == webmail and webmail
            assert {r.dst for r in sieve} == {vip}
        else:
            assert sieve == [], host
    # a non-webmail host on the same network (a Galera node) is not among the sources
    assert not {a for a in LAB.peer_addresses("pxc1", "postfix01")} & webmail


def test_postfixadmin_footer_names_the_site_and_hides_the_update_check(secrets):
    local = render("postfixadmin/config.local.php.j2", secrets)
    assert "change-this" not in local
    name = LAB.vips["mail"].names[0]
    assert "$CONF['show_footer_text'] = 'YES';" in local
    assert f"$CONF['footer_link'] = 'https://{name}/';" in local
    assert re.search(rf"\$CONF\['footer_text'\] = '[^']*{re.escape(name)}';", local)
    assert f"$CONF['admin_email'] = 'postmaster@{LAB.mail.domain}';" in local
    # 3.3's footer.tpl hard-codes the update check in <span id="update-check">: our style sheet hides it
    css = re.search(r"\$CONF\['theme_custom_css'\] = '([^']+)';", local)[1]
    assert not css.startswith("/")  # Postfixadmin prefixes '../' on the pages under users/
    site = render("nginx/sites-available/postfixadmin.j2", secrets)
    block = re.search(rf"location = /{re.escape(css)} \{{(.*?)\}}\n", site, re.DOTALL)[1]
    assert "default_type text/css;" in block and "#update-check { display: none; }" in block


def _inventory_with(postmaster_line: str, tmp_path) -> Path:
    text = (ROOT / "inventory/lab.yml").read_text()
    assert "\n  postmaster: mailadmin\n" in text
    path = tmp_path / "site.yml"
    path.write_text(text.replace("\n  postmaster: mailadmin\n", f"\n{postmaster_line}\n" if postmaster_line else "\n"))
    return path


@pytest.mark.parametrize("value, want", [
    ("mailadmin", "mailadmin@lab.test"),
    ("ops.team+mail", "ops.team+mail@lab.test"),
    ("noc@corp.example.org", "noc@corp.example.org"),
])
def test_inventory_postmaster_is_a_local_part_or_an_address(value, want, tmp_path):
    inv = load(_inventory_with(f"  postmaster: {value}", tmp_path))
    assert inv.mail.postmaster == value and inv.mail.postmaster_address == want
    assert LAB.mail.postmaster_address == "mailadmin@lab.test"
    assert load(_inventory_with("", tmp_path)).mail.postmaster_address is None


@pytest.mark.parametrize("value, message", [
    ("'Admin'", "not a mailbox"), ("'a..b'", "not a mailbox"), ("'.a'", "not a mailbox"),
    ("\"a'b\"", "not a mailbox"), ("'a b'", "not a mailbox"), ("'a;id'", "not a mailbox"),
    ("'$(id)'", "not a mailbox"), ("'a@localhost'", "not a mailbox"), ("'a@b@lab.test'", "not a mailbox"),
    ("\"a\\nb\"", "not a mailbox"), ("''", "not a mailbox"), (f"'{'x' * 65}'", "not a mailbox"),
    ("postmaster", "forward to themselves"), ("abuse@lab.test", "forward to themselves"),
    ("[a]", "valid string"),
])
def test_inventory_refuses_a_bad_postmaster(value, message, tmp_path):
    path = _inventory_with(f"  postmaster: {value}", tmp_path)
    with pytest.raises(InventoryError) as e:
        load(path)
    assert e.value.problems[0][0] == "mail.postmaster" and message in e.value.problems[0][1]
    assert f"{path}: mail.postmaster: " in str(e.value)


def _schema_run(aliases: str, inv=LAB) -> RecordingRun:
    answers = dict(SCHEMA_DONE[:2])
    answers_db = {
        "SELECT value FROM config WHERE name = 'version';": "1844\n",
        "SELECT domain FROM domain WHERE domain = 'lab.test';": "lab.test\n",
        "SELECT superadmin, active FROM admin WHERE username = 'admin@lab.test';": "1\t1\n",
        ALIASES_QUERY: aliases,
    }
    run = RecordingRun(inv, answers={"*": [*answers.items(), UPLOAD, (
        r"^mysql ", answer_sql(answers_db))]})
    run.secrets.get = lambda name, *a: SECRET(name)
    mail.schema(run.session("postfix01"))
    return run


def _alias_writes(run) -> list[str]:
    h = run.session("postfix01")
    return [stdin for cmd, stdin in h.stdins if cmd == DB and stdin.startswith("START TRANSACTION")]


def test_postmaster_and_abuse_aliases_are_added_once_with_quoted_values():
    run = _schema_run("")
    (sql,) = _alias_writes(run)
    target = my_literal("mailadmin@lab.test")
    for address in ("postmaster@lab.test", "abuse@lab.test"):
        assert (f"INSERT INTO alias (address, goto, domain, created, modified, active) VALUES "
                f"({my_literal(address)}, {target}, {my_literal('lab.test')}, NOW(), NOW(), 1);") in sql
    assert sql.count("INSERT INTO log") == 2 and sql.endswith("COMMIT;\n")
    changed = run.session("postfix01").reported("changed")
    assert any("alias postmaster@lab.test -> mailadmin@lab.test" in m for m in changed)
    # converged: read, nothing written
    run = _schema_run("postmaster@lab.test\tmailadmin@lab.test\t1\nabuse@lab.test\tmailadmin@lab.test\t1\n")
    assert _alias_writes(run) == [] and run.session("postfix01").changes == []
    assert "alias abuse@lab.test -> mailadmin@lab.test" in run.session("postfix01").reported("ok")


def test_an_alias_elsewhere_is_pointed_at_the_inventory_mailbox_and_a_mailbox_left_alone():
    run = _schema_run("postmaster@lab.test\tpostmaster@lab.test\t1\nabuse@lab.test\tsomeone@lab.test\t0\n")
    (sql,) = _alias_writes(run)
    assert "INSERT INTO alias" not in sql
    assert ("UPDATE alias SET goto = 'mailadmin@lab.test', active = 1, modified = NOW() "
            "WHERE address = 'abuse@lab.test';") in sql
    assert "'postmaster@lab.test'" not in sql  # a mailbox of its own (address = goto)
    assert "postmaster@lab.test is a mailbox of its own" in run.output


def test_no_postmaster_in_the_inventory_no_aliases_and_a_note():
    inv = LAB.model_copy(update={"mail": LAB.mail.model_copy(update={"postmaster": None})})
    run = _schema_run("", inv=inv)
    h = run.session("postfix01")
    assert _alias_writes(run) == [] and h.changes == []
    assert ALIASES_QUERY not in [stdin for _, stdin in h.stdins]
    assert "mail.postmaster is not set" in run.output and "postmaster@lab.test and abuse@lab.test" in run.output


def test_aliases_in_check_mode_on_a_new_database_are_only_announced():
    run = RecordingRun(LAB, check=True, answers={"*": [
        (r"^test -s /etc/postfixadmin/hastack-client.cnf", Result()),
        (r"grep -o 'function upgrade_\[0-9\]\*'", Result(stdout="1844\n")),
        (r"-e 'SELECT 1'$", Result()), (r"^mysql ", Result())]})
    run.secrets.get = lambda name, *a: SECRET(name)
    mail.schema(run.session("postfix01"))
    h = run.session("postfix01")
    assert h.changes == [] and ALIASES_QUERY not in [stdin for _, stdin in h.stdins]
    assert any("alias postmaster@lab.test -> mailadmin@lab.test" in m for m in h.reported("would change"))


def test_dovecot_owned_by_pacemaker_is_reloaded_where_it_runs():
    owns = (r"crm_resource --resource (postfix|dovecot) --query-xml", Result())
    run = recording({"postfix01": [owns, (r"^systemctl is-active -q dovecot$", Result())]})
    mail.services(run.session("postfix01"), {"dovecot": True})
    assert run.session("postfix01").changes == ["systemctl reload dovecot"]
