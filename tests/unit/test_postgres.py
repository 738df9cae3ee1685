"""PostgreSQL tier without hosts: pg_hba and settings for every shipped inventory,
SCRAM verifiers, the refusal of non-replica hosts; and the runbook's steps on the
recording host: facts in, commands out (a fresh host, an already converged one)."""

from __future__ import annotations

import base64
import hashlib
import hmac
import ipaddress
import shlex
from pathlib import Path

import pytest

from fabfile import postgres
from fabfile.core import Result, UserError, templates, topology
from fabfile.core.inventory import load
from fabfile.core.sql import PSQL, psql_c
from fabfile.core.testing import RecordingRun, files_present
from tests.unit.shipped import INVENTORIES

ROOT = Path(__file__).resolve().parents[2]
LAB = ROOT / "inventory/lab.yml"
HBA = "postgres/etc/postgresql/15/main/pg_hba.conf.j2"
CONF = "postgres/etc/postgresql/15/main/conf.d/hastack.conf.j2"
HOOK = "postgres/usr/local/lib/hastack/pg-wal-archive.j2"
PGPASS = "postgres/var/lib/postgresql/.pgpass.j2"
SECRETS = {postgres.SECRET_DB: "db-pw-of-ejabberd", postgres.SECRET_REPL: "repl-pw"}


def secret(name):
    return SECRETS.get(name, f"secret-of-{name}")


def render(name, inv, host, **extra):
    return templates.render(name, inv, host, secret, **postgres.template_vars(inv, host, secret), **extra)


@pytest.fixture(scope="module")
def lab():
    return load(LAB)


def hba_lines(inv, host):
    return [line.split() for line in render(HBA, inv, host).splitlines() if line and not line.startswith("#")]


@pytest.mark.parametrize("inventory", INVENTORIES, ids=lambda p: p.name)
def test_pg_hba_allows_exactly_ejabberd_and_the_other_postgres_hosts(inventory):
    inv = load(inventory)
    if inv.xmpp is None:
        pytest.skip("no XMPP service in this inventory")
    for host in topology.pg_hosts(inv):
        lines = hba_lines(inv, host)
        network = [fields for fields in lines if fields[0] in ("host", "hostssl")]
        assert all(fields[-1] == "scram-sha-256" for fields in network), lines
        assert not any("trust" in fields or "md5" in fields or "password" in fields for fields in lines)
        remote = {(f[1], f[2], f[3]) for f in network if f[3] not in ("127.0.0.1/32", "::1/128")}
        want = {(postgres.DB, postgres.DB_USER, f"{inv.service_address(n)}/32") for n in inv.with_role("ejabberd")}
        want |= {("replication", postgres.REPL_USER, f"{inv.service_address(n)}/32")
                 for n in topology.pg_hosts(inv) if n != host}
        assert remote == want
        for _, _, address in remote:
            assert ipaddress.ip_network(address).prefixlen == 32


def test_loopback_lines_are_scram_and_local_is_peer(lab):
    lines = hba_lines(lab, "psql1server")
    assert ["local", "all", "postgres", "peer"] in lines
    assert ["host", "all", "all", "127.0.0.1/32", "scram-sha-256"] in lines


def test_listen_addresses_are_localhost_and_the_own_address_only(lab):
    text = render(CONF, lab, "psql1server")
    assert "listen_addresses = 'localhost,10.200.1.10'" in text
    assert "'*'" not in text.replace("never '*'", "") and "0.0.0.0" not in text
    assert "wal_level = replica" in text and "archive_command" in text


def test_pgpass_holds_the_replication_password_and_no_other(lab):
    entries = [line for line in render(PGPASS, lab, "psql2server").splitlines() if line and not line.startswith("#")]
    assert entries == ["*:5432:replication:replicator:repl-pw"]


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


# --- hosts -----------------------------------------------------------------------------------


def test_replica_task_refuses_a_host_outside_the_replica_role(lab):
    assert postgres.require_replica(lab, "psql2server") == "psql2server"
    with pytest.raises(UserError, match="e1server has ejabberd, not role postgres_replica"):
        postgres.require_replica(lab, "e1server")
    with pytest.raises(UserError, match="psql1server has postgres_primary, not role postgres_replica"):
        postgres.require_replica(lab, "psql1server")
    with pytest.raises(UserError, match="'nosuchhost' is not a host of the inventory"):
        postgres.require_replica(lab, "nosuchhost")


def test_replica_task_refuses_before_any_connection(lab):
    run = RecordingRun(lab, secrets=SECRETS)
    with pytest.raises(UserError, match="not role postgres_replica"):
        postgres.replica.body.runbook(run, "e1server")
    assert run.connected == []


def test_hba_rows_for_a_host_outside_the_xmpp_service_still_render(lab):
    # every template renders for every host (tests/unit/test_templates.py); a mail
    # host gets the ejabberd rows too, which is harmless: it never receives the file
    assert postgres.hba_entries(lab, "pxc1")


# --- the runbook on the recording host -------------------------------------------------------


