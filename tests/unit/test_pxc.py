"""The Galera tier without hosts: rendered configs for both flavours, the
bootstrap decision over canned evidence (grastate / wsrep-recover / live
status), the deploy's formation decision, the account/grant statements, and
the command sequences against recording hosts (core.testing.RecordingRun):
facts in, commands out, with an "already converged: no commands" case for
each main step."""

from __future__ import annotations

import hashlib
import io
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from fabfile import pxc
from fabfile.core import HostFailed, Result, templates
from fabfile.core.errors import UserError
from fabfile.core.inventory import InventoryError, load, parse
from fabfile.core.remote import APT_UPDATE, POLICY_RC
from fabfile.core.secrets import Secrets
from fabfile.core.sql import mysql_native_hash
from fabfile.core.testing import RecordingRun
from fabfile.core.topology import DATABASES, db_accounts
from fabfile.pxc import Node, decide, formation

ROOT = Path(__file__).resolve().parents[2]
LAB = load(ROOT / "inventory/lab.yml")  # mariadb + haproxy
EXAMPLE = load(ROOT / "inventory/example.yml")  # percona + proxysql
UUID = "775278dd-e61a-11f1-a3c6-9799e5a60d9f"
OTHER_UUID = "11111111-2222-3333-4444-555555555555"
GALERA = ("pxc1", "pxc2", "pxc3")
# put() moves an uploaded file into place with plain commands (not changes): they succeed.
WRITES = [(r"^(mkdir -p|chown|mv -f) ", Result())]
STATE_QUERY = r"FROM mysql\.user WHERE user IN"  # the accounts step reading a node's databases and accounts


@pytest.fixture
def secrets(tmp_path):
    return Secrets(tmp_path / "secrets.yml")


def render(inv, name, host, secret):
    return templates.render(name, inv, host, secret, **pxc.template_vars(inv, host, secret))


# --- rendered configs ---------------------------------------------------------------


def test_mariadb_config(secrets):
    text = render(LAB, "pxc/etc/mysql/mariadb.conf.d/60-galera.cnf.j2", "pxc2", secrets.get)
    assert text.startswith("# Managed by hastack")
    lines = {line.split("=", 1)[0].strip(): line.split("=", 1)[1].strip()
             for line in text.splitlines() if "=" in line and not line.startswith("#")}
    assert lines["innodb_flush_log_at_trx_commit"] == "1"
    assert lines["binlog_format"] == "ROW"
    assert lines["innodb_autoinc_lock_mode"] == "2"
    assert lines["wsrep_cluster_address"] == "gcomm://10.200.11.120,10.200.11.121,10.200.11.122"
    assert lines["wsrep_node_address"] == lines["bind-address"] == "10.200.11.121"
    assert lines["wsrep_node_name"] == "pxc2"
    assert lines["wsrep_provider"] == "/usr/lib/galera/libgalera_smm.so"
    assert lines["wsrep_sst_method"] == "mariabackup"
    assert lines["wsrep_sst_auth"] == f"sst:{secrets.get('pxc_sst_password')}"
    assert len(secrets.get("pxc_sst_password")) >= 24
    # The MariaDB equivalent of pxc_strict_mode=ENFORCING.
    assert set(lines["wsrep_mode"].split(",")) == {"REQUIRED_PRIMARY_KEY", "STRICT_REPLICATION"}
    # Same cluster name on every node, each its own address.
    other = render(LAB, "pxc/etc/mysql/mariadb.conf.d/60-galera.cnf.j2", "pxc3", secrets.get)
    assert "wsrep_cluster_name = lab-mail" in text and "wsrep_cluster_name = lab-mail" in other
    assert "wsrep_node_address = 10.200.11.122" in other


def test_percona_config(secrets):
    text = render(EXAMPLE, "pxc/etc/mysql/mysql.conf.d/mysqld.cnf.j2", "pxc3", secrets.get)
    assert "pxc_strict_mode = ENFORCING" in text
    assert "innodb_flush_log_at_trx_commit = 1" in text
    assert "wsrep_provider = /usr/lib/galera4/libgalera_smm.so" in text
    assert "wsrep_sst_method = xtrabackup-v2" in text
    assert not any(line.startswith("wsrep_sst_auth") for line in text.splitlines())
    assert "server-id = 3" in text
    assert "ssl-cert = /etc/ssl/hastack/pxc3.crt" in text and "ssl-key = /etc/ssl/hastack/pxc3.key" in text
    assert "wsrep_cluster_address = gcomm://10.10.11.120,10.10.11.121,10.10.11.122" in text
    assert "bind-address = 10.10.11.122" in text


