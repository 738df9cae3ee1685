"""ejabberd tier without hosts: ejabberd.yml and ejabberdctl.cfg for every shipped
inventory (MUC, pubsub and MQTT on SQL, MQTT over TLS), the config check, JID
and password validation, list_cluster parsing; the runbook's steps and the ops
tasks on the recording host: facts in, commands out, user names with shell
metacharacters quoted, passwords on stdin only; the admin accounts (registered
once with their generated password, never overwritten) and admin-password."""

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
from fabfile.core import HostFailed, Result, UserError, prompt, templates, topology
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
        # MQTT on 1883 (the port the firewall opens) over TLS, on the same accounts and SQL
        mqtt = [lst for lst in data["listen"] if lst["module"] == "mod_mqtt"]
        assert [(lst["port"], lst["tls"]) for lst in mqtt] == [(1883, True)]
        mods = data["modules"]
        for module in ("mod_mqtt", "mod_muc", "mod_pubsub"):
            assert mods[module]["db_type"] == "sql", module
        assert mods["mod_muc"]["hosts"] == [f"conference.{inv.xmpp.domain}"]
        assert mods["mod_pubsub"]["hosts"] == [f"pubsub.{inv.xmpp.domain}"]
        assert topology.xmpp_service_hosts(inv) == mods["mod_muc"]["hosts"] + mods["mod_pubsub"]["hosts"]


def test_muc_and_pubsub_use_the_access_rules_the_config_defines(lab):
    data = config(lab, "e1server")
    rules, mods = data["access_rules"], data["modules"]
    muc, pubsub = mods["mod_muc"], mods["mod_pubsub"]
    assert rules["muc_create"] == {"allow": "local"} and rules["pubsub_createnode"] == {"allow": "local"}
    assert muc["access_create"] == muc["access_persistent"] == "muc_create"
    assert muc["access_register"] == "local" and muc["access_admin"] == [{"allow": "admin"}]
    assert pubsub["access_createnode"] == "pubsub_createnode"
    # rooms may be made persistent by their owner, are not by default; history is bounded
    assert muc["default_room_options"]["persistent"] is False
    assert muc["default_room_options"]["mam"] is False and "mod_mam" not in mods  # no archive to point at
    assert 0 < muc["history_size"] <= 50
    assert pubsub["plugins"][0] == "flat" and "pep" in pubsub["plugins"] and "mod_caps" in mods
    assert pubsub["default_node_config"]["max_items"] <= pubsub["max_items_node"]
    assert pubsub["force_node_config"]["storage:bookmarks"] == {"access_model": "whitelist"}


def test_every_sql_module_has_its_tables_in_the_schema_check():
    """The tables the deploy checks for are pg.sql's tables of the modules we load
    (ejabberd 23.01's /usr/share/ejabberd/sql/pg.sql creates them all)."""
    assert {"users", "muc_room", "pubsub_node", "pubsub_item", "mqtt_pub"} <= set(ejabberd.SCHEMA_TABLES)


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


@pytest.mark.parametrize("tls", [False, None, "true"])
def test_check_config_refuses_mqtt_without_tls(lab, tls):
    data = config(lab, "e1server")
    for lst in data["listen"]:
        if lst["module"] == "mod_mqtt":
            if tls is None:
                del lst["tls"]
            else:
                lst["tls"] = tls
    with pytest.raises(UserError, match="MQTT listener on port 1883 must have tls: true"):
        ejabberd.check_config(yaml.safe_dump(data), "xmpp.lab.test")


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
    # every table there: the probe lists no missing one
    present = RecordingRun(lab, answers={"psql1server": [(r"to_regclass", Result(""))]})
    ejabberd._schema(present.session("psql1server"), "e1server")
    assert present.session("psql1server").changes == []
    assert present.session("e1server").commands == []  # the schema file is read only when needed
    probe = shlex.split(present.session("psql1server").commands[0])[-1]
    assert all(f"'{t}'" in probe for t in ejabberd.SCHEMA_TABLES)


def test_schema_without_the_module_tables_is_reported_not_reloaded(lab):
    run = RecordingRun(lab, answers={"psql1server": [(r"to_regclass", Result("muc_room\nmqtt_pub\n"))]})
    with pytest.raises(HostFailed, match="has ejabberd's users table but not muc_room, mqtt_pub"):
        ejabberd._schema(run.session("psql1server"), "e1server")
    assert run.session("psql1server").changes == [] and run.session("e1server").commands == []


def node_state(*members: str, started: bool = True):
    """erl_call's answer to ejabberd.NODE_STATE: the node started or not, the cluster's nodes."""
    return Result("{ok, {%s, [%s]}}" % ("started" if started else "not_started", ", ".join(members)))


