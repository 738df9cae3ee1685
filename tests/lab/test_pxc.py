"""The Galera tier and the database proxy on real lab hosts (the lab runs the
mariadb flavour and haproxy; see the README's fidelity table).

Proven here, with a real MySQL client (pymysql) run from a mail back end's
network namespace through the proxy (at the dbproxy VIP once Pacemaker runs
it, else on that back end):
- cluster size N, every node Synced; a row written through the proxy is read
  on every node; the tiers re-run with 0 changed;
- the pxc_strict_mode discipline: a table without a primary key is refused;
- one node killed (SIGKILL) and started again rejoins by IST, no task;
- the whole cluster killed at once while a writer records acknowledged commits:
  `inv pxc.bootstrap --yes` brings back size N with every acknowledged row;
- the nodes killed one after another (seqnos differ): the task picks the most
  advanced node (asserted from its evidence table);
- two of three killed: the survivor refuses queries (1047); `pxc.bootstrap
  --yes` makes it Primary again and the others rejoin, every acknowledged row kept.
Every fault test leaves the cluster as it found it (size N, Synced).
"""

from __future__ import annotations

import re
import secrets as pysecrets
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from fabfile import pxc
from fabfile.core.sql import mysql_e
from fabfile.core.topology import DATABASES, GALERA_CHECK_PORT, db_accounts, galera_address

from tests.lab.labhost import recap

pytestmark = pytest.mark.lab

PYTHON = Path(sys.executable)
DB = "hastack_labtest"
USER = "labtest"


# --- helpers -------------------------------------------------------------------------------


class Cluster:
    def __init__(self, lab):
        self.lab = lab
        self.inv = lab.inv
        self.nodes = lab.inv.with_role("galera")
        self.backends = lab.inv.with_role("mail_backend")
        self.backend = self.backends[0]
        vip = lab.inv.vips.get("dbproxy")
        self.proxy_net = vip.network if vip else "mail"
        self.vip = str(vip.address) if vip else None
        self.proxy = (lab.address(self.backend, self.proxy_net), 3306)
        self.netns = lab.plan.netns(self.backend)
        self.flavour = pxc.flavour(lab.inv)
        self.password = pysecrets.token_hex(16)

    def sql(self, node: str, query: str, *, check: bool = True) -> subprocess.CompletedProcess:
        out = self.lab.run(node, mysql_e(query), timeout=60)
        if check:
            assert out.returncode == 0, f"{node}: {query}: {out.stderr}"
        return out

    def status(self, node: str) -> dict:
        out = self.sql(node, "SHOW GLOBAL STATUS LIKE 'wsrep_%'", check=False)
        return pxc.parse_status(out.stdout) if out.returncode == 0 else {}

    def wait_formed(self, timeout: float = 240) -> None:
        deadline = time.monotonic() + timeout
        while True:
            states = {n: self.status(n) for n in self.nodes}
            if all(s.get("wsrep_cluster_size") == str(len(self.nodes)) and
                   s.get("wsrep_local_state_comment") == "Synced" and
                   s.get("wsrep_cluster_status") == "Primary" for s in states.values()):
                return
            if time.monotonic() > deadline:
                raise AssertionError(f"cluster not formed: {states}")
            time.sleep(2)

    def kill(self, *nodes: str) -> None:
        cmd = f"pkill -KILL -x {self.flavour.daemon}; sleep 0.5; ! pidof {self.flavour.daemon}"
        for node, out in self.lab.run_all(list(nodes), cmd).items():
            assert out.returncode == 0, f"{node}: mysqld still alive after SIGKILL: {out.stdout}{out.stderr}"

    def find_proxy(self) -> None:
        """Once the Pacemaker tier ran, the proxy runs where the dbproxy VIP is; before
        it, nobody holds the VIP and every back end runs one (the first one is used)."""
        if self.vip and self.lab.vip_holders("dbproxy"):
            self.proxy = (self.vip, 3306)

    def client(self, script: str, *args: str, timeout: float = 60) -> subprocess.CompletedProcess:
        """A Python client run in the back end's network namespace (an allowed source)."""
        return subprocess.run(["ip", "netns", "exec", self.netns, str(PYTHON), "-c", script, *args],
                              capture_output=True, text=True, timeout=timeout)

    def rows(self, node: str, table: str) -> set[int]:
        out = self.sql(node, f"SET SESSION wsrep_sync_wait=1; SELECT n FROM {DB}.{table}")
        return {int(x) for x in out.stdout.split()}


