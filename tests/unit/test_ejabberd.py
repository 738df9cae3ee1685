"""ejabberd tier without hosts: ejabberd.yml and ejabberdctl.cfg for every shipped
inventory, the config check, JID and password validation, list_cluster parsing;
the runbook's steps and the ops tasks on the recording host: facts in, commands
out, user names with shell metacharacters quoted, passwords on stdin only."""

from __future__ import annotations

import getpass
import io
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from fabfile import ejabberd
from fabfile.core import Result, UserError, prompt, templates, topology
from fabfile.core.inventory import load
from fabfile.core.sql import PSQL
from fabfile.core.testing import RecordingRun, files_present
from tests.unit.shipped import INVENTORIES

ROOT = Path(__file__).resolve().parents[2]
LAB = ROOT / "inventory/lab.yml"
YML = "ejabberd/etc/ejabberd/ejabberd.yml.j2"
CTL_CFG = "ejabberd/etc/default/ejabberd.j2"
COOKIE = "ejabberd/var/lib/ejabberd/.erlang.cookie.j2"
SECRETS = {ejabberd.SECRET_COOKIE: "the-cookie", topology.XMPP_DB_SECRET: "db-pw"}


def secret(name):
    return SECRETS.get(name, f"secret-of-{name}")


def render(name, inv, host):
    return templates.render(name, inv, host, secret, **ejabberd.template_vars(inv, host, secret))


def config(inv, host):
    text = render(YML, inv, host)
    return ejabberd.check_config(text, inv.xmpp.domain)


@pytest.fixture(scope="module")
def lab():
    return load(LAB)


@pytest.mark.parametrize("inventory", INVENTORIES, ids=lambda p: p.name)
def test_config_renders_and_checks_for_every_ejabberd_host(inventory):
    inv = load(inventory)
    if inv.xmpp is None:
        pytest.skip("no XMPP service in this inventory")
    prim = topology.pg_primary(inv)
    for host in topology.ejabberd_nodes(inv):
        data = config(inv, host)
        assert data["hosts"] == [inv.xmpp.domain]
        assert data["auth_method"] == ["sql"] and data["default_db"] == "sql" and data["sql_type"] == "pgsql"
        assert data["sql_server"] == inv.service_address(prim)
        assert data["sql_password"] == "db-pw"
        assert data["certfiles"] == [topology.cert_path(host), topology.key_path(host)]
        c2s = [lst for lst in data["listen"] if lst["module"] == "ejabberd_c2s"]
        assert any(lst["port"] == 5222 and lst["starttls_required"] is True for lst in c2s)
        assert data["acl"]["admin"]["user"] == [a if "@" in a else f"{a}@{inv.xmpp.domain}"
                                                for a in inv.xmpp.admins]


def test_ejabberdctl_cfg_sets_the_node_name_and_port_window(lab, tmp_path):
    text = render(CTL_CFG, lab, "e2server")
    assert "ERLANG_NODE=ejabberd@e2server\n" in text
    assert "FIREWALL_WINDOW=4200-4210\n" in text
    assert "INET_DIST_INTERFACE=10.200.1.3\n" in text
    f = tmp_path / "ejabberdctl.cfg"
    f.write_text(text)
    assert subprocess.run(["sh", "-n", str(f)]).returncode == 0


def test_cookie_is_the_shared_secret_alone(lab):
    assert render(COOKIE, lab, "e1server") == render(COOKIE, lab, "e2server") == "the-cookie\n"


def test_admins_empty_renders_an_empty_list(lab):
    inv = lab.model_copy(update={"xmpp": lab.xmpp.model_copy(update={"admins": []})})
    assert config(inv, "e1server")["acl"]["admin"]["user"] == []


@pytest.mark.parametrize("text, error", [
    ("hosts: [x\n", "does not parse as YAML"),
    ("- a\n", "must be a YAML mapping"),
    ("hosts: [other.test]\n", "hosts must be"),
    ("hosts: [xmpp.lab.test]\n", "sql_type is missing"),
])
def test_check_config_names_what_is_wrong(text, error):
    with pytest.raises(UserError, match=error):
        ejabberd.check_config(text, "xmpp.lab.test")


def test_check_config_requires_starttls_on_c2s(lab):
    data = config(lab, "e1server")
    for lst in data["listen"]:
        if lst.get("port") == 5222:
            lst["starttls_required"] = False
    with pytest.raises(UserError, match="starttls_required"):
        ejabberd.check_config(yaml.safe_dump(data), "xmpp.lab.test")