def test_join_an_already_joined_node_changes_nothing(lab):
    run = RecordingRun(lab, answers={"*": [
        (r"erl_call -timeout 10 -sname ejabberd@e2server -e$", node_state("ejabberd@e1server", "ejabberd@e2server"))]})
    h = run.session("e2server")
    ejabberd._join(h, "e1server")
    assert h.changes == [] and h.commands == [ejabberd.erl_call("e2server")]
    assert h.stdins == [(ejabberd.erl_call("e2server"), ejabberd.NODE_STATE + "\n")]


def test_join_a_new_node_joins_restarts_cleanly_and_waits(lab):
    run = RecordingRun(lab, answers={"*": [
        (r"erl_call -timeout 10 -sname ejabberd@e2server -e$", node_state("ejabberd@e2server")),
        (r"^ejabberdctl list_cluster$", Result("'ejabberd@e1server'\n'ejabberd@e2server'\n")),
        (r"grep -q '\^\{ok, \{started,' && exit 0", Result()),
    ]})
    h = run.session("e2server")
    ejabberd._join(h, "e1server")
    assert h.changes == ["ejabberdctl --no-timeout join_cluster ejabberd@e1server && ejabberdctl stop "
                         "&& ejabberdctl stopped && systemctl start ejabberd"]
    assert h.commands[2] == f"for i in $(seq 90); do {ejabberd.started('e2server')} && exit 0; sleep 1; done; exit 1"


def test_started_is_erl_call_asking_the_node_for_the_ejabberd_application():
    cmd = ejabberd.started("e1server")
    assert cmd.startswith("printf '%s\\n' ") and shlex.split(cmd)[2] == ejabberd.NODE_STATE
    assert "| runuser -u ejabberd -- env HOME=/var/lib/ejabberd erl_call -timeout 10 -sname ejabberd@e1server -e" in cmd
    assert "-c " not in cmd  # the cookie is read from the ejabberd user's home, never given on the command line


def test_erl_binary_writes_bytes_as_numbers_so_nothing_needs_escaping():
    assert ejabberd.erl_binary("") == "<<>>"
    assert ejabberd.erl_binary('a"\\>>') == "<<97,34,92,62,62>>"
    assert ejabberd.erl_binary("é") == "<<195,169>>"


def test_running_waits_for_the_node_and_shows_the_log_when_it_does_not_start(lab):
    run = RecordingRun(lab, answers={"*": [
        (r"^systemctl is-enabled", Result("enabled\n")), (r"^systemctl is-active", Result()),
        (r"^tail -n 20 ", Result("boom: mnesia\n"))]})
    with pytest.raises(Exception, match="ejabberd started as ejabberd@e1server: not after 90 s:\nboom: mnesia"):
        ejabberd._running(run.session("e1server"), False)


# --- admin accounts ----------------------------------------------------------------------------

ADMIN_PW = "gen-admin-pw-0123456789abcdef"
ERL_CALL = r"erl_call -timeout 10 -sname ejabberd@e1server -e$"


def accounts(*states: tuple[bool, bool]):
    """erl_call's answer to the admin check: (registered, password as in the secrets) per admin."""
    word = {True: "true", False: "false"}
    return (ERL_CALL, Result("{ok, [%s]}" % ", ".join(f"{{{word[a]}, {word[b]}}}" for a, b in states)))


def admins_inv(lab, admins):
    return lab.model_copy(update={"xmpp": lab.xmpp.model_copy(update={"admins": admins})})


def test_local_admins_are_the_accounts_of_the_domain(lab):
    inv = admins_inv(lab, ["admin", "Ops@xmpp.lab.test", "admin@xmpp.lab.test", "boss@other.test"])
    assert ejabberd.local_admins(inv) == ["admin", "ops"]
    assert ejabberd.admin_secret("ops") == "ejabberd_admin_ops"


def test_a_missing_admin_is_registered_with_its_generated_password_on_stdin(lab):
    run = RecordingRun(lab, secrets={"ejabberd_admin_admin": ADMIN_PW}, answers={"*": [accounts((False, False))]})
    h = run.session("e1server")
    ejabberd._admins(h, ["admin"])
    assert h.changes == ['ejabberdctl register admin xmpp.lab.test "$(cat)"']
    assert h.stdins[1] == (h.changes[0], ADMIN_PW)
    assert not any(ADMIN_PW in c for c in h.commands)
    assert ADMIN_PW not in run.output and ADMIN_PW not in run.report.log_path.read_text()
    assert h.reported("changed") == [f"registered admin admin@xmpp.lab.test (password: ejabberd_admin_admin in "
                                     f"{run.secrets.path})"]