def test_flavour_command_sequences():
    maria, percona = pxc.FLAVOURS["mariadb"], pxc.FLAVOURS["percona"]
    new = pxc.Decision("pxc2", "new-cluster", (), ("pxc1", "pxc3"), ())
    assert pxc.bootstrap_commands(maria, new) == [
        "sed -i 's/^safe_to_bootstrap:.*/safe_to_bootstrap: 1/' /var/lib/mysql/grastate.dat",
        "galera_new_cluster",
    ]
    assert pxc.bootstrap_commands(percona, new)[-1] == "systemctl start mysql@bootstrap.service"
    assert percona.after_bootstrap == ("systemctl stop mysql@bootstrap.service", "systemctl start mysql")
    assert maria.after_bootstrap == ()
    assert (maria.start_cmd, percona.start_cmd) == ("systemctl start mariadb", "systemctl start mysql")
    pc = pxc.Decision("pxc1", "pc-bootstrap", (), ("pxc2",), ())
    (cmd,) = pxc.bootstrap_commands(maria, pc)
    assert shlex.split(cmd)[-2:] == ["-e", "SET GLOBAL wsrep_provider_options='pc.bootstrap=YES'"]
    assert "--wsrep-recover" in pxc.recover_cmd(percona) and percona.daemon in pxc.recover_cmd(percona)
    assert pxc.recover_cmd(maria).count("mariadbd") == 1


def test_dropin_keeps_crashed_nodes_down(secrets):
    text = render(LAB, "pxc/etc/systemd/system/mariadb.service.d/hastack.conf.j2", "pxc1", secrets.get)
    assert "Restart=no" in text


def test_galera_check_script(secrets, tmp_path):
    text = render(LAB, "pxc/usr/local/bin/galera-check.j2", "pxc1", secrets.get)
    assert text.startswith("#!/bin/sh\n# Managed by hastack")
    script = tmp_path / "check"
    script.write_text(text)
    assert subprocess.run(["sh", "-n", str(script)]).returncode == 0
    cnf = render(LAB, "pxc/etc/mysql/galera-check.cnf.j2", "pxc1", secrets.get)
    assert "user = monitor" in cnf and secrets.get("pxc_monitor_password") in cnf
    sock = render(LAB, "pxc/etc/systemd/system/galera-check.socket.j2", "pxc1", secrets.get)
    assert "ListenStream=10.200.11.120:9200" in sock


# --- parsing evidence ------------------------------------------------------------------


def test_parse_grastate():
    text = f"# GALERA saved state\nversion: 2.1\nuuid:    {UUID}\nseqno:   -1\nsafe_to_bootstrap: 0\n"
    assert pxc.parse_grastate(text) == {"uuid": UUID, "seqno": -1, "safe_to_bootstrap": False}
    assert pxc.parse_grastate(text.replace("seqno:   -1", "seqno:   42").replace(": 0", ": 1")) == {
        "uuid": UUID, "seqno": 42, "safe_to_bootstrap": True}


def test_parse_recovered():
    log = (f"2026-11-22  2:17:08 0 [Note] InnoDB: Starting crash recovery\n"
           f"2026-11-22  2:17:09 0 [Note] WSREP: Recovered position: {UUID}:37\n")
    assert pxc.parse_recovered(log) == (UUID, 37)
    assert pxc.parse_recovered(f"WSREP: Recovered position: {pxc.NULL_UUID}:-1") == (pxc.NULL_UUID, -1)
    assert pxc.parse_recovered("mysqld: Can't lock aria control file") is None


def test_parse_status():
    s = pxc.parse_status("wsrep_cluster_size\t3\nwsrep_cluster_status\tPrimary\nwsrep_on\t1\n")
    assert s == {"wsrep_cluster_size": "3", "wsrep_cluster_status": "Primary", "wsrep_on": "1"}


# --- the bootstrap decision ----------------------------------------------------------------


def down(name, seqno, *, uuid=UUID, safe=False, source="wsrep-recover"):
    return Node(name, running=False, uuid=uuid, seqno=seqno, safe_to_bootstrap=safe, source=source, history=True)


def alive(name, seqno, *, status="non-Primary", state="Initialized", size=1, uuid=UUID):
    return Node(name, running=True, answering=True, status=status, state=state, size=size, uuid=uuid,
                seqno=seqno, source="live", history=True)


def test_highest_seqno_wins():
    d = decide([down("pxc1", 10), down("pxc2", 12), down("pxc3", 11)])
    assert (d.node, d.how) == ("pxc2", "new-cluster")
    assert d.start_after == ("pxc1", "pxc3") and d.stop_first == ()
    assert "highest seqno (12)" in d.reasons[0]


