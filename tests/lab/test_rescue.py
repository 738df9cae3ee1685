"""Rescue of the XMPP service's PostgreSQL on real lab hosts (issue 15), faults for real.

- Primary crash in synchronous mode: a client writes numbered rows through the
  path ejabberd uses (from an ejabberd node, to the server ejabberd.yml names,
  as the ejabberd role) while `inv lab.power <primary> off` cuts the primary;
  `inv postgres.promote --yes`; every acknowledged row is on the new primary
  (0 lost); XMPP logins at the VIP work again and a user registered now logs
  in; the seconds from power-off to the first successful write and login are
  printed.
- Rejoin: the old primary powered on comes back read-only by itself (its start
  guard found a peer on a newer timeline); `inv postgres.rejoin` rewinds it; it
  streams from the new primary and has every row; `inv deploy.all` then
  changes nothing.
- The lab is put back as it was: `inv postgres.promote --node <old> --force`
  (the live primary is stopped and fenced first), `inv postgres.rejoin` of the
  other; the roles file is gone, a deploy changes nothing.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import threading
import time
import uuid
from pathlib import Path

import pytest

from fabfile import ejabberd, postgres
from fabfile import lab as labmod
from fabfile.core import topology
from fabfile.core.inventory import load
from fabfile.core.secrets import token
from tests.lab.labhost import INV_BIN, PROJECT_ROOT, recap
from tests.lab.test_xmpp import (CLIENT, PSQL, cluster_of, deployed_with_users, in_netns, ok, wait_for,
                                 wait_started)

pytestmark = pytest.mark.lab

WRITER = textwrap.dedent("""\
    import json, os, re, sys, time
    import psycopg
    a = json.load(sys.stdin)

    def server():  # what ejabberd uses: sql_server of its ejabberd.yml
        m = re.search(r'^sql_server:\\s*"?([0-9.]+)"?', open(a["config"]).read(), re.M)
        return m[1]

    conn, i = None, 0
    while not os.path.exists(a["stop"]):
        i += 1
        try:
            host = server()
            if conn is None or conn.info.host != host:
                conn = psycopg.connect(host=host, dbname=a["db"], user=a["user"], password=a["password"],
                                       connect_timeout=2, tcp_user_timeout=3000, autocommit=True)
            conn.execute("INSERT INTO rescue_probe (id) VALUES (%s)", (i,))
            print(json.dumps({"ack": i, "t": time.time(), "host": host}), flush=True)
        except Exception as e:  # noqa: BLE001 - every failure is an unacknowledged row
            try:
                conn is not None and conn.close()
            except Exception:  # noqa: BLE001
                pass
            conn = None
            print(json.dumps({"fail": i, "t": time.time(), "error": str(e).strip()[:160]}), flush=True)
            time.sleep(0.3)
        time.sleep(0.05)
""")


class Writer:
    """WRITER running in an ejabberd node's network namespace until stopped."""

    def __init__(self, lab, node: str, folder: Path, password: str):
        self.stop_file = folder / f"stop-{uuid.uuid4().hex[:6]}"
        spec = {"config": str(lab.plan.merged(node) / "etc/ejabberd/ejabberd.yml"), "stop": str(self.stop_file),
                "db": postgres.DB, "user": postgres.DB_USER, "password": password}
        self.proc = subprocess.Popen(["ip", "netns", "exec", lab.plan.netns(node), sys.executable, "-c", WRITER],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                     text=True)
        self.proc.stdin.write(json.dumps(spec))
        self.proc.stdin.close()
        self.events: list[dict] = []
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()

    def _read(self) -> None:
        for line in self.proc.stdout:
            try:
                self.events.append(json.loads(line))
            except ValueError:
                pass

    def acked(self) -> list[int]:
        return [e["ack"] for e in list(self.events) if "ack" in e]

    def first_ack_after(self, t: float) -> float | None:
        return next((e["t"] for e in list(self.events) if "ack" in e and e["t"] > t), None)

    def stop(self) -> None:
        self.stop_file.touch()
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
        self.reader.join(timeout=5)