CONNECT = """
import sys, pymysql
host, port, user, password, db = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4], sys.argv[5]
def connect():
    return pymysql.connect(host=host, port=port, user=user, password=password, database=db,
                           autocommit=True, connect_timeout=3, read_timeout=10, write_timeout=10)
"""

WRITER = CONNECT + """
import os, time
table, acks, stop = sys.argv[6], sys.argv[7], sys.argv[8]
conn, n = None, 0
with open(acks, "a") as out:
    while not os.path.exists(stop):
        try:
            if conn is None:
                conn = connect()
            with conn.cursor() as cur:
                cur.execute(f"INSERT INTO {table} (n) VALUES (%s)", (n + 1,))
            n += 1  # the server acknowledged the commit
            out.write(f"{n}\\n"); out.flush()
        except pymysql.err.IntegrityError:
            n += 1  # committed before, only the answer was lost: it is there
        except Exception:
            conn = None
            time.sleep(0.2)
"""


class Writer:
    """Inserts numbered rows through the proxy and records each acknowledged one."""

    def __init__(self, cluster: Cluster, table: str, tmp: Path):
        self.cluster, self.table = cluster, table
        self.acks, self.stop_file = tmp / f"{table}.acks", tmp / f"{table}.stop"
        cluster.sql(cluster.nodes[0], f"CREATE TABLE {DB}.{table} (n INT PRIMARY KEY, "
                    "at TIMESTAMP DEFAULT CURRENT_TIMESTAMP) ENGINE=InnoDB")
        host, port = cluster.proxy
        self.proc = subprocess.Popen(
            ["ip", "netns", "exec", cluster.netns, str(PYTHON), "-c", WRITER, host, str(port), USER,
             cluster.password, DB, table, str(self.acks), str(self.stop_file)],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)

    def acked(self) -> set[int]:
        return {int(x) for x in self.acks.read_text().split()} if self.acks.exists() else set()

    def wait_for_more(self, extra: int = 10, timeout: float = 60) -> int:
        start = len(self.acked())
        deadline = time.monotonic() + timeout
        while len(self.acked()) < start + extra:
            assert self.proc.poll() is None, f"writer died: {self.proc.communicate()}"
            assert time.monotonic() < deadline, f"writer stuck at {len(self.acked())} acknowledged rows"
            time.sleep(0.2)
        return len(self.acked())

    def stop(self) -> set[int]:
        self.stop_file.touch()
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
        return self.acked()


def bootstrap(lab, *args: str) -> subprocess.CompletedProcess:
    out = lab.invoke("pxc.bootstrap", *args, timeout=900)
    return out


def chosen(out: subprocess.CompletedProcess) -> str:
    m = re.search(r"-> (\S+): chosen", out.stdout)
    assert m, out.stdout[-3000:]
    return m[1]


def evidence(out: subprocess.CompletedProcess, nodes: list[str]) -> dict[str, int]:
    """seqno per node from the evidence table."""
    seqnos = {}
    for node in nodes:
        m = re.search(rf"│ (?:-> )?{node}\s*│(?:[^│]*│){{5}}\s*(-?\d+)\s*│", out.stdout)
        assert m, f"no row for {node} in:\n{out.stdout[-3000:]}"
        seqnos[node] = int(m[1])
    return seqnos


def assert_all_acked_everywhere(cluster: Cluster, table: str, acked: set[int]) -> None:
    assert acked, "the writer had no acknowledged commit"
    for node in cluster.nodes:
        missing = acked - cluster.rows(node, table)
        assert not missing, f"{node} lost {len(missing)} acknowledged rows, e.g. {sorted(missing)[:10]}"