def test_tie_goes_to_safe_to_bootstrap():
    d = decide([down("pxc1", 12), down("pxc2", 12), down("pxc3", 12, safe=True)])
    assert d.node == "pxc3"
    assert "safe_to_bootstrap" in d.reasons[0]


def test_safe_to_bootstrap_does_not_beat_a_higher_seqno():
    assert decide([down("pxc1", 12, safe=True), down("pxc2", 13), down("pxc3", 11)]).node == "pxc2"


def test_tie_without_flag_is_inventory_order():
    assert decide([down("pxc1", 7), down("pxc2", 7), down("pxc3", 7)]).node == "pxc1"


def test_null_uuid_node_is_never_chosen():
    lost = down("pxc3", -1, uuid=pxc.NULL_UUID)
    with pytest.raises(UserError, match=r"pxc3 .*cannot be recovered"):
        decide([down("pxc1", 5), down("pxc2", 6), lost])
    d = decide([down("pxc1", 5), down("pxc2", 6), lost], force=True)
    assert d.node == "pxc2"
    assert any("never chosen" in r for r in d.reasons)
    # ... even when it is the only one with safe_to_bootstrap, or named with --node.
    lost_safe = down("pxc3", -1, uuid=pxc.NULL_UUID, safe=True)
    assert decide([down("pxc1", 5), down("pxc2", 5), lost_safe], force=True).node == "pxc1"
    with pytest.raises(UserError, match="--node pxc3: its position cannot be recovered"):
        decide([down("pxc1", 5), down("pxc2", 5), lost_safe], node="pxc3", force=True)


def test_no_recoverable_position_at_all_is_refused_even_with_force():
    nodes = [down(n, -1, uuid=pxc.NULL_UUID) for n in ("pxc1", "pxc2", "pxc3")]
    with pytest.raises(UserError, match="no node has a recoverable position"):
        decide(nodes, force=True)


def test_primary_component_is_refused_even_with_force():
    nodes = [alive("pxc1", 40, status="Primary", state="Synced", size=2), alive("pxc2", 40, status="Primary",
             state="Synced", size=2), down("pxc3", 30)]
    for force in (False, True):
        with pytest.raises(UserError, match="cluster is running, pxc1 is Primary .* stopped nodes \\(pxc3\\)"):
            decide(nodes, force=force)


def test_healthy_cluster_is_refused():
    nodes = [alive(n, 40, status="Primary", state="Synced", size=3) for n in ("pxc1", "pxc2", "pxc3")]
    with pytest.raises(UserError, match="nothing to bootstrap"):
        decide(nodes)


def test_unreachable_node_is_refused_even_with_force():
    nodes = [down("pxc1", 10), Node("pxc2", reachable=False, error="timeout"), down("pxc3", 9)]
    for force in (False, True):
        with pytest.raises(UserError, match="cannot reach pxc2 over SSH, so its mysqld may still be alive"):
            decide(nodes, force=force)


def test_alive_but_not_answering_is_refused_even_with_force():
    hung = Node("pxc2", running=True, answering=False, history=True)
    with pytest.raises(UserError, match="mysqld on pxc2 is alive but does not answer"):
        decide([down("pxc1", 10), hung, down("pxc3", 9)], force=True)


def test_node_behind_is_refused_even_with_force():
    nodes = [down("pxc1", 10), down("pxc2", 12), down("pxc3", 12)]
    for force in (False, True):
        with pytest.raises(UserError, match=r"--node pxc1: it is behind pxc2 \(seqno 12\), pxc3 \(seqno 12\)"):
            decide(nodes, node="pxc1", force=force)
    assert decide(nodes, node="pxc3").node == "pxc3"  # a tie at the top is fine
    with pytest.raises(UserError, match="--node nosuch: not a Galera node"):
        decide(nodes, node="nosuch")


def test_different_cluster_uuids_refused():
    with pytest.raises(UserError, match="different cluster UUIDs"):
        decide([down("pxc1", 10), down("pxc2", 12, uuid=OTHER_UUID), down("pxc3", 9)])


def test_survivor_of_two_crashes_gets_pc_bootstrap():
    d = decide([alive("pxc1", 40), down("pxc2", 40), down("pxc3", 39)])
    assert (d.node, d.how, d.stop_first, d.start_after) == ("pxc1", "pc-bootstrap", (), ("pxc2", "pxc3"))
    # Ties prefer the node that still runs (no restart needed).
    assert decide([down("pxc1", 40), alive("pxc2", 40), down("pxc3", 40)]).node == "pxc2"


