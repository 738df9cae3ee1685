"""PostgreSQL tier without hosts: pg_hba and settings for every shipped inventory,
SCRAM verifiers, the refusal of non-replica hosts; and the runbook's steps on the
recording host: facts in, commands out (a fresh host, an already converged one, a
changed setting reloaded and restarted only when pending_restart says so, the
start guard and the sync guard, the rewind role and its grants, the base backup)."""

from __future__ import annotations

import base64
import hashlib
import hmac
import ipaddress
import json
import shlex
from pathlib import Path

import pytest

from fabfile import postgres
from fabfile.core import Result, UserError, templates, topology
from fabfile.core.errors import HostFailed
from fabfile.core.inventory import load, parse
from fabfile.core.sql import PSQL, ROLES_QUERY, psql_c, scram_matches, scram_verifier
from fabfile.core.testing import RecordingRun, files_present
from tests.unit.shipped import INVENTORIES

ROOT = Path(__file__).resolve().parents[2]
LAB = ROOT / "inventory/lab.yml"
HBA = "postgres/etc/postgresql/15/main/pg_hba.conf.j2"
CONF = "postgres/etc/postgresql/15/main/conf.d/hastack.conf.j2"
HOOK = "postgres/usr/local/lib/hastack/pg-wal-archive.j2"
PGPASS = "postgres/var/lib/postgresql/.pgpass.j2"
SECRETS = {postgres.SECRET_DB: "db-pw-of-ejabberd", postgres.SECRET_REPL: "repl-pw",
           postgres.SECRET_REWIND: "rewind-pw"}


def secret(name):
    return SECRETS.get(name, f"secret-of-{name}")


def render(name, inv, host, **extra):
    return templates.render(name, inv, host, secret, **postgres.template_vars(inv, host, secret), **extra)


@pytest.fixture(scope="module")
def lab():
    # the lab's own roles (psql1server primary), not those of a roles file a lab
    # rescue may have written beside it (inventory/lab.roles.yml)
    return parse(LAB.read_text(), LAB)


def hba_lines(inv, host):
    return [line.split() for line in render(HBA, inv, host).splitlines() if line and not line.startswith("#")]


# not a roles file a rescue task wrote beside an inventory (inventory/<site>.roles.yml): no inventory itself
@pytest.mark.parametrize("inventory", [p for p in INVENTORIES if not p.name.endswith(".roles.yml")],
                         ids=lambda p: p.name)
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
        # each peer by the address it connects from (a shared network, else across the gateway)
        want = {(postgres.DB, postgres.DB_USER, a)
                for n in inv.with_role("ejabberd") for a in inv.peer_addresses(n, host)}
        others = [n for n in topology.pg_hosts(inv) if n != host]
        want |= {("replication", postgres.REPL_USER, a) for n in others for a in inv.peer_addresses(n, host)}
        # pg_rewind of a former primary (postgres.rejoin) logs in as the rewind role to database postgres
        want |= {("postgres", postgres.REWIND_USER, a) for n in others for a in inv.peer_addresses(n, host)}
        assert remote == want
        for _, _, address in remote:
            assert ipaddress.ip_network(address).prefixlen == 32


def network_rows(inv, host):
    return {(f[1], f[2], f[3]) for f in hba_lines(inv, host)
            if f[0] in ("host", "hostssl") and f[3] not in ("127.0.0.1/32", "::1/128")}


def test_pg_hba_of_the_lab_primary(lab):
    assert network_rows(lab, "psql1server") == {
        ("ejabberd", "ejabberd", "10.200.1.2/32"), ("ejabberd", "ejabberd", "10.200.1.3/32"),
        ("replication", "replicator", "10.200.1.11/32"), ("postgres", "rewind", "10.200.1.11/32")}