def sql(answers: dict[str, str]):
    """A fact: psql answers these queries (exactly as sent) with these rows."""
    def respond(h, cmd, stdin):
        if cmd.startswith(PSQL) and " -c " in cmd:
            query = shlex.split(cmd)[-1]
            if query in answers:
                return Result(answers[query])
        return None
    return respond


# what put() runs around an upload, and the checkers of the new files: they succeed
FILE_OPS = [(r"^(mkdir -p|chown|mv -f|rm -f|cp -a|sh -n) ", Result()),
            (rf"^runuser -u postgres -- {postgres.BIN}/postgres -C ", Result())]


def configured_files(inv, host):
    files = {
        "/usr/local/lib/hastack": ("root:root:755", None),
        postgres.ARCHIVE_HOOK: ("root:root:755", render(HOOK, inv, host)),
        f"{postgres.ETC}/conf.d": ("postgres:postgres:755", None),
        postgres.CONF_FILE: ("postgres:postgres:644", render(CONF, inv, host)),
        postgres.HBA_FILE: ("postgres:postgres:640", render(HBA, inv, host)),
        postgres.PGPASS: ("postgres:postgres:600", render(PGPASS, inv, host)),
    }
    return files


def test_configure_a_fresh_host_installs_writes_and_starts(lab):
    run = RecordingRun(lab, secrets=SECRETS, answers={"*": FILE_OPS})
    h = run.session("psql1server")
    postgres._configure(h)
    assert set(h.uploads) == {f"{path}.hastack-new" for path, (_, text) in configured_files(lab, "psql1server").items()
                              if text is not None}
    for path, (meta, text) in configured_files(lab, "psql1server").items():
        if text is not None:
            assert h.uploads[f"{path}.hastack-new"] == text
    assert h.changes[0].startswith("DEBIAN_FRONTEND=noninteractive apt-get install")
    assert h.changes[0].endswith(" postgresql postgresql-client)")
    assert h.changes[1:] == [
        "mkdir -p /usr/local/lib/hastack", "chown root:root /usr/local/lib/hastack",
        "chmod 0755 /usr/local/lib/hastack",
        f"mkdir -p {postgres.ETC}/conf.d", f"chown postgres:postgres {postgres.ETC}/conf.d",
        f"chmod 0755 {postgres.ETC}/conf.d",
        f"systemctl enable {postgres.UNIT}", f"systemctl start {postgres.UNIT}",
    ]
    # the server settings are checked by postgres itself before they replace the old file
    assert any(c.startswith(f"runuser -u postgres -- {postgres.BIN}/postgres -C listen_addresses") for c in h.commands)


def test_configure_an_already_converged_host_changes_nothing(lab):
    run = RecordingRun(lab, secrets=SECRETS, answers={"psql1server": [
        (r"^dpkg-query", Result("postgresql installed\npostgresql-client installed\n")),
        files_present(configured_files(lab, "psql1server")),
        (r"^systemctl is-enabled", Result("enabled\n")),
        (r"^systemctl is-active", Result("active\n")),
    ]})
    h = run.session("psql1server")
    postgres._configure(h)
    assert h.changes == [] and h.uploads == {}
    assert h.reported("changed") == []


def test_an_hba_change_is_reloaded_and_checked(lab):
    files = configured_files(lab, "psql1server")
    files[postgres.HBA_FILE] = ("postgres:postgres:640", "old hba\n")
    run = RecordingRun(lab, secrets=SECRETS, answers={"psql1server": [
        (r"^dpkg-query", Result("postgresql installed\npostgresql-client installed\n")),
        files_present(files),
        (r"^systemctl is-enabled", Result("enabled\n")),
        (r"^systemctl is-active", Result("active\n")),
        *FILE_OPS,
    ]})
    h = run.session("psql1server")
    postgres._configure(h)
    assert h.changes == [f"systemctl reload {postgres.UNIT}"]
    assert psql_c("SELECT line_number || ': ' || error FROM pg_hba_file_rules WHERE error IS NOT NULL") in h.commands


def primary_facts(*, roles: dict[str, str], database: bool, slot: bool):
    """The primary's answers: ``roles`` name -> stored verifier; the database and
    the replica's slot present or not."""
    answers = {"SELECT pg_is_in_recovery()": "f\n"}
    for name, attrs in (("ejabberd", "truefalse"), ("replicator", "truetrue")):
        answers[f"SELECT rolpassword FROM pg_authid WHERE rolname = '{name}'"] = roles.get(name, "")
        answers[f"SELECT count(*) FROM pg_roles WHERE rolname = '{name}'"] = "1\n" if name in roles else "0\n"
        answers[f"SELECT rolcanlogin::text || rolreplication::text FROM pg_roles WHERE rolname = '{name}'"] = (
            attrs if name in roles else "")
    answers["SELECT count(*) FROM pg_database WHERE datname = 'ejabberd'"] = "1\n" if database else "0\n"
    answers["SELECT pg_get_userbyid(datdba) FROM pg_database WHERE datname = 'ejabberd'"] = "ejabberd\n"
    answers["SELECT pg_get_userbyid(nspowner) FROM pg_namespace WHERE nspname = 'public'"] = (
        "ejabberd\n" if database else "pg_database_owner\n")
    answers["SELECT count(*) FROM pg_replication_slots WHERE slot_name = 'replica_psql2server'"] = (
        "1\n" if slot else "0\n")
    return sql(answers)