def login(lab, gateway: str, ca: Path, domain: str, vip: str | list[str], users: dict[str, str],
          timeout: float = 10, message: str | None = None) -> dict:
    """Each user logs in (at ``vip``, or at the address of the same index); the first
    sends the second ``message``."""
    hosts = vip if isinstance(vip, list) else [vip] * len(users)
    spec = {"ca": str(ca), "timeout": timeout, "message": message,
            "clients": [{"jid": f"{u}@{domain}", "password": p, "host": h}
                        for (u, p), h in zip(users.items(), hosts)]}
    return in_netns(lab, gateway, CLIENT.read_text(), json.dumps(spec), timeout=timeout + 60)


def no_change(lab) -> None:
    out = lab.invoke("deploy.all", timeout=1800)
    ok(out)
    assert recap(out)[1:] == (0, 0), "a deploy after the rescue changes nothing:\n" + out.stdout[-4000:]


def sql(lab, host: str, query: str, check: bool = True) -> str:
    return lab.run(host, f"{PSQL} -d {postgres.DB} -c {json.dumps(query)}", check=check).stdout.strip()


def in_recovery(lab, host: str) -> str:
    return lab.run(host, f"{PSQL} -c 'SELECT pg_is_in_recovery()'").stdout.strip()


def streaming_from(lab, host: str, address: str) -> bool:
    r = lab.run(host, f"{PSQL} -c \"SELECT status || ' ' || sender_host FROM pg_stat_wal_receiver\"")
    return r.stdout.strip() == f"streaming {address}"


def power(lab, host: str, action: str) -> None:
    out = lab.invoke("lab.power", host, action, timeout=300)
    assert out.returncode == 0, out.stdout + out.stderr


@pytest.fixture(scope="module")
def pg(lab, tmp_path_factory):
    inv = lab.inv
    if inv.xmpp is None or not topology.pg_replicas(inv):
        pytest.skip("the lab inventory has no XMPP service with a PostgreSQL replica")
    assert inv.postgres.synchronous, "the lab inventory turns synchronous replication on"
    folder = tmp_path_factory.mktemp("rescue")
    secrets, ca, users, gateway = deployed_with_users(lab, folder, ["rescuer1", "rescuer2"])
    vip = inv.vips["xmpp"]
    primary, replica = topology.pg_primary(inv), topology.pg_replicas(inv)[0]
    sql(lab, primary, "CREATE TABLE IF NOT EXISTS rescue_probe (id int PRIMARY KEY, at timestamptz DEFAULT now())")
    sql(lab, primary, "ALTER TABLE rescue_probe OWNER TO ejabberd")
    sql(lab, primary, "TRUNCATE rescue_probe")
    yield {"inv": inv, "secrets": secrets, "folder": folder, "ca": ca, "users": users, "gateway": gateway,
           "vip": str(vip.address), "domain": inv.xmpp.domain, "primary": primary, "replica": replica,
           "node": topology.ejabberd_nodes(inv)[0], "password": secrets.require(postgres.SECRET_DB)}
    _put_back(lab, primary, replica)
    sql(lab, primary, "DROP TABLE IF EXISTS rescue_probe", check=False)


def _put_back(lab, primary: str, replica: str) -> None:
    """The lab as the inventory describes it (best effort after a failure): both
    hosts on, ``primary`` the primary, ``replica`` streaming from it, no roles file."""
    for host in (primary, replica):
        if labmod.power_state(lab.plan, host) != "on":
            power(lab, host, "on")
    roles_file = lab.inv.roles_file
    if roles_file.exists() or in_recovery(lab, primary) != "f":
        out = lab.invoke("postgres.promote", "--node", primary, "--force", "--yes", timeout=900)
        assert out.returncode == 0, f"putting the lab back: promote failed\n{out.stdout[-4000:]}"
    if not streaming_from(lab, replica, lab.inv.service_address(primary)):
        out = lab.invoke("postgres.rejoin", replica, "--yes", timeout=1800)
        assert out.returncode == 0, f"putting the lab back: rejoin failed\n{out.stdout[-4000:]}"
    assert not roles_file.exists(), f"{roles_file} is left although the roles are the inventory's again"