def test_survivor_behind_a_stopped_node_is_stopped_first():
    d = decide([alive("pxc1", 38), down("pxc2", 40), down("pxc3", 39)])
    assert (d.node, d.how, d.stop_first) == ("pxc2", "new-cluster", ("pxc1",))
    assert d.start_after == ("pxc1", "pxc3")


def test_standalone_server_is_refused():
    standalone = Node("pxc1", running=True, answering=True, wsrep_on=False)
    with pytest.raises(UserError, match="without Galera"):
        decide([standalone, down("pxc2", 3), down("pxc3", 3)])


# --- the deploy's formation decision ----------------------------------------------------


def test_fresh_nodes_bootstrap_the_first():
    fresh = [Node(n, running=True, answering=True, wsrep_on=False) for n in ("pxc1", "pxc2", "pxc3")]
    f = formation(fresh)
    assert (f.bootstrap, f.joiners, f.primary) == ("pxc1", ("pxc2", "pxc3"), "pxc1")
    assert formation([Node(n) for n in ("pxc1", "pxc2", "pxc3")]).bootstrap == "pxc1"


def test_running_cluster_is_never_rebootstrapped():
    nodes = [alive("pxc1", 5, status="Primary", state="Synced", size=2), down("pxc2", 5),
             alive("pxc3", 5, status="Primary", state="Synced", size=2)]
    f = formation(nodes)
    assert (f.bootstrap, f.joiners, f.primary) == (None, ("pxc2",), "pxc1")
    healthy = [alive(n, 5, status="Primary", state="Synced", size=3) for n in ("pxc1", "pxc2", "pxc3")]
    assert formation(healthy) == pxc.Formation(None, (), "pxc1")


def test_cluster_with_history_but_no_primary_needs_pxc_bootstrap():
    with pytest.raises(UserError, match="run `inv pxc.bootstrap`"):
        formation([down("pxc1", 5), down("pxc2", 5), down("pxc3", 5)])
    with pytest.raises(UserError, match="no Primary component"):
        formation([alive("pxc1", 5), down("pxc2", 5), down("pxc3", 5)])


# --- accounts ---------------------------------------------------------------------------


def test_native_hash_matches_mysql():
    # SELECT PASSWORD('password') on MariaDB / MySQL 5.7.
    assert mysql_native_hash("password") == "*2470C0C06DEE42FD1618BB99005ADCA2EC9D1E19"


def test_accounts_are_host_limited():
    accounts = {a.user: a for a in db_accounts(LAB)}
    assert set(accounts) == {"sst", "monitor", "postfixadmin", "postfix", "dovecot", "roundcube",
                             "roundcube_password", "exporter"}
    assert accounts["exporter"].hosts == ("localhost",) and accounts["exporter"].grants == {"*": ("PROCESS",)}
    backends = ("10.200.11.113", "10.200.11.114", "10.200.11.115")
    for user in ("postfixadmin", "postfix", "dovecot"):
        assert accounts[user].hosts == backends
    # Roundcube reaches Galera through the DB proxy: the proxy hosts are where it connects from
    assert accounts["roundcube"].hosts == accounts["roundcube_password"].hosts == backends
    assert accounts["roundcube_password"].grants == {"postfix.mailbox": ("SELECT", "UPDATE")}
    assert accounts["sst"].hosts == ("localhost",)
    assert all("%" not in h for a in accounts.values() for h in a.hosts)
    assert accounts["postfix"].grants == {"postfix": ("SELECT",)}
    assert accounts["monitor"].grants == {}
    # PXC 8.0 makes its own SST user.
    assert "sst" not in {a.user for a in db_accounts(EXAMPLE)}


def converged_state(inv, password) -> str:
    """STATE_SQL's output on a node where every database, table, account and grant is as wanted."""
    lines = [f"db {d}" for d in DATABASES]
    lines += [f"table {db} {t}" for db, t in pxc.PRECREATED_TABLES]
    lines += ["table postfix mailbox"]  # made by the mail tier; roundcube_password's grant is on it
    for a in db_accounts(inv):
        for host in a.hosts:
            lines.append(f"user {a.user} {host} mysql_native_password {mysql_native_hash(password(a.secret))}")
            for schema, privs in a.grants.items():
                for p in privs:
                    lines.append(f"grant '{a.user}'@'{host}' {schema} {p}")
    lines.append("grant 'root'@'localhost' * SELECT")  # not ours: left alone
    lines.append("user root localhost mysql_native_password invalid")
    return "\n".join(lines) + "\n"