def test_the_admin_check_is_one_erl_call_with_the_passwords_on_stdin_as_numbers(lab):
    run = RecordingRun(lab, secrets={"ejabberd_admin_admin": ADMIN_PW, "ejabberd_admin_ops": 'p"w\\>>'},
                       answers={"*": [accounts((True, True), (True, True))]})
    h = run.session("e1server")
    ejabberd._admins(h, ["admin", "ops"])
    assert h.commands == [ejabberd.erl_call("e1server")] and h.changes == []
    expr = h.stdins[0][1]
    assert ADMIN_PW not in expr and ejabberd.erl_binary(ADMIN_PW) in expr and ejabberd.erl_binary('p"w\\>>') in expr
    assert "ejabberd_auth:user_exists(U, S)" in expr and "ejabberd_auth:check_password(U, <<>>, S, P)" in expr
    assert expr.startswith(f"S = {ejabberd.erl_binary('xmpp.lab.test')}, ") and expr.endswith("].\n")


def test_a_new_admin_password_is_generated_into_the_secrets_file(lab, tmp_path):
    """The first deploy generates the password (letters and digits) and writes it
    to the secrets file (0600); the next run reuses it."""
    from fabfile.core.secrets import Secrets

    path = tmp_path / "site.secrets.yml"
    run = RecordingRun(lab, secrets=Secrets(path), answers={"*": [accounts((False, False))]})
    ejabberd._admins(run.session("e1server"), ["admin"])
    stored = yaml.safe_load(path.read_text())["ejabberd_admin_admin"]
    assert len(stored) >= 16 and stored.isalnum() and oct(path.stat().st_mode & 0o777) == "0o600"
    assert run.session("e1server").stdins[1][1] == stored
    again = RecordingRun(lab, secrets=Secrets(path), answers={"*": [accounts((False, False))]})
    ejabberd._admins(again.session("e1server"), ["admin"])
    assert again.session("e1server").stdins[1][1] == stored


def test_an_existing_admin_with_its_password_changes_nothing(lab):
    run = RecordingRun(lab, secrets={"ejabberd_admin_admin": ADMIN_PW}, answers={"*": [accounts((True, True))]})
    h = run.session("e1server")
    ejabberd._admins(h, ["admin"])
    assert h.changes == []
    assert h.reported("ok") == ["admin admin@xmpp.lab.test registered, password as in ejabberd_admin_admin"]


def test_an_admin_whose_password_was_changed_is_reported_not_overwritten(lab):
    run = RecordingRun(lab, secrets={"ejabberd_admin_admin": ADMIN_PW}, answers={"*": [accounts((True, False))]})
    h = run.session("e1server")
    ejabberd._admins(h, ["admin"])
    assert h.changes == []
    assert not any("change_password" in c or "register " in c for c in h.commands)
    assert h.reported("changed") == [] and h.reported("failed") == []
    assert "is not the one in ejabberd_admin_admin: left as it is" in h.reported("ok")[0]
    assert "ejabberd.change-password admin@xmpp.lab.test --password-file" in run.output
    assert ADMIN_PW not in run.output


@pytest.mark.parametrize("answer", [Result(exited=1), Result('{error, "*** syntax error"}'),
                                    Result("{ok, {badrpc, nodedown}}"), Result("{ok, [{true, true}]}")])
def test_a_failing_erl_call_is_not_taken_for_a_missing_admin(lab, answer):
    # the last one answers for one admin of two
    run = RecordingRun(lab, secrets={"ejabberd_admin_admin": ADMIN_PW}, answers={"*": [(ERL_CALL, answer)]})
    with pytest.raises(HostFailed, match=r"reading the admin accounts in ejabberd@e1server \(erl_call\) failed"):
        ejabberd._admins(run.session("e1server"), ["admin", "ops"])
    assert run.session("e1server").changes == []


def test_admins_in_check_mode_on_a_fresh_site_say_what_would_be_registered(lab):
    run = RecordingRun(lab, check=True, answers={"*": [(r"erl_call", Result(stderr="not found", exited=127))]})
    h = run.session("e1server")
    ejabberd._admins(h, ["admin", "ops"])
    assert h.changes == [] and len(h.stdins) == 1  # the check's expression only
    assert h.reported("would change") == [
        f"would run: registered admin {u}@xmpp.lab.test (password: ejabberd_admin_{u} in {run.secrets.path})"
        for u in ("admin", "ops")]


def test_admin_names_with_metacharacters_are_quoted(lab):
    # the inventory allows [a-z0-9._-] only; quoting does not depend on it
    run = RecordingRun(lab, secrets={"ejabberd_admin_x;id": ADMIN_PW}, answers={"*": [accounts((False, False))]})
    h = run.session("e1server")
    ejabberd._admins(h, ["x;id"])
    assert shlex.split(h.changes[0])[:4] == ["ejabberdctl", "register", "x;id", "xmpp.lab.test"]
    assert ejabberd.erl_binary("x;id") in h.stdins[0][1] and "x;id" not in h.stdins[0][1]