def test_pg_hba_admits_a_spare_that_replaced_an_ejabberd_node_by_its_internal_address():
    # r1server (DMZ 10.200.1.5, internal 10.200.1.14) in e2server's place reaches
    # PostgreSQL over the internal network they share; e2server is let in no more
    inv = parse(LAB.read_text(), LAB, roles={"r1server": ["ejabberd"]}, retired=["e2server"])
    assert {row for row in network_rows(inv, "psql1server") if row[0] == "ejabberd"} == {
        ("ejabberd", "ejabberd", "10.200.1.2/32"), ("ejabberd", "ejabberd", "10.200.1.14/32")}


def test_loopback_lines_are_scram_and_local_is_peer(lab):
    lines = hba_lines(lab, "psql1server")
    assert ["local", "all", "postgres", "peer"] in lines
    assert ["host", "all", "all", "127.0.0.1/32", "scram-sha-256"] in lines


def test_listen_addresses_are_localhost_and_the_own_address_only(lab):
    text = render(CONF, lab, "psql1server")
    assert "listen_addresses = 'localhost,10.200.1.10'" in text
    assert "'*'" not in text.replace("never '*'", "") and "0.0.0.0" not in text
    assert "wal_level = replica" in text and "archive_command" in text


def test_pgpass_holds_the_replication_and_rewind_passwords_and_no_other(lab):
    entries = [line for line in render(PGPASS, lab, "psql2server").splitlines() if line and not line.startswith("#")]
    assert entries == ["*:5432:replication:replicator:repl-pw",
                       "*:5432:postgres:rewind:rewind-pw"]


def test_no_password_in_the_templates():
    for name in templates.template_names():
        if name.startswith(("postgres/", "ejabberd/", "keepalived/")):
            source = (templates.CONFIGS / name).read_text().lower()
            assert "p@ssw0rd" not in source and "password '" not in source, name


# --- SCRAM -----------------------------------------------------------------------------------


def test_scram_verifier_matches_rfc_7677_construction():
    salt = b"0123456789abcdef"
    v = scram_verifier("pencil", salt=salt, iterations=4096)
    head, keys = v.split("$", 1)[1].split("$")
    iterations, b64salt = head.split(":")
    assert iterations == "4096" and base64.b64decode(b64salt) == salt
    salted = hashlib.pbkdf2_hmac("sha256", b"pencil", salt, 4096)
    stored = hashlib.sha256(hmac.new(salted, b"Client Key", "sha256").digest()).digest()
    assert keys.split(":")[0] == base64.b64encode(stored).decode()


def test_scram_matches_its_own_verifier_and_not_another_password():
    v = scram_verifier("correct horse")
    assert scram_matches(v, "correct horse")
    assert not scram_matches(v, "battery staple")
    assert scram_verifier("x") != scram_verifier("x")  # fresh salt each time


@pytest.mark.parametrize("stored", [None, "", "md5abcdef", "SCRAM-SHA-256$4096:!!$a:b", "garbage"])
def test_scram_matches_is_false_for_other_formats(stored):
    assert not scram_matches(stored, "pw")


def test_empty_password_has_no_verifier():
    with pytest.raises(UserError):
        scram_verifier("")


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


# The queries the tier asks, spelled out here (not taken from the code under test).
PENDING = "SELECT string_agg(name, ', ' ORDER BY name) FROM pg_settings WHERE pending_restart"
HBA_ERRORS = "SELECT line_number || ': ' || error FROM pg_hba_file_rules WHERE error IS NOT NULL"
REWIND_GRANTS = ("SELECT string_agg(has_function_privilege('rewind', f, 'EXECUTE')::text, ',') FROM unnest(ARRAY["
                 "'pg_catalog.pg_ls_dir(text, boolean, boolean)', 'pg_catalog.pg_stat_file(text, boolean)', "
                 "'pg_catalog.pg_read_binary_file(text)', "
                 "'pg_catalog.pg_read_binary_file(text, bigint, bigint, boolean)']) AS f")