# --- fixtures --------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def cluster(lab):
    c = Cluster(lab)
    hosts = ",".join(c.nodes + lab.inv.with_role("mail_backend"))

    def inv(*args):
        out = lab.invoke(*args, timeout=1800)
        assert out.returncode == 0, f"inv {' '.join(args)} failed:\n{out.stdout[-5000:]}\n{out.stderr[-2000:]}"

    inv("deploy.common", "--hosts", hosts)
    out = lab.invoke("pxc.deploy", timeout=1800)
    if out.returncode != 0 and "run `inv pxc.bootstrap`" in out.stdout:
        # The lab's disks outlived an earlier session: every node was shut down
        # with the lab. That is the operator's cold start: pxc.bootstrap.
        inv("pxc.bootstrap", "--yes")
        out = lab.invoke("pxc.deploy", timeout=1800)
    assert out.returncode == 0, f"inv pxc.deploy failed:\n{out.stdout[-5000:]}\n{out.stderr[-2000:]}"
    inv("dbproxy.deploy")
    c.find_proxy()
    # A test database and user, allowed from the proxy hosts only (like the mail tier's users).
    sources = [lab.address(b, c.proxy_net) for b in c.backends]
    users = ", ".join(f"'{USER}'@'{src}'" for src in sources)
    c.sql(c.nodes[0], f"CREATE DATABASE IF NOT EXISTS {DB}; DROP USER IF EXISTS {users}; "
                      + "".join(f"CREATE USER '{USER}'@'{src}' IDENTIFIED BY '{c.password}'; "
                                f"GRANT ALL ON {DB}.* TO '{USER}'@'{src}'; " for src in sources))
    yield c
    c.sql(c.nodes[0], f"DROP DATABASE IF EXISTS {DB}; DROP USER IF EXISTS {users}", check=False)


# --- happy path --------------------------------------------------------------------------------


def test_cluster_size_and_synced(cluster):
    for node in cluster.nodes:
        s = cluster.status(node)
        assert s["wsrep_cluster_size"] == str(len(cluster.nodes)), (node, s)
        assert s["wsrep_local_state_comment"] == "Synced" and s["wsrep_cluster_status"] == "Primary", (node, s)
        assert s["wsrep_ready"] == "ON"
        dur = cluster.sql(node, "SELECT @@innodb_flush_log_at_trx_commit").stdout.strip()
        assert dur == "1", f"{node}: innodb_flush_log_at_trx_commit={dur}"


def test_rerun_reports_zero_changed(lab, cluster):
    for task in ("pxc.deploy", "dbproxy.deploy"):
        out = lab.invoke(task)
        assert out.returncode == 0, out.stdout[-3000:]
        ok, changed, failed = recap(out)
        assert (changed, failed) == (0, 0), f"{task} re-run changed things:\n{out.stdout[-3000:]}"


def test_row_through_proxy_is_read_on_every_node(cluster):
    token = pysecrets.token_hex(8)
    cluster.sql(cluster.nodes[0], f"CREATE TABLE IF NOT EXISTS {DB}.probe (token CHAR(16) PRIMARY KEY, "
                "node VARCHAR(64)) ENGINE=InnoDB")
    script = CONNECT + textwrap.dedent("""
        conn = connect()
        with conn.cursor() as cur:
            cur.execute("INSERT INTO probe VALUES (%s, @@wsrep_node_name)", (sys.argv[6],))
            cur.execute("SELECT @@wsrep_node_name")
            print(cur.fetchone()[0])
    """)
    out = cluster.client(script, *map(str, cluster.proxy), USER, cluster.password, DB, token)
    assert out.returncode == 0, out.stderr
    writer_node = out.stdout.strip()
    assert writer_node == cluster.nodes[0], "the proxy's one active writer is the first Galera node"
    for node in cluster.nodes:
        got = cluster.sql(node, f"SET SESSION wsrep_sync_wait=1; SELECT node FROM {DB}.probe "
                                f"WHERE token='{token}'").stdout.strip()
        assert got == writer_node, f"{node} does not have the row written through the proxy"


def test_galera_check_answers_for_the_proxy(lab, cluster):
    for node in cluster.nodes:
        addr = galera_address(lab.inv, node)
        out = lab.run(cluster.backend, f"curl -s -o /dev/null -w '%{{http_code}}' http://{addr}:{GALERA_CHECK_PORT}/")
        assert out.stdout == "200", f"{node}: galera-check answered {out.stdout!r} {out.stderr}"


