"""PostgreSQL tier without hosts: pg_hba and settings for every shipped inventory,
SCRAM verifiers, replica selection and the refusal of non-replica hosts."""

from __future__ import annotations

import base64
import hashlib
import hmac
import ipaddress
from pathlib import Path

import pytest

from fabfile import postgres
from fabfile.base import service_address
from fabfile.core import UserError, templates
from fabfile.core.inventory import load

ROOT = Path(__file__).resolve().parents[2]
LAB = ROOT / "inventory/lab.yml"
INVENTORIES = [p for p in sorted((ROOT / "inventory").glob("*.yml")) if not p.name.count(".") > 1]
HBA = "postgres/etc/postgresql/15/main/pg_hba.conf.j2"
CONF = "postgres/etc/postgresql/15/main/conf.d/hastack.conf.j2"


def secret(name):
    return f"secret-of-{name}"


@pytest.fixture(scope="module")
def lab():
    return load(LAB)


def hba_lines(inv, host):
    text = templates.render(HBA, inv, host, secret)
    return [line.split() for line in text.splitlines() if line and not line.startswith("#")]


@pytest.mark.parametrize("inventory", INVENTORIES, ids=lambda p: p.name)
def test_pg_hba_allows_exactly_ejabberd_and_the_other_postgres_hosts(inventory):
    inv = load(inventory)
    if inv.xmpp is None:
        pytest.skip("no XMPP service in this inventory")
    for host in postgres.postgres_hosts(inv):
        lines = hba_lines(inv, host)
        network = [fields for fields in lines if fields[0] in ("host", "hostssl")]
        assert all(fields[-1] == "scram-sha-256" for fields in network), lines
        assert not any("trust" in fields or "md5" in fields or "password" in fields for fields in lines)
        remote = {(f[1], f[2], f[3]) for f in network if f[3] not in ("127.0.0.1/32", "::1/128")}
        want = {(postgres.DB, postgres.DB_USER, f"{service_address(inv, n)}/32") for n in inv.with_role("ejabberd")}
        want |= {("replication", postgres.REPL_USER, f"{service_address(inv, n)}/32")
                 for n in postgres.postgres_hosts(inv) if n != host}
        assert remote == want
        for _, _, address in remote:
            assert ipaddress.ip_network(address).prefixlen == 32


def test_loopback_lines_are_scram_and_local_is_peer(lab):
    lines = hba_lines(lab, "psql1server")
    assert ["local", "all", "postgres", "peer"] in lines
    assert ["host", "all", "all", "127.0.0.1/32", "scram-sha-256"] in lines


def test_listen_addresses_are_localhost_and_the_own_address_only(lab):
    text = templates.render(CONF, lab, "psql1server", secret)
    assert "listen_addresses = 'localhost,10.200.1.10'" in text
    assert "'*'" not in text.replace("never '*'", "") and "0.0.0.0" not in text
    assert "wal_level = replica" in text and "archive_command" in text


def test_pgpass_holds_the_replication_password_and_no_other():
    inv = load(LAB)
    text = templates.render("postgres/var/lib/postgresql/.pgpass.j2", inv, "psql2server", secret)
    entries = [line for line in text.splitlines() if line and not line.startswith("#")]
    assert entries == [f"*:5432:replication:replicator:secret-of-{postgres.SECRET_REPL}"]


def test_no_password_in_the_templates():
    for name in templates.template_names():
        if name.startswith(("postgres/", "ejabberd/", "keepalived/")):
            source = (templates.CONFIGS / name).read_text().lower()
            assert "p@ssw0rd" not in source and "password '" not in source, name


# --- SCRAM -----------------------------------------------------------------------------------


def test_scram_verifier_matches_rfc_7677_construction():
    salt = b"0123456789abcdef"
    v = postgres.scram_verifier("pencil", salt=salt, iterations=4096)
    head, keys = v.split("$", 1)[1].split("$")
    iterations, b64salt = head.split(":")
    assert iterations == "4096" and base64.b64decode(b64salt) == salt
    salted = hashlib.pbkdf2_hmac("sha256", b"pencil", salt, 4096)
    stored = hashlib.sha256(hmac.new(salted, b"Client Key", "sha256").digest()).digest()
    assert keys.split(":")[0] == base64.b64encode(stored).decode()


def test_scram_matches_its_own_verifier_and_not_another_password():
    v = postgres.scram_verifier("correct horse")
    assert postgres.scram_matches(v, "correct horse")
    assert not postgres.scram_matches(v, "battery staple")
    assert postgres.scram_verifier("x") != postgres.scram_verifier("x")  # fresh salt each time


@pytest.mark.parametrize("stored", [None, "", "md5abcdef", "SCRAM-SHA-256$4096:!!$a:b", "garbage"])
def test_scram_matches_is_false_for_other_formats(stored):
    assert not postgres.scram_matches(stored, "pw")


def test_empty_password_has_no_verifier():
    with pytest.raises(UserError):
        postgres.scram_verifier("")


def test_sql_literal_doubles_quotes():
    assert postgres.sql_literal("it's") == "'it''s'"


# --- hosts -----------------------------------------------------------------------------------


def test_primary_and_replicas_of_the_lab(lab):
    assert postgres.primary(lab) == "psql1server"
    assert postgres.replicas(lab) == ["psql2server"]
    assert postgres.slot_name("psql2server") == "replica_psql2server"
    assert postgres.slot_name("db-2.x") == "replica_db_2_x"


def test_replica_task_refuses_a_host_outside_the_replica_role(lab):
    assert postgres.require_replica(lab, "psql2server") == "psql2server"
    with pytest.raises(UserError, match="e1server has ejabberd, not role postgres_replica"):
        postgres.require_replica(lab, "e1server")
    with pytest.raises(UserError, match="psql1server has postgres_primary, not role postgres_replica"):
        postgres.require_replica(lab, "psql1server")
    with pytest.raises(UserError, match="'nosuchhost' is not a host of the inventory"):
        postgres.require_replica(lab, "nosuchhost")


def test_hba_rows_for_a_host_outside_the_xmpp_service_still_render(lab):
    # every template renders for every host (tests/unit/test_templates.py); a mail
    # host gets the ejabberd rows too, which is harmless: it never receives the file
    assert postgres.hba_entries(lab, "pxc1")