READY = (r"pg_isready -q", Result())


def test_primary_on_a_fresh_cluster_creates_roles_database_and_slot(lab):
    run = RecordingRun(lab, secrets=SECRETS, answers={"*": [READY]},
                       responder=primary_facts(roles={}, database=False, slot=False))
    h = run.session("psql1server")
    postgres._primary(h)
    assert h.changes == [
        f"{PSQL} -d postgres -f -",
        f"{PSQL} -d postgres -f -",
        psql_c("CREATE DATABASE \"ejabberd\" OWNER \"ejabberd\" ENCODING 'UTF8' TEMPLATE template0"),
        psql_c('ALTER SCHEMA public OWNER TO "ejabberd"', "ejabberd"),
        psql_c("SELECT pg_create_physical_replication_slot('replica_psql2server')"),
    ]
    (_, create_db_user), (_, create_repl) = h.stdins
    assert create_db_user.startswith('CREATE ROLE "ejabberd" WITH LOGIN PASSWORD \'SCRAM-SHA-256$4096:')
    assert create_repl.startswith('CREATE ROLE "replicator" WITH LOGIN REPLICATION PASSWORD \'SCRAM-SHA-256$')
    assert postgres.scram_matches(create_db_user.split("'")[1], "db-pw-of-ejabberd")
    assert postgres.scram_matches(create_repl.split("'")[1], "repl-pw")
    # the clear passwords reach neither a command line nor the server
    everything = "\n".join(h.commands) + "\n".join(s for _, s in h.stdins)
    assert "db-pw-of-ejabberd" not in everything and "repl-pw" not in everything


def test_primary_already_converged_changes_nothing(lab):
    roles = {"ejabberd": postgres.scram_verifier("db-pw-of-ejabberd"),
             "replicator": postgres.scram_verifier("repl-pw")}
    run = RecordingRun(lab, secrets=SECRETS, answers={"*": [READY]},
                       responder=primary_facts(roles=roles, database=True, slot=True))
    h = run.session("psql1server")
    postgres._primary(h)
    assert h.changes == []
    assert h.reported("changed") == []


def test_primary_resets_a_password_that_is_not_the_sites(lab):
    roles = {"ejabberd": postgres.scram_verifier("someone else's"),
             "replicator": postgres.scram_verifier("repl-pw")}
    run = RecordingRun(lab, secrets=SECRETS, answers={"*": [READY]},
                       responder=primary_facts(roles=roles, database=True, slot=True))
    h = run.session("psql1server")
    postgres._primary(h)
    assert h.changes == [f"{PSQL} -d postgres -f -"]
    assert h.stdins[0][1].startswith('ALTER ROLE "ejabberd" WITH LOGIN PASSWORD ')


def test_primary_refuses_a_standby(lab):
    run = RecordingRun(lab, secrets=SECRETS, answers={"*": [READY]},
                       responder=sql({"SELECT pg_is_in_recovery()": "t\n"}))
    with pytest.raises(Exception, match="is a standby"):
        postgres._primary(run.session("psql1server"))
    assert run.session("psql1server").changes == []


def test_a_streaming_standby_is_left_alone(lab):
    run = RecordingRun(lab, secrets=SECRETS, answers={"*": [READY]}, responder=sql({
        "SELECT pg_is_in_recovery()": "t\n",
        "SELECT status || ' from ' || sender_host FROM pg_stat_wal_receiver": "streaming from 10.200.1.10\n",
    }))
    h = run.session("psql2server")
    postgres._replica(h)
    assert h.changes == []


def test_a_fresh_replica_is_replaced_by_a_base_backup_over_its_slot(lab):
    run = RecordingRun(lab, secrets=SECRETS, answers={"*": [READY, (r"grep -qx streaming", Result())]},
                       responder=sql({"SELECT pg_is_in_recovery()": "f\n",
                                      "SELECT datname FROM pg_database": "postgres\ntemplate0\ntemplate1\n"}))
    h = run.session("psql2server")
    postgres._replica(h)
    assert len(h.changes) == 1
    words = shlex.split(h.changes[0])
    assert words[:3] == ["systemctl", "stop", postgres.UNIT]
    assert ["-h", "10.200.1.10", "-U", "replicator", "-D", postgres.DATA, "-R", "-S", "replica_psql2server"] == \
        words[words.index("-h"):words.index("-S") + 2]


def test_a_replica_with_databases_of_its_own_is_refused(lab):
    run = RecordingRun(lab, secrets=SECRETS, answers={"*": [READY]},
                       responder=sql({"SELECT pg_is_in_recovery()": "f\n",
                                      "SELECT datname FROM pg_database": "postgres\nejabberd\ntemplate0\n"}))
    with pytest.raises(Exception, match="databases of its own"):
        postgres._replica(run.session("psql2server"))
    assert run.session("psql2server").changes == []