# --- ops input -------------------------------------------------------------------------------


@pytest.mark.parametrize("user, want", [
    ("alice", ("alice", "xmpp.lab.test")),
    ("Alice@xmpp.lab.test", ("alice", "xmpp.lab.test")),
    ("bob.smith", ("bob.smith", "xmpp.lab.test")),
    ("x;id", ("x;id", "xmpp.lab.test")),  # legal localparts (RFC 7622), quoted on the command line
    ("x$(id)", ("x$(id)", "xmpp.lab.test")),
])
def test_parse_jid_accepts(lab, user, want):
    assert ejabberd.parse_jid(lab, user) == want


@pytest.mark.parametrize("user, error", [
    ("", "empty user name"),
    ("alice@example.org", "domain 'example.org' is not served here"),
    ("al ice", "not a valid JID"),
    ("a<b", "not a valid JID"),
    ("o'brien", "not a valid JID"),  # ' is excluded from localparts by RFC 7622
    ("alice\n", "not a valid JID"),
    ("alice\n@xmpp.lab.test", "not a valid JID"),
    ("alice@xmpp.lab.test\n", "is not served here"),
    ("a\tb", "not a valid JID"),
    ("@xmpp.lab.test", "not a valid JID"),
    ("a@b@xmpp.lab.test", "is not served here"),
    ("alice@xmpp.lab.test/phone", "not a bare JID"),
])
def test_parse_jid_refuses_with_a_clear_message(lab, user, error):
    with pytest.raises(UserError, match=error):
        ejabberd.parse_jid(lab, user)


@pytest.mark.parametrize("password", ["", None, " lead", "two\nlines"])
def test_bad_passwords_are_refused(password):
    with pytest.raises(UserError):
        ejabberd.check_password(password)


def test_good_password_passes():
    assert ejabberd.check_password("s3cret pass") == "s3cret pass"


def test_cluster_members_parses_list_cluster():
    out = "'ejabberd@e1server'\n'ejabberd@e2server'\n"
    assert ejabberd.cluster_members(out) == ["ejabberd@e1server", "ejabberd@e2server"]
    assert ejabberd.cluster_members("ejabberd@e1server\n") == ["ejabberd@e1server"]
    assert ejabberd.cluster_members("") == []


# --- ops on the recording host ---------------------------------------------------------------

RUNNING = (r"^ejabberdctl status$", Result("The node ejabberd@e1server is started. Status: started\n"))
REGISTERED = (r"^ejabberdctl check_account ", Result())
EVIL = ["x;id", "x$(id)", "x`id`", "x|cat", "x\\y", "~root", "x*", "x!$home%{}[]#="]
EVIL_PASSWORD = "p'w;$(id) `id` \"x\""


def user_commands(run, local):
    return [c for _, c in run.all_commands() if local in c or "check_account" in c or "register" in c
            or "change_password" in c]


def assert_quoted(run, local, verbs):
    """Every recorded command that names the user parses (shlex) to the user as one
    word, after the verb, followed by the domain; the password is on no command line."""
    seen = []
    for cmd in user_commands(run, local):
        words = shlex.split(cmd)
        assert words[0] == "ejabberdctl", cmd
        seen.append(words[1])
        assert words[2] == local and words[3] == "xmpp.lab.test", cmd
        assert EVIL_PASSWORD not in cmd
    assert seen == verbs


@pytest.mark.parametrize("local", EVIL)
def test_register_user_quotes_the_user_and_sends_the_password_on_stdin(lab, local):
    run = RecordingRun(lab, answers={"*": [RUNNING]})
    ejabberd.register_user.body.runbook(run, local, password=EVIL_PASSWORD)
    assert_quoted(run, local, ["check_account", "register"])
    h = run.session("e1server")
    assert h.changes == [f"ejabberdctl register {shlex.quote(local)} xmpp.lab.test \"$(cat)\""]
    assert h.stdins == [(h.changes[0], EVIL_PASSWORD)]


@pytest.mark.parametrize("local", EVIL)
def test_register_user_update_changes_the_password_of_an_existing_user(lab, local):
    run = RecordingRun(lab, answers={"*": [RUNNING, REGISTERED]})
    ejabberd.register_user.body.runbook(run, local, password=EVIL_PASSWORD, update=True)
    assert_quoted(run, local, ["check_account", "change_password"])
    assert run.session("e1server").stdins[0][1] == EVIL_PASSWORD