def test_refusals_change_nothing(lab, pg):
    """Promoting while the primary is healthy, a host that is not a replica, rejoining the primary."""
    cases = [
        (("postgres.promote", "--yes"), "still runs as a primary and answers"),
        (("postgres.promote", "--node", pg["node"], "--yes"), "not role postgres_replica"),
        (("postgres.rejoin", pg["primary"], "--yes"), "is the current primary"),
        (("postgres.promote",), "still runs as a primary"),
    ]
    for args, expected in cases:
        out = lab.invoke(*args)
        assert out.returncode == 1, out.stdout
        assert expected in out.stdout + out.stderr, out.stdout[-3000:]
        assert "Traceback" not in out.stdout + out.stderr
    assert not lab.inv.roles_file.exists()
    assert in_recovery(lab, pg["primary"]) == "f" and in_recovery(lab, pg["replica"]) == "t"


def test_primary_crash_promote_rejoin_and_back(lab, pg):
    primary, replica = pg["primary"], pg["replica"]
    writer = Writer(lab, pg["node"], pg["folder"], pg["password"])
    logins: dict[str, float] = {}
    try:
        wait_for(lambda: len(writer.acked()) >= 30, 60, "30 acknowledged rows before the fault")
        power(lab, primary, "off")  # returns once the host is off
        cut = time.time()
        acked_before_cut = len(writer.acked())

        def first_login() -> None:
            deadline = time.monotonic() + 600
            while time.monotonic() < deadline and "at" not in logins:
                try:
                    out = login(lab, pg["gateway"], pg["ca"], pg["domain"], pg["vip"], pg["users"], timeout=5)
                    if [x["status"] for x in out["logins"]] == ["ok", "ok"]:
                        logins["at"] = time.time()
                        return
                except AssertionError:
                    pass
                time.sleep(1)

        watcher = threading.Thread(target=first_login, daemon=True)
        watcher.start()
        out = lab.invoke("postgres.promote", "--yes", timeout=900)
        assert out.returncode == 0, out.stdout[-5000:] + out.stderr[-2000:]
        assert f"-> {replica}" in out.stdout and pg["inv"].roles_file.name in out.stdout
        wait_for(lambda: len(writer.acked()) > acked_before_cut + 20, 120, "writes acknowledged by the new primary")
        watcher.join(timeout=300)
        assert "at" in logins, "no XMPP login at the VIP after the promotion"
    finally:
        writer.stop()
    acked = writer.acked()
    present = {int(x) for x in sql(lab, replica, "SELECT id FROM rescue_probe").split()}
    lost = sorted(set(acked) - present)
    first_write = writer.first_ack_after(cut)
    print(f"\nprimary {primary} powered off; {replica} promoted: first write {first_write - cut:.1f} s "
          f"and first login {logins['at'] - cut:.1f} s after the power cut; {len(acked)} rows acknowledged, "
          f"{len(lost)} lost")
    assert lost == [], f"acknowledged rows missing on the new primary: {lost[:20]}"
    assert in_recovery(lab, replica) == "f"
    inv = load(pg["inv"].path)
    assert topology.pg_primary(inv) == replica and inv.overridden, "the roles file records the new primary"
    yml = (lab.plan.merged(pg["node"]) / "etc/ejabberd/ejabberd.yml").read_text()
    assert f'sql_server: "{inv.service_address(replica)}"' in yml

    # A user registered now is a row on the new primary and logs in.
    newcomer = {"afterpromote": token(16)}
    ok(lab.invoke("ejabberd.register-user", "afterpromote", "--password", newcomer["afterpromote"], "--update"))
    assert "afterpromote" in sql(lab, replica, "SELECT username FROM users").split()
    got = login(lab, pg["gateway"], pg["ca"], pg["domain"], pg["vip"], newcomer)
    assert [x["status"] for x in got["logins"]] == ["ok"], got

    # The old primary comes back read-only by itself.
    power(lab, primary, "on")
    wait_for(lambda: in_recovery(lab, primary) == "t", 120, f"{primary}'s PostgreSQL to start (read-only)")
    refused = lab.run(primary, f"{PSQL} -d {postgres.DB} -c 'INSERT INTO rescue_probe (id) VALUES (-1)'")
    assert refused.returncode != 0 and "read-only" in refused.stderr, refused.stdout + refused.stderr
    guard = lab.run(primary, f"journalctl -u {postgres.UNIT} -b --no-pager | grep pg-start-guard").stdout
    assert "newer timeline" in guard or "timeline" in guard, guard

    out = lab.invoke("postgres.rejoin", primary, "--yes", timeout=1800)
    assert out.returncode == 0, out.stdout[-5000:]
    assert "pg_rewind" in out.stdout
    assert streaming_from(lab, primary, inv.service_address(replica))
    count = lambda h: sql(lab, h, "SELECT count(*) FROM rescue_probe")  # noqa: E731
    wait_for(lambda: count(primary) == count(replica), 30, f"{primary} to have every row")
    assert set(acked) <= {int(x) for x in sql(lab, primary, "SELECT id FROM rescue_probe").split()}
    sync = sql(lab, replica, "SELECT sync_state FROM pg_stat_replication")
    wait_for(lambda: sql(lab, replica, "SELECT sync_state FROM pg_stat_replication") in ("sync", "quorum"), 30,
             f"{primary} to be a synchronous standby (was {sync!r})")

    no_change(lab)

    # Back as the inventory describes it: the live primary is fenced by --force.
    out = lab.invoke("postgres.promote", "--node", primary, "--force", "--yes", timeout=900)
    assert out.returncode == 0, out.stdout[-5000:]
    assert "fence" in out.stdout
    out = lab.invoke("postgres.rejoin", replica, "--yes", timeout=1800)
    assert out.returncode == 0, out.stdout[-5000:]
    assert not pg["inv"].roles_file.exists()
    assert streaming_from(lab, replica, pg["inv"].service_address(primary))