def test_sql_changes_from_nothing(secrets):
    changes = pxc.sql_changes(LAB, "", secrets.get)
    stmts = [s for s, _ in changes]
    assert stmts[:2] == [
        "CREATE DATABASE IF NOT EXISTS `postfix` CHARACTER SET utf8mb4 COLLATE utf8mb4_unicode_ci",
        "CREATE DATABASE IF NOT EXISTS `roundcube` CHARACTER SET utf8mb4 COLLATE utf8mb4_unicode_ci",
    ]
    h = mysql_native_hash(secrets.get("mail_db_postfix"))
    assert f"CREATE USER 'postfix'@'10.200.11.113' IDENTIFIED BY PASSWORD '{h}'" in stmts
    assert "GRANT SELECT ON `postfix`.* TO 'postfix'@'10.200.11.113'" in stmts
    assert "GRANT RELOAD, PROCESS, LOCK TABLES, BINLOG MONITOR ON *.* TO 'sst'@'localhost'" in stmts
    # No plaintext password in any statement.
    for name in ("mail_db_postfix", "mail_db_roundcube", "pxc_sst_password", "pxc_monitor_password"):
        assert not any(secrets.get(name) in s for s in stmts)


def test_postfixadmin_tables_without_early_primary_key_are_precreated(secrets):
    stmts = [s for s, _ in pxc.sql_changes(LAB, "", secrets.get)]
    for table in ("domain_admins", "log"):
        (create,) = [s for s in stmts if s.startswith(f"CREATE TABLE IF NOT EXISTS `postfix`.`{table}`")]
        assert "`id` int(11) NOT NULL AUTO_INCREMENT" in create and "PRIMARY KEY (`id`)" in create
        assert "ENGINE=InnoDB" in create
    # Already there (in whatever shape Postfixadmin left it): left alone.
    state = "table postfix log\ntable postfix domain_admins\n"
    assert not any(s.startswith("CREATE TABLE") for s, _ in pxc.sql_changes(LAB, state, secrets.get))


def test_percona_statements_use_native_password_plugin(secrets):
    stmts = [s for s, _ in pxc.sql_changes(EXAMPLE, "", secrets.get)]
    h = mysql_native_hash(secrets.get("mail_db_dovecot"))
    assert f"CREATE USER 'dovecot'@'10.10.11.113' IDENTIFIED WITH mysql_native_password AS '{h}'" in stmts


def test_sql_changes_converged_is_empty(secrets):
    assert pxc.sql_changes(LAB, converged_state(LAB, secrets.get), secrets.get) == []


def test_sql_changes_repairs_drift(secrets):
    state = converged_state(LAB, secrets.get)
    state = state.replace(mysql_native_hash(secrets.get("mail_db_dovecot")), "*0000", 1)
    state += "user postfix 10.200.11.99 mysql_native_password *1234\n"
    state += "grant 'postfix'@'10.200.11.113' postfix INSERT\n"
    stmts = [s for s, _ in pxc.sql_changes(LAB, state, secrets.get)]
    assert stmts[0] == "DROP USER 'postfix'@'10.200.11.99'"
    assert any(s.startswith("ALTER USER 'dovecot'@'10.200.11.113' IDENTIFIED BY PASSWORD") for s in stmts)
    assert "REVOKE INSERT ON `postfix`.* FROM 'postfix'@'10.200.11.113'" in stmts
    assert len(stmts) == 3


def test_a_host_read_back_from_the_server_is_a_sql_literal(secrets):
    """A host name the server reports (an account someone made by hand) is quoted, not pasted."""
    state = converged_state(LAB, secrets.get) + "user postfix x'@'%';DROP\\ mysql_native_password *1\n"
    (stmt,) = [s for s, _ in pxc.sql_changes(LAB, state, secrets.get)]
    assert stmt == "DROP USER 'postfix'@'x\\'@\\'%\\';DROP\\\\'"


# --- the accounts step on a node (recording host) ------------------------------------------


def test_accounts_step_creates_through_stdin():
    run = RecordingRun(LAB, answers={"pxc1": [(STATE_QUERY, Result())]})  # nothing there yet
    h = run.session("pxc1")
    pxc._accounts(h)
    (state_query,) = [c for c in h.commands if c not in h.changes]
    assert shlex.split(state_query)[:3] == ["mysql", "--connect-timeout=10", "-NB"]
    assert h.changes and set(h.changes) == {"mysql --connect-timeout=10 -NB"}
    statements = [stdin for _, stdin in h.stdins]
    assert statements[0] == ("CREATE DATABASE IF NOT EXISTS `postfix` CHARACTER SET utf8mb4 "
                             "COLLATE utf8mb4_unicode_ci;\n")
    assert len(statements) == len(pxc.sql_changes(LAB, "", run.secret))
    # Passwords reach neither a command line nor a statement (hashes only).
    for a in db_accounts(LAB):
        assert not any(run.secret(a.secret) in c for c in h.commands + statements)