OUR_SLOTS = "SELECT slot_name || ' ' || active::text FROM pg_replication_slots WHERE slot_name LIKE 'replica\\_%'"
GRANT_SCRIPT = ('GRANT EXECUTE ON FUNCTION pg_catalog.pg_ls_dir(text, boolean, boolean) TO "rewind";\n'
                'GRANT EXECUTE ON FUNCTION pg_catalog.pg_stat_file(text, boolean) TO "rewind";\n'
                'GRANT EXECUTE ON FUNCTION pg_catalog.pg_read_binary_file(text) TO "rewind";\n'
                'GRANT EXECUTE ON FUNCTION pg_catalog.pg_read_binary_file(text, bigint, bigint, boolean) '
                'TO "rewind";\n')

UNIT = "postgresql@15-main"
SYNC_UNIT = "hastack-pg-syncguard"
START_GUARD = "/usr/local/lib/hastack/pg-start-guard"
SYNC_GUARD = "/usr/local/lib/hastack/pg-syncguard"
DROPIN_DIR = f"/etc/systemd/system/{UNIT}.service.d"
DROPIN = f"{DROPIN_DIR}/hastack-start-guard.conf"
SYNC_SERVICE = f"/etc/systemd/system/{SYNC_UNIT}.service"
SCRIPTS = [START_GUARD, SYNC_GUARD]  # each checked by `sh -n` before it is put in place (the lab: no nfs hook)

# what put() runs around an upload, and the checkers of the new files: they succeed
FILE_OPS = [(r"^(mkdir -p|chown|mv -f|rm -f|cp -a|sh -n) ", Result()),
            (rf"^runuser -u postgres -- {postgres.BIN}/postgres -C ", Result())]
READY = (r"pg_isready -q", Result())
CONVERGED = [(r"^dpkg-query", Result("postgresql installed\npostgresql-client installed\n")),
             (r"^systemctl is-enabled", Result("enabled\n")),
             (r"^systemctl is-active", Result("active\n"))]


def without_sync(inv):
    return inv.model_copy(update={"postgres": inv.postgres.model_copy(update={"synchronous": False})})


def configured_files(inv, host):
    """Every file and directory of a converged host: path -> (owner:group:mode, text or None)."""
    files = {
        "/usr/local/lib/hastack": ("root:root:755", None),
        START_GUARD: ("root:root:755", render(f"postgres{START_GUARD}.j2", inv, host)),
        DROPIN_DIR: ("root:root:755", None),
        DROPIN: ("root:root:644", render(f"postgres{DROPIN}.j2", inv, host)),
        f"{postgres.ETC}/conf.d": ("postgres:postgres:755", None),
        postgres.CONF_FILE: ("postgres:postgres:644", render(CONF, inv, host)),
        postgres.HBA_FILE: ("postgres:postgres:640", render(HBA, inv, host)),
        postgres.PGPASS: ("postgres:postgres:600", render(PGPASS, inv, host)),
    }
    if inv.postgres.synchronous:
        files[SYNC_GUARD] = ("root:root:755", render(f"postgres{SYNC_GUARD}.j2", inv, host))
        files[SYNC_SERVICE] = ("root:root:644", render(f"postgres{SYNC_SERVICE}.j2", inv, host))
    return files


def converged_run(inv, files, pending="", hba_errors="", check=False):
    """A recording run on a host that already runs PostgreSQL (and the sync guard)
    with ``files``; psql says which settings wait for a restart and what pg_hba rejects."""
    return RecordingRun(inv, secrets=SECRETS, check=check,
                        answers={"psql1server": [files_present(files), *CONVERGED, *FILE_OPS, READY]},
                        responder=sql({PENDING: pending, HBA_ERRORS: hba_errors}))