def test_replace_a_dead_ejabberd_node_by_the_spare_then_take_it_out(lab, pg):
    inv = pg["inv"]
    nodes = topology.ejabberd_nodes(inv)
    survivor, dead = nodes[0], nodes[-1]
    spare = inv.with_role(topology.SPARE)[0]
    net = inv.vips["xmpp"].network
    power(lab, dead, "off")
    try:
        out = lab.invoke("rescue.replace", dead, "--with", spare, "--yes", timeout=1800)
        assert out.returncode == 0, out.stdout[-5000:] + out.stderr[-2000:]
        want = {ejabberd.node_name(survivor), ejabberd.node_name(spare)}
        for host in (survivor, spare):
            wait_for(lambda: cluster_of(lab, host) == want, 60, f"{host} to list {sorted(want)}")
        assert ejabberd.node_name(dead) not in cluster_of(lab, survivor)
        users = dict(pg["users"])
        body = f"across the rescued cluster {uuid.uuid4().hex[:6]}"
        got = login(lab, pg["gateway"], pg["ca"], pg["domain"],
                    [str(inv.hosts[survivor].addresses[net]), str(inv.hosts[spare].addresses[net])], users,
                    message=body)
        assert [x["status"] for x in got["logins"]] == ["ok", "ok"] and got["received"] == [body], got
        got = login(lab, pg["gateway"], pg["ca"], pg["domain"], pg["vip"], users)
        assert [x["status"] for x in got["logins"]] == ["ok", "ok"], got
        no_change(lab)

        out = lab.invoke("ejabberd.remove-node", spare, "--yes", timeout=1800)
        assert out.returncode == 0, out.stdout[-5000:]
        assert cluster_of(lab, survivor) == {ejabberd.node_name(survivor)}
        assert lab.run(spare, "systemctl is-active ejabberd").stdout.strip() != "active"
        assert lab.run(spare, f"ip -o -4 addr show | grep -c ' {pg['vip']}/'").stdout.strip() == "0"
        roles = load(inv.path).roles_file.read_text()
        assert spare not in roles and dead in roles, roles  # the spare is a spare again; the dead one retired
    finally:
        # The dead node comes back as it was: its services stopped and its mnesia
        # emptied before it may rejoin (README: rescue), then the inventory as before.
        # (Its ejabberd hangs at boot: its mnesia waits for peers whose firewalls now
        # drop it, so `lab.power on`, which waits for the boot to finish, runs beside.)
        booting = None
        if labmod.power_state(lab.plan, dead) != "on":
            booting = subprocess.Popen([str(INV_BIN), "lab.power", dead, "on"], cwd=PROJECT_ROOT,
                                       env={**os.environ, "INVOKE_INVENTORY": str(inv.path)},
                                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wait_for(lambda: lab.run(dead, "true", timeout=10).returncode == 0, 120, f"ssh to {dead}")
        lab.run(dead, "systemctl stop keepalived ejabberd; "
                      "find /var/lib/ejabberd -mindepth 1 -maxdepth 1 ! -name .erlang.cookie -exec rm -rf {} +",
                timeout=180)
        if booting is not None:
            assert booting.wait(timeout=300) == 0, f"inv lab.power {dead} on failed"
        inv.roles_file.unlink(missing_ok=True)
    out = lab.invoke("deploy.all", timeout=1800)
    ok(out)
    wait_started(lab, dead)
    want = {ejabberd.node_name(n) for n in nodes}
    for host in nodes:
        wait_for(lambda: cluster_of(lab, host) == want, 60, f"{host} to list the whole cluster")
    no_change(lab)


def test_replace_a_dead_replica_by_the_spare(lab, pg):
    inv = pg["inv"]
    primary, dead = pg["primary"], pg["replica"]
    spare = inv.with_role(topology.SPARE)[0]
    power(lab, dead, "off")
    try:
        out = lab.invoke("rescue.replace", dead, "--with", spare, "--yes", timeout=1800)
        assert out.returncode == 0, out.stdout[-5000:] + out.stderr[-2000:]
        assert streaming_from(lab, spare, inv.service_address(primary))
        slots = sql(lab, primary, "SELECT slot_name || ' ' || active::text FROM pg_replication_slots")
        assert f"{topology.slot_name(spare)} true" in slots.splitlines(), slots
        assert topology.slot_name(dead) not in slots, slots
        marker = uuid.uuid4().hex[:8]
        sql(lab, primary, f"INSERT INTO rescue_probe (id) VALUES ({int(marker, 16) % 1000000 + 1000000})")
        wait_for(lambda: sql(lab, spare, "SELECT count(*) FROM rescue_probe") ==
                 sql(lab, primary, "SELECT count(*) FROM rescue_probe"), 10, f"the row on {spare}")
        sync = sql(lab, primary, "SELECT application_name || ' ' || sync_state FROM pg_stat_replication")
        assert sync.split()[0] == spare, sync
        no_change(lab)
    finally:
        # Back as the inventory describes it: the spare's PostgreSQL stopped (it
        # is a spare again), the dead replica on, the roles file gone.
        lab.run(spare, f"systemctl disable --now {postgres.SYNC_GUARD_UNIT} {postgres.UNIT}", timeout=120)
        if labmod.power_state(lab.plan, dead) != "on":
            power(lab, dead, "on")
        wait_for(lambda: lab.run(dead, "true", timeout=10).returncode == 0, 60, f"ssh to {dead}")
        inv.roles_file.unlink(missing_ok=True)
    ok(lab.invoke("deploy.all", timeout=1800))
    wait_for(lambda: streaming_from(lab, dead, inv.service_address(primary)), 60, f"{dead} streaming again")
    slots = sql(lab, primary, "SELECT slot_name FROM pg_replication_slots").split()
    assert slots == [topology.slot_name(dead)], slots
    no_change(lab)