def test_accounts_step_converged_changes_nothing():
    run = RecordingRun(LAB, answers={
        "pxc1": [(STATE_QUERY, lambda cmd, stdin: Result(converged_state(LAB, run.secret)))]})
    h = run.session("pxc1")
    pxc._accounts(h)
    assert h.changes == []
    assert h.reported("ok") == ["databases postfix, roundcube and 8 accounts as wanted"]


# --- the install step on a host (recording host) -------------------------------------------


def assert_changes(h, expected):
    """``h.changes`` one by one: a string is the exact command, a compiled pattern matches its start."""
    assert len(h.changes) == len(expected), "\n".join(h.changes)
    for got, want in zip(h.changes, expected):
        assert (want.match(got) if isinstance(want, re.Pattern) else got == want), (got, want)


def uploaded(h) -> set[str]:
    return {path.removesuffix(".hastack-new") for path in h.uploads}


def test_percona_install_sequence():
    run = RecordingRun(EXAMPLE, answers={"*": WRITES})  # a fresh host: every probe fails (nothing there yet)
    h = run.session("pxc1")
    assert pxc._install(h, pxc.FLAVOURS["percona"]) is True
    assert_changes(h, [
        re.compile(r"curl -fsSLo /tmp/percona-release.deb https://repo\.percona\.com/apt/"),
        "percona-release enable-only pxc-80 release && percona-release enable tools release && " + APT_UPDATE,
        # No service may start while the packages install: policy-rc.d before, removed after.
        re.compile(rf"printf %s .* > {POLICY_RC} && chmod 0755 {POLICY_RC}$", re.S),
        re.compile(r"DEBIAN_FRONTEND=noninteractive apt-get install .* percona-xtradb-cluster rsync socat \|\| "),
        f"rm -f {POLICY_RC}",
        "usermod -a -G ssl-cert mysql",
        "systemctl daemon-reload",  # the mysql.service drop-in
        "systemctl enable mysql",  # enabled, not started: the formation steps start it
        "systemctl daemon-reload",  # the galera-check units
        "systemctl enable galera-check.socket",
        "systemctl start galera-check.socket",
    ])
    assert uploaded(h) == {"/etc/mysql/mysql.conf.d/mysqld.cnf", "/etc/systemd/system/mysql.service.d/hastack.conf",
                           "/etc/mysql/galera-check.cnf", "/usr/local/bin/galera-check",
                           "/etc/systemd/system/galera-check.socket", "/etc/systemd/system/galera-check@.service"}
    assert "chown root:mysql /etc/mysql/mysql.conf.d/mysqld.cnf.hastack-new && chmod 0640 " \
           "/etc/mysql/mysql.conf.d/mysqld.cnf.hastack-new" in h.commands
    assert not any("mariadb" in c for c in h.commands)


def test_mariadb_install_sequence():
    run = RecordingRun(LAB, answers={"*": WRITES})
    h = run.session("pxc2")
    assert pxc._install(h, pxc.FLAVOURS["mariadb"]) is True
    assert_changes(h, [
        "systemctl disable --now mariadb.socket && systemctl mask mariadb.socket",
        re.compile(r"DEBIAN_FRONTEND=noninteractive apt-get install .* "
                   r"galera-4 mariadb-backup mariadb-client mariadb-server rsync socat \|\| "),
        "systemctl daemon-reload",
        "systemctl enable mariadb",
        "systemctl daemon-reload",
        "systemctl enable galera-check.socket",
        "systemctl start galera-check.socket",
    ])
    assert "/etc/mysql/mariadb.conf.d/60-galera.cnf" in uploaded(h)
    assert not any("policy-rc.d" in c for c in h.commands)


def files_of(flav) -> dict[str, tuple[str, str]]:
    """What the tier puts on a Galera node: path -> (template, owner:group:mode)."""
    return {
        flav.config_path: (flav.config_template, "root:mysql:640"),
        flav.dropin_path: (flav.dropin_template, "root:root:644"),
        "/etc/mysql/galera-check.cnf": ("pxc/etc/mysql/galera-check.cnf.j2", "root:nogroup:640"),
        "/usr/local/bin/galera-check": ("pxc/usr/local/bin/galera-check.j2", "root:root:755"),
        "/etc/systemd/system/galera-check.socket": ("pxc/etc/systemd/system/galera-check.socket.j2", "root:root:644"),
        "/etc/systemd/system/galera-check@.service": ("pxc/etc/systemd/system/galera-check@.service.j2",
                                                      "root:root:644"),
    }