def test_configure_a_fresh_host_installs_writes_and_starts(lab):
    assert lab.postgres.synchronous  # the lab runs synchronous replication: the sync guard too
    run = RecordingRun(lab, secrets=SECRETS, answers={"*": [*FILE_OPS, READY]},
                       responder=sql({PENDING: "", HBA_ERRORS: ""}))
    h = run.session("psql1server")
    postgres._configure(h)
    files = configured_files(lab, "psql1server")
    assert SYNC_GUARD in files and SYNC_SERVICE in files
    assert set(h.uploads) == {f"{path}.hastack-new" for path, (_, text) in files.items() if text is not None}
    for path, (meta, text) in files.items():
        if text is not None:
            assert h.uploads[f"{path}.hastack-new"] == text
    assert h.changes[0].startswith("DEBIAN_FRONTEND=noninteractive apt-get install")
    assert h.changes[0].endswith(" postgresql postgresql-client)")
    assert h.changes[1:] == [
        "mkdir -p /usr/local/lib/hastack", "chown root:root /usr/local/lib/hastack",
        "chmod 0755 /usr/local/lib/hastack",
        f"mkdir -p {DROPIN_DIR}", f"chown root:root {DROPIN_DIR}", f"chmod 0755 {DROPIN_DIR}",
        "systemctl daemon-reload",
        f"mkdir -p {postgres.ETC}/conf.d", f"chown postgres:postgres {postgres.ETC}/conf.d",
        f"chmod 0755 {postgres.ETC}/conf.d",
        f"systemctl enable {UNIT}", f"systemctl start {UNIT}",
        f"systemctl enable {SYNC_UNIT}", f"systemctl start {SYNC_UNIT}",
    ]
    c = h.commands
    # every script is checked by `sh -n` before it replaces anything
    for script in SCRIPTS:
        assert c.index(f"sh -n {script}.hastack-new") < c.index(f"mv -f {script}.hastack-new {script}")
    # the server settings are checked by postgres itself
    assert any(cmd.startswith(f"runuser -u postgres -- {postgres.BIN}/postgres -C listen_addresses") for cmd in c)
    # systemd reads the start guard drop-in and the sync guard unit before either unit starts
    assert c.index(f"mv -f {DROPIN}.hastack-new {DROPIN}") < c.index("systemctl daemon-reload")
    assert c.index(f"mv -f {SYNC_SERVICE}.hastack-new {SYNC_SERVICE}") < c.index("systemctl daemon-reload")
    assert c.index("systemctl daemon-reload") < c.index(f"systemctl start {UNIT}")
    # once up, the server is asked which settings wait for a restart (none: it started with them)
    assert c.index(f"systemctl start {UNIT}") < c.index(psql_c(PENDING))
    assert psql_c(HBA_ERRORS) in c


def test_configure_an_already_converged_host_changes_nothing(lab):
    run = converged_run(lab, configured_files(lab, "psql1server"))
    h = run.session("psql1server")
    postgres._configure(h)
    assert h.changes == [] and h.uploads == {}
    assert h.reported("changed") == []
    assert psql_c(PENDING) not in h.commands and psql_c(HBA_ERRORS) not in h.commands
    assert f"service {UNIT} running" in h.reported("ok") and f"service {SYNC_UNIT} running" in h.reported("ok")


def test_an_hba_change_is_reloaded_and_checked(lab):
    files = configured_files(lab, "psql1server")
    files[postgres.HBA_FILE] = ("postgres:postgres:640", "old hba\n")
    run = converged_run(lab, files)
    h = run.session("psql1server")
    postgres._configure(h)
    assert h.changes == [f"systemctl reload {UNIT}"]
    assert h.commands.index(f"systemctl reload {UNIT}") < h.commands.index(psql_c(HBA_ERRORS))
    assert psql_c(PENDING) not in h.commands  # no setting changed: nothing can wait for a restart


def test_an_hba_file_postgres_rejects_fails_the_host(lab):
    files = configured_files(lab, "psql1server")
    files[postgres.HBA_FILE] = ("postgres:postgres:640", "old hba\n")
    run = converged_run(lab, files, hba_errors="7: invalid authentication method \"nope\"\n")
    with pytest.raises(HostFailed, match="pg_hba.conf: rejected by PostgreSQL: 7: invalid authentication method"):
        postgres._configure(run.session("psql1server"))