def test_register_user_refuses_an_existing_user_without_update(lab):
    run = RecordingRun(lab, answers={"*": [RUNNING, REGISTERED]})
    with pytest.raises(UserError, match="x;id@xmpp.lab.test is already registered"):
        ejabberd.register_user.body.runbook(run, "x;id", password="pw")
    assert run.session("e1server").changes == []


@pytest.mark.parametrize("local", EVIL)
def test_unregister_user_quotes_the_user(lab, local):
    run = RecordingRun(lab, answers={"*": [RUNNING, REGISTERED]})
    ejabberd.unregister_user.body.runbook(run, local)
    assert_quoted(run, local, ["check_account", "unregister"])
    assert run.session("e1server").changes == [f"ejabberdctl unregister {shlex.quote(local)} xmpp.lab.test"]


def test_unregister_of_an_unknown_user_changes_nothing(lab):
    run = RecordingRun(lab, answers={"*": [RUNNING]})
    ejabberd.unregister_user.body.runbook(run, "x;id")
    assert run.session("e1server").changes == []
    assert_quoted(run, "x;id", ["check_account"])


@pytest.mark.parametrize("local", EVIL)
def test_change_password_quotes_the_user_and_sends_the_password_on_stdin(lab, local):
    run = RecordingRun(lab, answers={"*": [RUNNING, REGISTERED]})
    ejabberd.change_password.body.runbook(run, local, password=EVIL_PASSWORD)
    assert_quoted(run, local, ["check_account", "change_password"])
    h = run.session("e1server")
    assert h.stdins == [(h.changes[0], EVIL_PASSWORD)]


def test_change_password_of_an_unknown_user_is_refused(lab):
    run = RecordingRun(lab, answers={"*": [RUNNING]})
    with pytest.raises(UserError, match="is not registered"):
        ejabberd.change_password.body.runbook(run, "bob", password="pw")
    assert run.session("e1server").changes == []


@pytest.mark.parametrize("task, kw", [
    (ejabberd.register_user, {"password": "pw"}),
    (ejabberd.unregister_user, {}),
    (ejabberd.change_password, {"password": "pw"}),
])
@pytest.mark.parametrize("user", ["alice\n", "o'brien", "al ice", "x\"y", "x&y", "bob@example.org"])
def test_bad_users_are_refused_before_any_connection(lab, task, kw, user):
    run = RecordingRun(lab, answers={"*": [RUNNING]})
    with pytest.raises(UserError):
        task.body.runbook(run, user, **kw)
    assert run.connected == []


def test_a_bad_password_is_refused_before_any_connection(lab):
    run = RecordingRun(lab, answers={"*": [RUNNING]})
    with pytest.raises(UserError, match="empty password refused"):
        ejabberd.register_user.body.runbook(run, "alice", password="")
    assert run.connected == []


def test_without_password_or_terminal_the_error_says_how_to_pass_it(lab, monkeypatch):
    monkeypatch.setattr(sys, "stdin", io.StringIO(""))
    for task in (ejabberd.register_user, ejabberd.change_password):
        run = RecordingRun(lab, answers={"*": [RUNNING]})
        with pytest.raises(UserError, match="no password given and no terminal to ask on: pass --password-file FILE"):
            task.body.runbook(run, "alice")
        assert run.connected == []


def test_password_from_a_file_or_stdin(lab, monkeypatch, tmp_path):
    f = tmp_path / "pw"
    f.write_text("from-a-file\n")
    run = RecordingRun(lab, answers={"*": [RUNNING]})
    ejabberd.register_user.body.runbook(run, "alice", password_file=str(f))
    assert [s for _, s in run.session("e1server").stdins] == ["from-a-file"]
    monkeypatch.setattr(sys, "stdin", io.StringIO("from-stdin\n"))
    run = RecordingRun(lab, answers={"*": [RUNNING, REGISTERED]})
    ejabberd.change_password.body.runbook(run, "alice", password_file="-")
    assert [s for _, s in run.session("e1server").stdins] == ["from-stdin"]


def test_password_prompted_hidden_on_a_terminal(lab, monkeypatch):
    monkeypatch.setattr(prompt, "_terminal", lambda: True)
    asked = []
    monkeypatch.setattr(getpass, "getpass", lambda text: asked.append(text) or "typed-pw")
    run = RecordingRun(lab, answers={"*": [RUNNING]})
    ejabberd.register_user.body.runbook(run, "alice")
    assert asked == ["password: ", "password again: "]
    assert [s for _, s in run.session("e1server").stdins] == ["typed-pw"]