def installed(inv, host, secret) -> list:
    """The facts of a node where the install step already ran: packages, repository, files, units."""
    flav = pxc.flavour(inv)
    files = files_of(flav)

    def stat(cmd, stdin):
        path = re.match(r"stat -c '%U:%G:%a' (\S+) ", cmd)[1]
        template, meta = files[path]
        digest = hashlib.sha256(render(inv, template, host, secret).encode()).hexdigest()
        return Result(f"{meta}\n{digest}  {path}\n")

    return [
        (r"^dpkg-query -W -f='\$\{Status\}' percona-release", Result()),
        (r"^test -e /etc/apt/sources.list.d/percona-pxc-80-release.list$", Result()),
        (r"^! systemctl is-enabled -q mariadb.socket", Result()),
        (r"^dpkg-query -W -f='\$\{Package\} ", Result("".join(f"{p} installed\n" for p in flav.packages))),
        (r"^id -nG mysql \| tr .* \| grep -qxF ssl-cert$", Result()),
        (r"^stat -c '%U:%G:%a' (\S+) && sha256sum", stat),
        (rf"^systemctl is-enabled -q {flav.service}$", Result()),
        (r"^systemctl is-enabled galera-check.socket$", Result("enabled\n")),
        (r"^systemctl is-active galera-check.socket$", Result("active\n")),
    ]


@pytest.mark.parametrize("inv", [LAB, EXAMPLE], ids=["mariadb", "percona"])
def test_install_already_converged_changes_nothing(inv):
    run = RecordingRun(inv, answers={"pxc1": installed(inv, "pxc1", lambda name: run.secret(name))})
    h = run.session("pxc1")
    assert pxc._install(h, pxc.flavour(inv)) is False
    assert h.changes == [] and h.uploads == {}
    assert h.reported("changed") == []


# --- a simulated cluster: the deploy and pxc.bootstrap, commands out -------------------------


class Cluster:
    """Answers for the Galera nodes of ``inv`` as a cluster would: which mysqld runs,
    what grastate.dat and --wsrep-recover say; the flavour's start/stop/bootstrap
    commands change it. ``events`` records, in order over every node, the starts,
    stops and SQL statements."""

    def __init__(self, inv, *, running=(), seqnos=None, recovered=None):
        self.flav = pxc.flavour(inv)
        self.running = set(running)
        self.seqnos = seqnos or {}  # node -> grastate seqno; absent: no Galera history
        self.recovered = recovered or {}  # node -> what --wsrep-recover finds
        self.events: list[tuple[str, str]] = []

    def __call__(self, h, cmd, stdin):
        f = self.flav
        if cmd == f"pidof {f.daemon}":
            return Result("4242\n") if h.name in self.running else Result(exited=1)
        if cmd == "cat /var/lib/mysql/grastate.dat":
            if h.name not in self.seqnos:
                return Result(exited=1)
            return Result(f"version: 2.1\nuuid: {UUID}\nseqno: {self.seqnos[h.name]}\nsafe_to_bootstrap: 0\n")
        if "SHOW GLOBAL STATUS" in cmd and h.name in self.running:
            return Result(f"wsrep_cluster_status\tPrimary\nwsrep_local_state_comment\tSynced\n"
                          f"wsrep_cluster_size\t{len(self.running)}\nwsrep_cluster_state_uuid\t{UUID}\n"
                          f"wsrep_last_committed\t40\nwsrep_on\t1\n")
        if "--wsrep-recover" in cmd and h.name in self.recovered:
            return Result(f"[Note] WSREP: Recovered position: {UUID}:{self.recovered[h.name]}\n")
        if cmd in (f.bootstrap_cmd, f.start_cmd, f.stop_cmd):
            (self.running.add if cmd != f.stop_cmd else self.running.discard)(h.name)
            self.events.append((h.name, cmd))
            return Result()
        if stdin is not None and cmd.startswith("mysql "):
            self.events.append((h.name, stdin.split(" ", 1)[0]))
        return None  # the host's rules answer


def test_fresh_deploy_bootstraps_the_first_node_then_joins_the_others_one_by_one():
    cluster = Cluster(LAB)
    run = RecordingRun(LAB, responder=cluster, answers={"*": [*WRITES, (STATE_QUERY, Result())]})
    pxc.converge(run)
    starts = [e for e in cluster.events if e[1] not in ("CREATE", "GRANT")]
    assert starts == [("pxc1", "galera_new_cluster"), ("pxc2", "systemctl start mariadb"),
                      ("pxc3", "systemctl start mariadb")]
    # The databases and accounts on the bootstrap node, before anyone joins (the SST user).
    sql = [i for i, e in enumerate(cluster.events) if e[1] in ("CREATE", "GRANT")]
    assert sql and all(cluster.events[i][0] == "pxc1" for i in sql)
    assert cluster.events.index(("pxc2", "systemctl start mariadb")) > max(sql)
    assert cluster.running == set(GALERA)