def test_a_changed_setting_that_needs_no_restart_is_only_reloaded(lab):
    files = configured_files(lab, "psql1server")
    files[postgres.CONF_FILE] = ("postgres:postgres:644", "hot_standby_feedback = off\n")
    run = converged_run(lab, files, pending="")
    h = run.session("psql1server")
    postgres._configure(h)
    assert h.changes == [f"systemctl reload {UNIT}"]
    assert not any("restart" in cmd for cmd in h.changes)
    # the question is asked after the reload, once the server accepts connections again
    c = h.commands
    ready = next(i for i, cmd in enumerate(c) if "pg_isready -q" in cmd)
    assert c.index(f"systemctl reload {UNIT}") < ready < c.index(psql_c(PENDING))
    assert not any("restart" in m for m in h.reported("changed"))


@pytest.mark.parametrize("pending", ["wal_log_hints", "listen_addresses, wal_log_hints"])
def test_a_changed_setting_that_needs_a_restart_is_restarted_and_named(lab, pending):
    files = configured_files(lab, "psql1server")
    files[postgres.CONF_FILE] = ("postgres:postgres:644", "wal_log_hints = off\n")
    run = converged_run(lab, files, pending=pending + "\n")
    h = run.session("psql1server")
    postgres._configure(h)
    assert h.changes == [f"systemctl reload {UNIT}", f"systemctl restart {UNIT}"]
    assert f"restart {UNIT} ({pending} need a restart)" in h.reported("changed")


def test_a_changed_setting_in_check_mode_is_neither_reloaded_nor_asked_about(lab):
    files = configured_files(lab, "psql1server")
    files[postgres.CONF_FILE] = ("postgres:postgres:644", "wal_log_hints = off\n")
    run = converged_run(lab, files, pending="wal_log_hints\n", check=True)
    h = run.session("psql1server")
    postgres._configure(h)
    assert h.uploads == {} and psql_c(PENDING) not in h.commands
    assert not any(cmd.startswith("systemctl ") and not cmd.startswith("systemctl show") for cmd in h.commands)
    assert f"{postgres.CONF_FILE} would be updated" in h.reported("would change")


def test_a_script_that_sh_rejects_is_not_installed(lab):
    run = RecordingRun(lab, secrets=SECRETS, answers={"psql1server": [
        (rf"^sh -n {START_GUARD}\.hastack-new$", Result(stderr="syntax error", exited=2)),
        *CONVERGED, *FILE_OPS, READY]})
    h = run.session("psql1server")
    with pytest.raises(HostFailed, match="pg-start-guard: new file rejected by `sh -n {}`"):
        postgres._configure(h)
    assert f"mv -f {START_GUARD}.hastack-new {START_GUARD}" not in h.commands
    assert f"rm -f {START_GUARD}.hastack-new" in h.commands
    assert "systemctl daemon-reload" not in h.commands


def test_without_synchronous_replication_the_sync_guard_is_not_installed(lab):
    inv = without_sync(lab)
    run = RecordingRun(inv, secrets=SECRETS, answers={"*": [*FILE_OPS, READY]},
                       responder=sql({PENDING: "", HBA_ERRORS: ""}))
    h = run.session("psql1server")
    postgres._configure(h)
    files = configured_files(inv, "psql1server")
    assert set(h.uploads) == {f"{path}.hastack-new" for path, (_, text) in files.items() if text is not None}
    assert f"{SYNC_GUARD}.hastack-new" not in h.uploads and f"{SYNC_SERVICE}.hastack-new" not in h.uploads
    assert not any(SYNC_UNIT in cmd or "pg-syncguard" in cmd for cmd in h.commands)
    assert "synchronous_standby_names" not in h.uploads[f"{postgres.CONF_FILE}.hastack-new"]
    # the start guard drop-in still is new to systemd
    assert "systemctl daemon-reload" in h.changes
    assert h.changes[-2:] == [f"systemctl enable {UNIT}", f"systemctl start {UNIT}"]


def test_with_synchronous_replication_the_primary_waits_for_any_one_replica(lab):
    assert "synchronous_standby_names = 'ANY 1 (\"psql2server\")'" in render(CONF, lab, "psql1server")
    assert "synchronous_standby_names" not in render(CONF, lab, "psql2server")
    assert "synchronous_standby_names" not in render(CONF, without_sync(lab), "psql1server")