def test_ops_go_to_the_first_node_that_answers(lab):
    run = RecordingRun(lab, answers={"e2server": [RUNNING]})
    ejabberd.register_user.body.runbook(run, "alice", password="pw")
    assert run.session("e1server").changes == []
    assert run.session("e2server").changes == ['ejabberdctl register alice xmpp.lab.test "$(cat)"']


def test_ops_refuse_when_no_node_answers(lab):
    run = RecordingRun(lab)
    with pytest.raises(UserError, match="no ejabberd node answers, nothing was changed"):
        ejabberd.register_user.body.runbook(run, "alice", password="pw")
    assert all(run.session(h).changes == [] for h in ("e1server", "e2server"))


def test_list_users_quotes_the_domain(lab):
    run = RecordingRun(lab, answers={"*": [RUNNING, (r"registered_users", Result("alice\nbob\n"))]})
    ejabberd.list_users.body.runbook(run)
    assert "ejabberdctl registered_users xmpp.lab.test" in run.session("e1server").commands


def test_cluster_status_quotes_the_vip(lab):
    run = RecordingRun(lab, answers={"*": [RUNNING]})
    ejabberd.cluster_status.body.runbook(run)
    assert "ip -o -4 addr show | grep -qw 10.200.1.4" in run.session("e1server").commands


def test_register_user_refuses_bad_input_before_any_connection(tmp_path):
    """`inv ejabberd.register-user` with bad input: one clear line, exit 1, and no
    SSH (the inventory's key does not even exist here)."""
    inv = tmp_path / "site.yml"
    inv.write_text(LAB.read_text())
    for args, error in [(["bob@example.org", "--password", "pw"], "domain 'example.org' is not served here"),
                        (["bad user", "--password", "pw"], "not a valid JID"),
                        (["alice\n", "--password", "pw"], "not a valid JID"),
                        (["carol", "--password", ""], "empty password refused"),
                        (["carol"], "no terminal to ask on: pass --password-file FILE"),
                        (["carol", "--password-file", "-"], "empty password refused"),
                        (["carol", "--password-file", str(tmp_path / "none")], "cannot read it")]:
        out = subprocess.run([str(ROOT / ".venv/bin/inv"), "ejabberd.register-user", *args],
                             cwd=ROOT, capture_output=True, text=True, timeout=60, stdin=subprocess.DEVNULL,
                             env={"INVOKE_INVENTORY": str(inv), "PATH": "/usr/bin:/bin", "HOME": str(tmp_path)})
        assert out.returncode == 1, args + [out.stdout + out.stderr]
        assert error in out.stdout + out.stderr, args
        assert "Traceback" not in out.stdout + out.stderr


# --- the runbook on the recording host -------------------------------------------------------


# what put() runs around an upload, and the checkers of the new files: they succeed
FILE_OPS = [(r"^(mkdir -p|chown|mv -f|rm -f|cp -a|sh -n) ", Result()),
            (r"^if systemctl is-active --quiet ejabberd; then ejabberdctl reload_config; fi$", Result())]


def configured_files(inv, host):
    return {
        ejabberd.CTL_CONFIG: ("root:root:644", render(CTL_CFG, inv, host)),
        ejabberd.CONFIG: ("ejabberd:ejabberd:600", render(YML, inv, host)),
        ejabberd.COOKIE: ("ejabberd:ejabberd:400", render(COOKIE, inv, host)),
    }


def test_packages_are_installed_without_starting_a_service(lab):
    run = RecordingRun(lab, answers={"*": FILE_OPS})
    h = run.session("e1server")
    ejabberd._packages(h)
    assert h.changes[0].startswith("printf %s ") and h.changes[0].endswith("> /usr/sbin/policy-rc.d "
                                                                           "&& chmod 0755 /usr/sbin/policy-rc.d")
    assert "apt-get install" in h.changes[1] and "ejabberd erlang-p1-pgsql postgresql-client ssl-cert" in h.changes[1]
    assert h.changes[2:] == ["rm -f /usr/sbin/policy-rc.d"]


def test_packages_present_changes_nothing(lab):
    listed = "".join(f"{p} installed\n" for p in ejabberd.PACKAGES)
    run = RecordingRun(lab, answers={"*": [(r"^dpkg-query", Result(listed))]})
    h = run.session("e1server")
    ejabberd._packages(h)
    assert h.changes == []