@pytest.mark.parametrize("inv", [LAB, EXAMPLE], ids=["mariadb", "percona"])
def test_deploy_of_a_converged_cluster_changes_nothing(inv):
    cluster = Cluster(inv, running=GALERA, seqnos=dict.fromkeys(GALERA, -1))
    secret = lambda name: run.secret(name)  # noqa: E731 - the run is made below
    answers = {n: [*installed(inv, n, secret),
                   (STATE_QUERY, lambda cmd, stdin: Result(converged_state(inv, secret))),
                   (r"^pid=\$\(pidof", Result("1000 900 900\n"))]  # started after its config was written
               for n in GALERA}
    run = RecordingRun(inv, responder=cluster, answers=answers)
    pxc.converge(run)
    for n in GALERA:
        assert run.session(n).changes == [], n
    assert cluster.events == []
    assert "cluster size 3, Synced: Primary Synced size 3" in run.session("pxc3").reported("ok")


def test_bootstrap_chooses_the_most_advanced_node_and_starts_the_others():
    cluster = Cluster(LAB, seqnos={"pxc1": 10, "pxc2": -1, "pxc3": 11}, recovered={"pxc2": 12})
    run = RecordingRun(LAB, responder=cluster)
    pxc.bootstrap.body.runbook(run, yes=True)
    assert run.session("pxc2").changes == [
        "sed -i 's/^safe_to_bootstrap:.*/safe_to_bootstrap: 1/' /var/lib/mysql/grastate.dat",
        "galera_new_cluster",
    ]
    assert run.session("pxc1").changes == run.session("pxc3").changes == ["systemctl start mariadb"]
    assert cluster.events == [("pxc2", "galera_new_cluster"), ("pxc1", "systemctl start mariadb"),
                              ("pxc3", "systemctl start mariadb")]
    assert "-> pxc2" in run.output and "pxc2 has the highest seqno (12)" in run.output


def test_bootstrap_without_a_terminal_needs_yes(monkeypatch):
    monkeypatch.setattr(sys, "stdin", io.StringIO(""))
    cluster = Cluster(LAB, seqnos={"pxc1": 10, "pxc2": 12, "pxc3": 11})
    run = RecordingRun(LAB, responder=cluster)
    with pytest.raises(UserError, match="no terminal to confirm on: re-run with --yes"):
        pxc.bootstrap.body.runbook(run)
    assert all(run.session(n).changes == [] for n in GALERA)
    assert "plan: bootstrap a new cluster from pxc2 (galera_new_cluster)" in run.output


def test_wait_gives_up_when_mysqld_is_not_running(monkeypatch):
    monkeypatch.setattr(pxc, "DOWN_GRACE", -1)  # what 15 s without a mysqld look like, without waiting
    run = RecordingRun(LAB, responder=Cluster(LAB))
    with pytest.raises(HostFailed, match=r"gave up waiting for Synced: mysqld is not running .*journalctl -u mariadb"):
        pxc.wait_node(run.session("pxc1"), lambda n: n.synced, "Synced")


# --- bad input ----------------------------------------------------------------------------


def test_even_number_of_galera_nodes_is_refused():
    text = (ROOT / "inventory/lab.yml").read_text().replace(
        "  pxc3:", "  pxc4:      {roles: [galera],       addresses: {mgmt: 10.200.0.123, mail: 10.200.11.123}}\n  pxc3:")
    with pytest.raises(InventoryError, match="role galera needs an odd number of hosts, at least 3 \\(found 4\\)"):
        parse(text, "lab4.yml")


def _inv(*args):
    return subprocess.run([sys.executable, "-m", "invoke", *args], cwd=ROOT, capture_output=True, text=True)


def test_bootstrap_node_must_be_a_galera_node():
    out = _inv("pxc.bootstrap", "--node", "ngx01", "--yes")
    assert out.returncode == 1
    assert "Traceback" not in out.stderr + out.stdout
    assert "--node ngx01: not a Galera node (Galera nodes: pxc1, pxc2, pxc3); nothing was changed" in out.stdout


def test_cluster_is_converged_as_a_whole():
    out = _inv("pxc.deploy", "--hosts", "pxc1")
    assert out.returncode == 1 and "Traceback" not in out.stderr + out.stdout
    assert "--hosts must name all of pxc1, pxc2, pxc3 or none of them" in out.stdout


def test_tasks_are_listed():
    out = _inv("--list")
    for name in ("pxc.deploy", "pxc.bootstrap", "pxc.status", "dbproxy.deploy"):
        assert name in out.stdout