def test_table_without_primary_key_is_refused(cluster):
    out = cluster.sql(cluster.nodes[0], f"CREATE TABLE {DB}.nopk (a INT) ENGINE=InnoDB", check=False)
    assert out.returncode != 0 and ("4165" in out.stderr or "pxc_strict_mode" in out.stderr), out.stderr
    out = cluster.sql(cluster.nodes[0], f"CREATE TABLE {DB}.myisam (a INT PRIMARY KEY) ENGINE=MyISAM", check=False)
    assert out.returncode != 0, "MyISAM tables are not replicated by Galera and must be refused"


def test_postfixadmin_tables_take_dml_under_strict_mode(lab, cluster):
    """The tables Postfixadmin creates without a primary key exist with one, so
    its log writes are accepted (the seed's pxc_strict_mode error)."""
    for table in ("log", "domain_admins"):
        ddl = cluster.sql(cluster.nodes[0], f"SHOW CREATE TABLE postfix.{table}").stdout
        assert "PRIMARY KEY (`id`)" in ddl, ddl
    cluster.sql(cluster.nodes[1], "INSERT INTO postfix.log (username, domain, action, data) "
                                  "VALUES ('lab', 'lab.test', 'lab_test', 'strict mode'); "
                                  "DELETE FROM postfix.log WHERE action = 'lab_test'")
    out = lab.invoke("pxc.status")
    assert "tables without a primary key (refused by pxc_strict_mode / wsrep_mode): none" in out.stdout, \
        out.stdout[-2000:]


def test_mail_accounts_exist_host_limited(cluster):
    for account in db_accounts(cluster.inv):
        out = cluster.sql(cluster.nodes[-1], f"SELECT host FROM mysql.user WHERE user='{account.user}'")
        assert set(out.stdout.split()) == set(account.hosts), account.user
    out = cluster.sql(cluster.nodes[0], "SELECT SCHEMA_NAME FROM information_schema.SCHEMATA")
    assert set(DATABASES) <= set(out.stdout.split())


def test_account_drift_is_repaired(lab, cluster):
    """A password changed by hand, an extra grant, an account open to '%': the
    check run shows each, the deploy repairs them, the next run changes nothing."""
    postfix = next(a for a in db_accounts(cluster.inv) if a.user == "postfix")
    host = postfix.hosts[0]
    cluster.sql(cluster.nodes[1], f"ALTER USER 'postfix'@'{host}' IDENTIFIED BY 'drifted-by-hand'; "
                                  f"GRANT INSERT ON postfix.* TO 'postfix'@'{host}'; "
                                  "CREATE USER 'roundcube'@'%' IDENTIFIED BY 'open-to-all'")
    out = lab.invoke("pxc.deploy", "--check")
    assert out.returncode == 0 and recap(out)[1] == 3, out.stdout[-3000:]
    for what in (f"password of postfix@{host}", f"revoke INSERT on `postfix`.* from postfix@{host}",
                 "drop roundcube@%"):
        assert what in out.stdout, out.stdout[-3000:]
    out = lab.invoke("pxc.deploy")
    assert out.returncode == 0 and recap(out)[1] == 3, out.stdout[-3000:]
    out = lab.invoke("pxc.deploy")
    assert out.returncode == 0 and recap(out)[1] == 0, out.stdout[-3000:]


def test_status_task(lab, cluster):
    out = lab.invoke("pxc.status")
    assert out.returncode == 0, out.stdout[-3000:]
    for node in cluster.nodes:
        assert re.search(rf"│ {node}\s*│ alive\s*│ Primary\s*│ Synced\s*│ {len(cluster.nodes)}\s*│", out.stdout), \
            out.stdout[-3000:]


def test_bootstrap_refuses_a_healthy_cluster(lab, cluster):
    out = bootstrap(lab, "--yes")
    assert out.returncode == 1
    assert "refusing: the cluster is running" in out.stdout and "nothing to bootstrap" in out.stdout
    assert "Traceback" not in out.stdout + out.stderr


# --- faults (each puts the cluster back) ---------------------------------------------------------