ADMIN_STEP = "ejabberd: admin accounts (xmpp.admins)"


def _converge_steps(run):
    steps = []
    run.step = lambda title, hosts, action: steps.append((title, list(hosts)))
    ejabberd.converge(run)
    return dict(steps)


def test_converge_registers_admins_once_on_one_node(lab):
    run = RecordingRun(lab)
    steps = _converge_steps(run)
    assert steps[ADMIN_STEP] == ["e1server"]
    assert "ejabberd_admin_admin" in run.secrets  # generated before the steps
    only_second = RecordingRun(lab, only="e2server")
    assert _converge_steps(only_second)[ADMIN_STEP] == ["e2server"]
    none = RecordingRun(admins_inv(lab, ["boss@other.test"]))
    assert ADMIN_STEP not in _converge_steps(none)


def test_admin_password_says_where_the_password_is_not_what_it_is(lab, capsys):
    run = RecordingRun(lab, secrets={"ejabberd_admin_admin": ADMIN_PW})
    for name in ("admin", "Admin@xmpp.lab.test"):
        ejabberd.admin_password.body.runbook(run, name)
        out = capsys.readouterr().out
        assert f"admin@xmpp.lab.test: the password is in {run.secrets.path}, key ejabberd_admin_admin" in out
        assert shlex.split(out.splitlines()[1].split(": ", 1)[1]) == ["grep", "^ejabberd_admin_admin:",
                                                                      str(run.secrets.path)]
        assert ADMIN_PW not in out and ADMIN_PW not in run.output
    assert run.connected == [] and run.all_commands() == []
    assert ADMIN_PW not in run.report.log_path.read_text()


@pytest.mark.parametrize("name, error", [
    ("bob", "'bob' is not an admin of this site (xmpp.admins: admin@xmpp.lab.test); nothing was read or changed"),
    ("admin@other.test", "is not an admin of this site"),
    ("", "'' is not an admin of this site"),
    ("admin\n", "is not an admin of this site"),
    ("admin;id", "is not an admin of this site"),
])
def test_admin_password_refuses_a_name_that_is_not_an_admin(lab, name, error, capsys):
    run = RecordingRun(lab, secrets={"ejabberd_admin_admin": ADMIN_PW})
    with pytest.raises(UserError) as exc:
        ejabberd.admin_password.body.runbook(run, name)
    assert error in str(exc.value)
    assert capsys.readouterr().out == "" and run.connected == []
    assert list(run.secrets._values) == ["ejabberd_admin_admin"]  # nothing generated


def test_admin_password_of_an_admin_from_another_server_or_not_generated_yet(lab, capsys):
    inv = admins_inv(lab, ["admin", "boss@other.test"])
    run = RecordingRun(inv)
    with pytest.raises(UserError, match="boss@other.test is an admin from another server"):
        ejabberd.admin_password.body.runbook(run, "boss@other.test")
    with pytest.raises(UserError, match="no password generated yet .ejabberd_admin_admin is not in .*"
                                        "`inv ejabberd.deploy` generates it"):
        ejabberd.admin_password.body.runbook(run, "admin")
    assert "ejabberd_admin_admin" not in run.secrets  # a read-only task generates nothing
    assert capsys.readouterr().out == ""


def test_admin_password_task_on_the_command_line(tmp_path):
    """`inv ejabberd.admin-password`: a name that is not an admin is refused with
    one line and exit 1, no SSH, no secrets file written; an admin's answer names
    the file and key, not the password."""
    inv = tmp_path / "site.yml"
    inv.write_text(LAB.read_text())
    env = {"INVOKE_INVENTORY": str(inv), "PATH": "/usr/bin:/bin", "HOME": str(tmp_path)}

    def inv_run(*args):
        return subprocess.run([str(ROOT / ".venv/bin/inv"), "ejabberd.admin-password", *args], cwd=ROOT,
                              capture_output=True, text=True, timeout=60, stdin=subprocess.DEVNULL, env=env)

    out = inv_run("mallory")
    assert out.returncode == 1 and "'mallory' is not an admin of this site" in out.stdout + out.stderr
    assert "Traceback" not in out.stdout + out.stderr
    assert not (tmp_path / "site.secrets.yml").exists()
    secrets = tmp_path / "site.secrets.yml"
    secrets.write_text(f"ejabberd_admin_admin: {ADMIN_PW}\n")
    secrets.chmod(0o600)
    out = inv_run("admin")
    assert out.returncode == 0, out.stdout + out.stderr
    assert f"admin@xmpp.lab.test: the password is in {secrets}, key ejabberd_admin_admin" in out.stdout
    assert ADMIN_PW not in out.stdout + out.stderr
    assert secrets.read_text() == f"ejabberd_admin_admin: {ADMIN_PW}\n"