def test_a_stopped_sync_guard_is_enabled_and_started(lab):
    run = RecordingRun(lab, secrets=SECRETS, answers={"psql1server": [
        files_present(configured_files(lab, "psql1server")),
        (r"^dpkg-query", Result("postgresql installed\npostgresql-client installed\n")),
        (rf"^systemctl is-enabled {UNIT}$", Result("enabled\n")),
        (rf"^systemctl is-active {UNIT}$", Result("active\n")),
        (rf"^systemctl is-enabled {SYNC_UNIT}$", Result("disabled\n", exited=1)),
    ]})
    h = run.session("psql1server")
    postgres._configure(h)
    assert h.changes == [f"systemctl enable {SYNC_UNIT}", f"systemctl start {SYNC_UNIT}"]


def test_a_changed_sync_guard_script_restarts_the_guard_only(lab):
    files = configured_files(lab, "psql1server")
    files[SYNC_GUARD] = ("root:root:755", "#!/bin/sh\n# old guard\n")
    run = converged_run(lab, files)
    h = run.session("psql1server")
    postgres._configure(h)
    assert h.changes == [f"systemctl restart {SYNC_UNIT}"]
    assert h.commands.index(f"sh -n {SYNC_GUARD}.hastack-new") < h.commands.index(f"systemctl restart {SYNC_UNIT}")


def test_a_changed_start_guard_drop_in_is_read_by_systemd_without_touching_postgres(lab):
    inv = without_sync(lab)
    files = configured_files(inv, "psql1server")
    files[DROPIN] = ("root:root:644", "[Service]\n")
    run = converged_run(inv, files)
    h = run.session("psql1server")
    postgres._configure(h)
    assert h.changes == ["systemctl daemon-reload"]


def primary_facts(*, roles: dict[str, str], database: bool, slot: bool, grants: str = "true,true,true,true",
                  other_slots: str = ""):
    """The primary's answers: ``roles`` name -> stored verifier; the database and
    the replica's slot present or not; ``grants``: has_function_privilege of the
    rewind role on the four functions pg_rewind calls; ``other_slots``: more
    replica_* slots ("name active" rows) beside the replica's."""
    answers = {"SELECT pg_is_in_recovery()": "f\n"}
    flags = {"ejabberd": [True, False], "replicator": [True, True], "rewind": [True, False]}
    answers[ROLES_QUERY] = json.dumps({name: flags[name] + [verifier] for name, verifier in roles.items()}) + "\n"
    answers[REWIND_GRANTS] = grants + "\n"
    answers["SELECT coalesce(pg_get_userbyid(datdba), '') FROM pg_database WHERE datname = 'ejabberd'"] = (
        "ejabberd\n" if database else "")
    answers["SELECT pg_get_userbyid(nspowner) FROM pg_namespace WHERE nspname = 'public'"] = (
        "ejabberd\n" if database else "pg_database_owner\n")
    answers[OUR_SLOTS] = ("replica_psql2server false\n" if slot else "") + other_slots
    return sql(answers)


def converged_roles():
    return {"ejabberd": scram_verifier("db-pw-of-ejabberd"),
            "replicator": scram_verifier("repl-pw"),
            "rewind": scram_verifier("rewind-pw")}


