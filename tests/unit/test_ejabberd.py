"""ejabberd tier without hosts: ejabberd.yml and ejabberdctl.cfg for every shipped
inventory, the config check, JID and password validation, list_cluster parsing."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
import yaml

from fabfile import ejabberd, pki, postgres
from fabfile.base import service_address
from fabfile.core import UserError, templates
from fabfile.core.inventory import load

ROOT = Path(__file__).resolve().parents[2]
LAB = ROOT / "inventory/lab.yml"
INVENTORIES = [p for p in sorted((ROOT / "inventory").glob("*.yml")) if not p.name.count(".") > 1]


def secret(name):
    return f"secret-of-{name}"


@pytest.fixture(scope="module")
def lab():
    return load(LAB)


@pytest.mark.parametrize("inventory", INVENTORIES, ids=lambda p: p.name)
def test_config_renders_and_checks_for_every_ejabberd_host(inventory):
    inv = load(inventory)
    if inv.xmpp is None:
        pytest.skip("no XMPP service in this inventory")
    prim = postgres.primary(inv)
    for host in ejabberd.nodes(inv):
        data = yaml.safe_load(ejabberd.render_config(inv, host, secret))
        assert data["hosts"] == [inv.xmpp.domain]
        assert data["auth_method"] == ["sql"] and data["default_db"] == "sql" and data["sql_type"] == "pgsql"
        assert data["sql_server"] == service_address(inv, prim)
        assert data["sql_password"] == f"secret-of-{postgres.SECRET_DB}"
        assert data["certfiles"] == [pki.cert_path(host), pki.key_path(host)]
        c2s = [lst for lst in data["listen"] if lst["module"] == "ejabberd_c2s"]
        assert any(lst["port"] == 5222 and lst["starttls_required"] is True for lst in c2s)
        assert data["acl"]["admin"]["user"] == [a if "@" in a else f"{a}@{inv.xmpp.domain}"
                                                for a in inv.xmpp.admins]


def test_ejabberdctl_cfg_sets_the_node_name_and_port_window(lab, tmp_path):
    text = templates.render("ejabberd/etc/default/ejabberd.j2", lab, "e2server", secret)
    assert "ERLANG_NODE=ejabberd@e2server\n" in text
    assert "FIREWALL_WINDOW=4200-4210\n" in text
    assert "INET_DIST_INTERFACE=10.200.1.3\n" in text
    f = tmp_path / "ejabberdctl.cfg"
    f.write_text(text)
    assert subprocess.run(["sh", "-n", str(f)]).returncode == 0


def test_cookie_is_the_shared_secret_alone(lab):
    one = templates.render("ejabberd/var/lib/ejabberd/.erlang.cookie.j2", lab, "e1server", secret)
    two = templates.render("ejabberd/var/lib/ejabberd/.erlang.cookie.j2", lab, "e2server", secret)
    assert one == two == f"secret-of-{ejabberd.SECRET_COOKIE}\n"


def test_admins_empty_renders_an_empty_list(lab):
    inv = lab.model_copy(update={"xmpp": lab.xmpp.model_copy(update={"admins": []})})
    data = yaml.safe_load(ejabberd.render_config(inv, "e1server", secret))
    assert data["acl"]["admin"]["user"] == []


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
    data = yaml.safe_load(ejabberd.render_config(lab, "e1server", secret))
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
])
def test_parse_jid_accepts(lab, user, want):
    assert ejabberd.parse_jid(lab, user) == want


@pytest.mark.parametrize("user, error", [
    ("", "empty user name"),
    ("alice@example.org", "domain 'example.org' is not served here"),
    ("al ice", "not a valid JID"),
    ("a<b", "not a valid JID"),
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


def test_register_user_refuses_bad_input_before_any_connection(tmp_path):
    """`inv ejabberd.register-user` with a foreign domain: one clear line, exit 1,
    and no SSH (the inventory's key does not even exist here)."""
    inv = tmp_path / "site.yml"
    inv.write_text(LAB.read_text())
    for args, error in [(["bob@example.org", "pw"], "domain 'example.org' is not served here"),
                        (["bad user", "pw"], "not a valid JID"),
                        (["carol", ""], "empty password refused")]:
        out = subprocess.run([str(ROOT / ".venv/bin/inv"), "ejabberd.register-user", *args],
                             cwd=ROOT, capture_output=True, text=True, timeout=60,
                             env={"INVOKE_INVENTORY": str(inv), "PATH": "/usr/bin:/bin", "HOME": str(tmp_path)})
        assert out.returncode == 1, out.stdout + out.stderr
        assert error in out.stdout + out.stderr
        assert "Traceback" not in out.stdout + out.stderr