def test_one_node_killed_rejoins_by_ist(lab, cluster, tmp_path):
    victim = cluster.nodes[-1]
    writer = Writer(cluster, "acks_one", tmp_path)
    try:
        writer.wait_for_more(10)
        cluster.kill(victim)
        writer.wait_for_more(20)  # the others keep committing: the victim falls behind
        since = lab.run(victim, "date +%s").stdout.strip()
        out = lab.run(victim, f"systemctl start {cluster.flavour.service}", timeout=300)
        assert out.returncode == 0, out.stderr
        cluster.wait_formed()
        writer.wait_for_more(10)
    finally:
        acked = writer.stop()
    log = lab.run(victim, f"journalctl -u {cluster.flavour.service} --since @{since} --no-pager; "
                          f"tail -n 300 /var/log/mysql/error.log 2>/dev/null").stdout
    assert "IST received" in log, "the node should have caught up by IST"
    assert_all_acked_everywhere(cluster, "acks_one", acked)


def test_full_crash_then_bootstrap(lab, cluster, tmp_path):
    writer = Writer(cluster, "acks_full", tmp_path)
    try:
        writer.wait_for_more(20)
        cluster.kill(*cluster.nodes)  # all at once
        time.sleep(2)
    finally:
        acked = writer.stop()
    # No terminal and no --yes: refused, nothing changed.
    out = bootstrap(lab)
    assert out.returncode == 1 and "re-run with --yes" in out.stdout, out.stdout[-3000:]
    assert all(lab.run(n, f"pidof {cluster.flavour.daemon}").returncode != 0 for n in cluster.nodes)
    out = bootstrap(lab, "--yes")
    assert out.returncode == 0, out.stdout[-5000:]
    cluster.wait_formed()
    assert_all_acked_everywhere(cluster, "acks_full", acked)


def test_crash_one_after_another_picks_the_most_advanced(lab, cluster, tmp_path):
    first, second, last = cluster.nodes[0], cluster.nodes[1], cluster.nodes[2]
    writer = Writer(cluster, "acks_seq", tmp_path)
    try:
        writer.wait_for_more(10)
        cluster.kill(first)  # the proxy's writer: it fails over to the next node
        writer.wait_for_more(20)  # committed without `first`: it is behind now
        cluster.kill(second)  # `last` alone loses quorum: no more commits
        time.sleep(2)
        cluster.kill(last)
    finally:
        acked = writer.stop()
    # Asking for the node that is behind is refused, with the reason.
    out = bootstrap(lab, "--yes", "--node", first)
    assert out.returncode == 1 and f"refusing --node {first}: it is behind" in out.stdout, out.stdout[-3000:]
    out = bootstrap(lab, "--yes")
    assert out.returncode == 0, out.stdout[-5000:]
    seqnos = evidence(out, cluster.nodes)
    picked = chosen(out)
    assert seqnos[first] < max(seqnos.values()), seqnos
    assert seqnos[picked] == max(seqnos.values()), (picked, seqnos)
    assert picked in (second, last), (picked, seqnos)
    cluster.wait_formed()
    assert_all_acked_everywhere(cluster, "acks_seq", acked)


def test_two_of_three_killed_survivor_refuses_then_bootstrap(lab, cluster, tmp_path):
    survivor, dead = cluster.nodes[0], cluster.nodes[1:]
    writer = Writer(cluster, "acks_two", tmp_path)
    try:
        writer.wait_for_more(20)
        cluster.kill(*dead)
        deadline = time.monotonic() + 60  # the survivor notices and drops to non-Primary
        while cluster.status(survivor).get("wsrep_cluster_status") != "non-Primary":
            assert time.monotonic() < deadline, cluster.status(survivor)
            time.sleep(1)
    finally:
        acked = writer.stop()
    out = cluster.sql(survivor, f"SELECT COUNT(*) FROM {DB}.acks_two", check=False)
    assert out.returncode != 0 and "1047" in out.stderr, f"the survivor should refuse queries: {out.stderr}"
    assert cluster.status(survivor)["wsrep_cluster_status"] == "non-Primary"
    out = bootstrap(lab, "--yes")
    assert out.returncode == 0, out.stdout[-5000:]
    assert chosen(out) == survivor and "pc.bootstrap" in out.stdout, out.stdout[-3000:]
    cluster.wait_formed()
    assert_all_acked_everywhere(cluster, "acks_two", acked)


def test_after_the_faults_the_tiers_are_still_converged(lab, cluster):
    out = lab.invoke("pxc.deploy")
    assert out.returncode == 0, out.stdout[-3000:]
    assert recap(out)[1:] == (0, 0), out.stdout[-3000:]