def test_primary_on_a_fresh_cluster_creates_roles_database_and_slot(lab):
    run = RecordingRun(lab, secrets=SECRETS, answers={"*": [READY]},
                       responder=primary_facts(roles={}, database=False, slot=False, grants="false,false,false,false"))
    h = run.session("psql1server")
    postgres._primary(h)
    assert h.changes == [
        f"{PSQL} -d postgres -f -",
        f"{PSQL} -d postgres -f -",
        f"{PSQL} -d postgres -f -",
        f"{PSQL} -d postgres -f -",
        psql_c("CREATE DATABASE \"ejabberd\" OWNER \"ejabberd\" ENCODING 'UTF8' TEMPLATE template0"),
        psql_c('ALTER SCHEMA public OWNER TO "ejabberd"', "ejabberd"),
        psql_c("SELECT pg_create_physical_replication_slot('replica_psql2server')"),
    ]
    (_, create_db_user), (_, create_repl), (_, create_rewind), (_, grants) = h.stdins
    assert create_db_user.startswith('CREATE ROLE "ejabberd" WITH LOGIN PASSWORD \'SCRAM-SHA-256$4096:')
    assert create_repl.startswith('CREATE ROLE "replicator" WITH LOGIN REPLICATION PASSWORD \'SCRAM-SHA-256$')
    assert create_rewind.startswith('CREATE ROLE "rewind" WITH LOGIN PASSWORD \'SCRAM-SHA-256$')
    assert scram_matches(create_db_user.split("'")[1], "db-pw-of-ejabberd")
    assert scram_matches(create_repl.split("'")[1], "repl-pw")
    assert scram_matches(create_rewind.split("'")[1], "rewind-pw")
    assert grants == GRANT_SCRIPT
    # the clear passwords reach neither a command line nor the server
    everything = "\n".join(h.commands) + "\n".join(s for _, s in h.stdins)
    assert "db-pw-of-ejabberd" not in everything and "repl-pw" not in everything and "rewind-pw" not in everything


def test_the_rewind_role_is_no_superuser_and_gets_exactly_the_functions_pg_rewind_calls(lab):
    run = RecordingRun(lab, secrets=SECRETS, answers={"*": [READY]},
                       responder=primary_facts(roles={}, database=True, slot=True, grants="false,false,false,false"))
    h = run.session("psql1server")
    postgres._primary(h)
    rewind = [s for _, s in h.stdins if '"rewind"' in s]
    assert len(rewind) == 2 and rewind[1] == GRANT_SCRIPT
    assert rewind[0].split(" PASSWORD ")[0] == 'CREATE ROLE "rewind" WITH LOGIN'
    # the grants are looked at (and made) once the role exists
    c = h.commands
    assert c.index(psql_c(ROLES_QUERY)) < c.index(psql_c(REWIND_GRANTS))
    assert "role rewind: EXECUTE on the functions pg_rewind calls" in h.reported("changed")


@pytest.mark.parametrize("grants", ["true,false,true,true", "false,false,false,false", ""])
def test_missing_rewind_grants_are_granted_again(lab, grants):
    run = RecordingRun(lab, secrets=SECRETS, answers={"*": [READY]},
                       responder=primary_facts(roles=converged_roles(), database=True, slot=True, grants=grants))
    h = run.session("psql1server")
    postgres._primary(h)
    assert h.changes == [f"{PSQL} -d postgres -f -"]
    assert h.stdins == [(f"{PSQL} -d postgres -f -", GRANT_SCRIPT)]


def test_primary_already_converged_changes_nothing(lab):
    run = RecordingRun(lab, secrets=SECRETS, answers={"*": [READY]},
                       responder=primary_facts(roles=converged_roles(), database=True, slot=True))
    h = run.session("psql1server")
    postgres._primary(h)
    assert h.changes == []
    assert h.reported("changed") == []
    assert psql_c(REWIND_GRANTS) in h.commands
    assert "role rewind: login, password is the site's (SCRAM)" in h.reported("ok")
    assert "role rewind: EXECUTE on the 4 functions pg_rewind calls" in h.reported("ok")


@pytest.mark.parametrize("role,password", [("ejabberd", "db-pw-of-ejabberd"), ("rewind", "rewind-pw")])
def test_primary_resets_a_password_that_is_not_the_sites(lab, role, password):
    roles = {**converged_roles(), role: scram_verifier("someone else's")}
    run = RecordingRun(lab, secrets=SECRETS, answers={"*": [READY]},
                       responder=primary_facts(roles=roles, database=True, slot=True))
    h = run.session("psql1server")
    postgres._primary(h)
    assert h.changes == [f"{PSQL} -d postgres -f -"]
    assert h.stdins[0][1].startswith(f'ALTER ROLE "{role}" WITH LOGIN PASSWORD ')
    assert scram_matches(h.stdins[0][1].split("'")[1], password)