def test_configure_a_fresh_node_writes_the_files_and_joins_ssl_cert(lab):
    run = RecordingRun(lab, secrets=SECRETS, answers={"*": FILE_OPS})
    h = run.session("e1server")
    assert ejabberd._configure(h) is True
    assert {path: h.uploads[f"{path}.hastack-new"] for path in configured_files(lab, "e1server")} == {
        path: text for path, (_, text) in configured_files(lab, "e1server").items()}
    assert h.changes == ["usermod -a -G ssl-cert ejabberd"]
    # the config is checked by the running node (the old file comes back when refused)
    assert "if systemctl is-active --quiet ejabberd; then ejabberdctl reload_config; fi" in h.commands


def test_configure_an_already_converged_node_changes_nothing(lab):
    run = RecordingRun(lab, secrets=SECRETS, answers={"*": [
        (r"^grep -qF 'Managed by hastack' /etc/default/ejabberd$", Result()),
        files_present(configured_files(lab, "e1server")),
        (r"^id -nG ejabberd", Result()),
    ]})
    h = run.session("e1server")
    assert ejabberd._configure(h) is False
    assert h.changes == [] and h.uploads == {}
    assert h.reported("changed") == []


def test_configure_refuses_a_node_that_ran_under_another_name(lab):
    run = RecordingRun(lab, secrets=SECRETS, answers={"*": [(r"^test -e /var/lib/ejabberd/schema.DAT$", Result())]})
    with pytest.raises(Exception, match="already ran here under another node name"):
        ejabberd._configure(run.session("e1server"))
    assert run.session("e1server").changes == [] and run.session("e1server").uploads == {}


def test_schema_is_loaded_once_as_the_owner_from_the_first_node(lab):
    schema = "CREATE TABLE users (username text);\n"
    run = RecordingRun(lab, answers={"e1server": [(r"^cat /usr/share/ejabberd/sql/pg.sql$", Result(schema))]})
    h = run.session("psql1server")
    ejabberd._schema(h, "e1server")
    assert h.changes == [f"{PSQL} -d ejabberd -f -"]
    assert h.stdins == [(h.changes[0], f'SET ROLE "ejabberd";\nBEGIN;\n{schema}\nCOMMIT;\n')]
    present = RecordingRun(lab, answers={"psql1server": [(r"to_regclass", Result("t\n"))]})
    ejabberd._schema(present.session("psql1server"), "e1server")
    assert present.session("psql1server").changes == []
    assert present.session("e1server").commands == []  # the schema file is read only when needed


def test_join_an_already_joined_node_changes_nothing(lab):
    run = RecordingRun(lab, answers={"*": [
        (r"^ejabberdctl list_cluster$", Result("'ejabberd@e1server'\n'ejabberd@e2server'\n"))]})
    h = run.session("e2server")
    ejabberd._join(h, "e1server")
    assert h.changes == [] and h.commands == ["ejabberdctl list_cluster"]


def test_join_a_new_node_joins_restarts_cleanly_and_waits(lab):
    clusters = iter(["'ejabberd@e2server'\n", "'ejabberd@e1server'\n'ejabberd@e2server'\n"])
    run = RecordingRun(lab, answers={"*": [
        (r"^ejabberdctl list_cluster$", lambda cmd, stdin: Result(next(clusters))),
        (r"ejabberdctl status >/dev/null 2>&1 && exit 0", Result()),
    ]})
    h = run.session("e2server")
    ejabberd._join(h, "e1server")
    assert h.changes == ["ejabberdctl --no-timeout join_cluster ejabberd@e1server && ejabberdctl stop "
                         "&& ejabberdctl stopped && systemctl start ejabberd"]
    assert h.commands[2].startswith("for i in $(seq 90); do ejabberdctl status >/dev/null 2>&1 && exit 0;")


def test_running_waits_for_the_node_and_shows_the_log_when_it_does_not_start(lab):
    run = RecordingRun(lab, answers={"*": [
        (r"^systemctl is-enabled", Result("enabled\n")), (r"^systemctl is-active", Result()),
        (r"^tail -n 20 ", Result("boom: mnesia\n"))]})
    with pytest.raises(Exception, match="ejabberd started as ejabberd@e1server: not after 90 s:\nboom: mnesia"):
        ejabberd._running(run.session("e1server"), False)
