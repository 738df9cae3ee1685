"""The DB proxy's read/write split on real lab hosts (HAProxy, the lab's proxy;
see fabfile/dbproxy.py): with every Galera node Primary and Synced,
- a SELECT through the reader port lands on a node that is not the writer,
  every time (several connections);
- through the writer port every connection lands on the writer (the first
  Galera node), and a row written there is written on the writer (@@hostname
  in the same session and in the row itself, read back on every node).

The mysql client runs on a mail back end (an allowed source of the proxy
ports) as a test account made for this file, allowed from the proxy hosts
only like the mail tier's accounts; it reaches the proxy at the dbproxy VIP
when a back end holds it (Pacemaker runs the proxy there), else on the client's
own address (every back end runs one before the cluster tier).
"""

from __future__ import annotations

import secrets as pysecrets

import pytest

from fabfile.core.shell import q
from fabfile.core.sql import mysql, mysql_e
from fabfile.core.topology import GALERA_CHECK_PORT, db_proxy_port, db_proxy_reader_port, galera_address

pytestmark = pytest.mark.lab

DB = "hastack_split"
USER = "labsplit"
TRIES = 8


class Split:
    def __init__(self, lab):
        inv = lab.inv
        self.lab, self.nodes = lab, inv.with_role("galera")
        vip = inv.vips["dbproxy"]
        backends = inv.with_role("mail_backend")
        self.sources = [lab.address(b, vip.network) for b in backends]
        held = lab.vip_holders("dbproxy")
        # a back end that does not hold the VIP goes through the firewall to it
        self.client = next((b for b in backends if b not in held), backends[0])
        self.proxy = str(vip.address) if held else lab.address(self.client, vip.network)
        self.writer_port, self.reader_port = db_proxy_port(inv), db_proxy_reader_port(inv)
        self.password = pysecrets.token_hex(16)

    def root(self, node: str, sql: str) -> str:
        out = self.lab.run(node, mysql_e(sql), timeout=60)
        assert out.returncode == 0, f"{node}: {sql}: {out.stderr}"
        return out.stdout.strip()

    def node(self, hostname: str) -> str:
        return self.hostnames.get(hostname, hostname)

    def through(self, port: int, sql: str) -> str:
        """``sql`` in one session through the proxy on ``port``, from the client back end."""
        cmd = mysql(defaults_file="/dev/stdin", host=self.proxy, port=port, database=DB, timeout=5)
        out = self.lab.run(self.client, f"{cmd} -e {q(sql)}",
                           input=f"[client]\nuser={USER}\npassword={self.password}\n")
        assert out.returncode == 0, f"{self.client} -> {self.proxy}:{port}: {sql}: {out.stderr}"
        return out.stdout.strip()


@pytest.fixture(scope="module")
def split(lab):
    if lab.inv.mail is None or lab.inv.mail.db_proxy != "haproxy" or "dbproxy" not in lab.inv.vips:
        pytest.skip("the lab inventory has no HAProxy DB proxy on a dbproxy VIP")
    lab.converge("pxc.deploy", "dbproxy.deploy")
    s = Split(lab)
    assert len(s.nodes) >= 2, "a read/write split needs two Galera nodes"
    for node in s.nodes:  # every node passes the check the proxy asks: the steady state
        url = f"http://{galera_address(lab.inv, node)}:{GALERA_CHECK_PORT}/"
        out = lab.run(s.client, f"curl -s -o /dev/null -w '%{{http_code}}' {url}")
        assert out.stdout == "200", f"{node} is not Primary and Synced: {out.stdout!r} {out.stderr}"
    users = ", ".join(f"'{USER}'@'{src}'" for src in s.sources)
    s.root(s.nodes[0], f"CREATE DATABASE IF NOT EXISTS {DB}; DROP USER IF EXISTS {users}; "
                       + "".join(f"CREATE USER '{USER}'@'{src}' IDENTIFIED BY '{s.password}'; "
                                 f"GRANT ALL ON {DB}.* TO '{USER}'@'{src}'; " for src in s.sources)
                       + f"CREATE TABLE IF NOT EXISTS {DB}.probe (token CHAR(32) PRIMARY KEY, "
                         "node VARCHAR(64)) ENGINE=InnoDB")
    s.hostnames = {s.root(n, "SELECT @@hostname"): n for n in s.nodes}  # what each node answers
    yield s
    lab.run(s.nodes[0], mysql_e(f"DROP DATABASE IF EXISTS {DB}; DROP USER IF EXISTS {users}"))


def test_writer_port_lands_on_the_writer_and_writes_there(split):
    answers = {split.node(split.through(split.writer_port, "SELECT @@hostname")) for _ in range(4)}
    assert answers == {split.nodes[0]}, f"writer port answered from {answers}: one writer, the first Galera node"
    token = pysecrets.token_hex(16)
    here = split.through(split.writer_port, f"INSERT INTO probe VALUES ('{token}', @@hostname); SELECT @@hostname")
    assert split.node(here) == split.nodes[0], here
    for node in split.nodes:
        got = split.root(node, f"SET SESSION wsrep_sync_wait=1; SELECT node FROM {DB}.probe WHERE token='{token}'")
        assert got == here, f"{node}: the row written through the writer port says {got!r}, not {here!r}"


def test_reader_port_reads_on_the_other_nodes(split):
    # (which of the other nodes answers depends on the lookups' own connections: leastconn)
    answers = [split.node(split.through(split.reader_port, "SELECT @@hostname")) for _ in range(TRIES)]
    assert set(answers) <= set(split.nodes[1:]), f"reader port answered from {answers}; the writer is {split.nodes[0]}"