def test_a_slot_of_a_host_outside_the_inventory_is_dropped_once_unused(lab):
    run = RecordingRun(lab, secrets=SECRETS, answers={"*": [READY]},
                       responder=primary_facts(roles=converged_roles(), database=True, slot=True,
                                               other_slots="replica_old1 false\nreplica_old2 true\n"))
    h = run.session("psql1server")
    postgres._primary(h)
    assert h.changes == [psql_c("SELECT pg_drop_replication_slot('replica_old1')")]
    assert not any("replica_old2" in c or "replica_psql2server')" in c for c in h.changes)
    assert "slot replica_old2 belongs to no PostgreSQL host of the inventory but a standby still uses it" in run.output


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
    # the wait answers only when it checks the receiver streams from the primary's address
    run = RecordingRun(lab, secrets=SECRETS, answers={"*": [READY, (r"grep -qx 'streaming 10\.200\.1\.10'",
                                                                     Result())]},
                       responder=sql({"SELECT pg_is_in_recovery()": "f\n",
                                      "SELECT datname FROM pg_database": "postgres\ntemplate0\ntemplate1\n"}))
    h = run.session("psql2server")
    postgres._replica(h)
    assert len(h.changes) == 1
    stop, wipe, backup, signal, start = h.changes[0].split(" && ")
    assert stop == f"systemctl stop {UNIT}"
    assert wipe == "find /var/lib/postgresql/15/main -mindepth 1 -delete"
    words = shlex.split(backup)
    assert words[:words.index("pg_basebackup") + 1] == [
        "runuser", "-u", "postgres", "--", "env", f"PGPASSFILE={postgres.PGPASS}", "pg_basebackup"]
    assert ["-h", "10.200.1.10", "-U", "replicator", "-D", postgres.DATA, "-S", "replica_psql2server"] == \
        words[words.index("-h"):words.index("-S") + 2]
    # no -R: primary_conninfo and primary_slot_name are in conf.d, not in postgresql.auto.conf;
    # standby.signal alone makes the copy start as a standby
    assert "-R" not in words and "--write-recovery-conf" not in words
    assert signal == "runuser -u postgres -- touch /var/lib/postgresql/15/main/standby.signal"
    assert start == f"systemctl start {UNIT}"
    assert "base backup from psql1server (10.200.1.10) over slot replica_psql2server; " \
        "started as a streaming standby" in h.reported("changed")


def test_the_replicas_settings_stream_from_the_primary_over_its_own_slot(lab):
    text = render(CONF, lab, "psql2server")
    assert "primary_slot_name = 'replica_psql2server'" in text
    assert ("primary_conninfo = 'host=10.200.1.10 port=5432 user=replicator "
            f"passfile={postgres.PGPASS} application_name=psql2server'") in text
    assert "primary_conninfo" not in render(CONF, lab, "psql1server")


def test_a_fresh_replica_in_check_mode_is_only_announced(lab):
    run = RecordingRun(lab, secrets=SECRETS, check=True, answers={"*": [READY]},
                       responder=sql({"SELECT pg_is_in_recovery()": "f\n",
                                      "SELECT datname FROM pg_database": "postgres\ntemplate0\ntemplate1\n"}))
    h = run.session("psql2server")
    postgres._replica(h)
    assert not any("pg_basebackup" in cmd or "standby.signal" in cmd for cmd in h.commands)
    assert h.reported("would change") == [
        f"would replace the fresh cluster {postgres.DATA} by pg_basebackup -S replica_psql2server "
        "from psql1server (10.200.1.10)"]


def test_a_replica_with_databases_of_its_own_is_refused(lab):
    run = RecordingRun(lab, secrets=SECRETS, answers={"*": [READY]},
                       responder=sql({"SELECT pg_is_in_recovery()": "f\n",
                                      "SELECT datname FROM pg_database": "postgres\nejabberd\ntemplate0\n"}))
    with pytest.raises(Exception, match="databases of its own"):
        postgres._replica(run.session("psql2server"))
    assert run.session("psql2server").changes == []
