"""XMPP service on real lab hosts (issue 5): after deploy.common on the XMPP hosts
and deploy.xmpp, prove with real clients that
- PostgreSQL streams to the replica (pg_stat_replication; a row written on the
  primary with psycopg is on the replica within a second; the replica refuses
  writes);
- both ejabberd nodes are one cluster;
- users registered by the task log in over STARTTLS to the VIP, the server's
  certificate verified against the site CA (an unknown CA fails), alice on one
  node sends bob on the other a message, and the users are rows in PostgreSQL;
- bad input to the ops tasks changes nothing;
- the inventory's admins log in with the passwords the deploy generated (and
  `ejabberd.admin-password` says where they are, without printing them);
- two users on different nodes join a chat room on conference.<domain>, the
  owner makes it persistent (a row in PostgreSQL's muc_room) and they exchange
  a groupchat message;
- MQTT on 1883 at the VIP: a hand-written MQTT 3.1.1 CONNECT over TLS (the site
  CA verified) with a user's credentials gets CONNACK "accepted", a wrong
  password is refused, and the plaintext protocol gets no CONNACK at all;
- stopping ejabberd on the VIP holder moves the VIP, clients log in there again
  and exchange messages, and the node rejoins the cluster when started;
- a second deploy.xmpp changes nothing (same replica, same cluster).

Clients run inside a lab host's network namespace (`ip netns exec`): the
gateway's DMZ side for XMPP, an ejabberd node (the hosts pg_hba admits) for
PostgreSQL. Hosts and addresses come from the inventory, so this runs against
any lab inventory with an XMPP service.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
import time
import uuid
from pathlib import Path
from types import SimpleNamespace

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from fabfile import ejabberd, postgres
from fabfile.core import topology
from fabfile.core.secrets import Secrets, token
from fabfile.core.shell import retry_loop
from tests.lab.labhost import recap

pytestmark = pytest.mark.lab

CLIENT = Path(__file__).with_name("xmpp_client.py")
PSQL = "runuser -u postgres -- psql -X -At"


def ok(out) -> None:
    assert out.returncode == 0, f"{out.args}\n{out.stdout[-5000:]}\n{out.stderr[-3000:]}"


@pytest.fixture(scope="module")
def xmpp(lab, tmp_path_factory):
    inv = lab.inv
    if inv.xmpp is None:
        pytest.skip("the lab inventory has no XMPP service")
    folder = tmp_path_factory.mktemp("xmpp")
    secrets, ca, users, gateway = deployed_with_users(lab, folder, ["alice", "bob"])
    vip = inv.vips["xmpp"]
    return SimpleNamespace(
        inv=inv, domain=inv.xmpp.domain, vip=str(vip.address), vip_network=vip.network,
        nodes=topology.ejabberd_nodes(inv), primary=topology.pg_primary(inv), replicas=topology.pg_replicas(inv),
        gateway=gateway, ca=ca, folder=folder, users=users, secrets=secrets,
        db_password=secrets.require(postgres.SECRET_DB),
    )


# --- helpers ---------------------------------------------------------------------------------


def deployed_with_users(lab, folder: Path, names: list[str]) -> tuple[Secrets, Path, dict[str, str], str]:
    """The XMPP service deployed (the common tiers on its hosts, then deploy.xmpp),
    ``names`` registered with fresh passwords; (the site's secrets, the site CA as a
    file in ``folder``, {user: password}, the gateway on the xmpp VIP's network,
    where clients run)."""
    inv = lab.inv
    hosts = inv.with_role("ejabberd", "postgres_primary", "postgres_replica", "gateway")
    ok(lab.invoke("deploy.common", "--hosts", ",".join(hosts)))
    ok(lab.invoke("deploy.xmpp"))
    vip = inv.vips["xmpp"]
    gateway = next(h for h in inv.with_role("gateway") if vip.network in inv.hosts[h].addresses)
    secrets = Secrets(inv.site_file("secrets.yml"), persist=False)
    ca = folder / "ca.crt"
    ca.write_text(secrets.require("pki_ca_cert"))
    users = {name: token(16) for name in names}
    for user, password in users.items():
        ok(lab.invoke("ejabberd.register-user", user, "--password", password, "--update"))
    return secrets, ca, users, gateway


def in_netns(lab, host: str, script: str, stdin: str, timeout: float = 120) -> dict:
    """Run a python script with this venv's python inside ``host``'s network namespace."""
    out = subprocess.run(["ip", "netns", "exec", lab.plan.netns(host), sys.executable, "-c", script],
                         input=stdin, capture_output=True, text=True, timeout=timeout)
    assert out.returncode == 0, f"client in {host} failed:\n{out.stdout[-3000:]}\n{out.stderr[-3000:]}"
    return json.loads(out.stdout.strip().splitlines()[-1])


def chat(lab, x, hosts: list[str], *, message: str | None = None, ca: Path | None = None) -> dict:
    """alice logs in at hosts[0], bob at hosts[1] (addresses), alice sends bob ``message``."""
    spec = {
        "ca": str(ca or x.ca), "timeout": 20, "message": message,
        "clients": [{"jid": f"{u}@{x.domain}", "password": x.users[u], "host": h}
                    for u, h in zip(("alice", "bob"), hosts)],
    }
    return in_netns(lab, x.gateway, CLIENT.read_text(), json.dumps(spec))


def wait_for(predicate, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.5)
    raise AssertionError(f"timed out after {timeout:g}s waiting for {what}")


def cluster_of(lab, host: str) -> set[str]:
    r = lab.run(host, "ejabberdctl list_cluster")
    return set(ejabberd.cluster_members(r.stdout)) if r.returncode == 0 else set()


def wait_started(lab, host: str) -> None:
    r = lab.run(host, retry_loop(f"{ejabberd.STATUS} >/dev/null 2>&1", ejabberd.START_TIMEOUT), timeout=150)
    assert r.returncode == 0, f"ejabberd on {host} did not start: {r.stdout}{r.stderr}"


PG_PROBE = textwrap.dedent("""\
    import json, sys, time
    import psycopg
    a = json.load(sys.stdin)
    def conn(host):
        return psycopg.connect(host=host, dbname=a["db"], user=a["user"], password=a["password"],
                               connect_timeout=10, autocommit=True)
    out = {}
    table = a["table"]
    with conn(a["primary"]) as p:
        p.execute(f"CREATE TABLE {table} (id int PRIMARY KEY, note text)")
        written = time.monotonic()
        p.execute(f"INSERT INTO {table} VALUES (1, %s)", (a["note"],))
        for replica in a["replicas"]:
            with conn(replica) as r:
                seen = None
                while time.monotonic() - written < 5:
                    try:
                        row = r.execute(f"SELECT note FROM {table} WHERE id = 1").fetchone()
                    except psycopg.errors.UndefinedTable:
                        row = None
                    if row:
                        seen = time.monotonic() - written
                        break
                    time.sleep(0.02)
                try:
                    r.execute(f"INSERT INTO {table} VALUES (2, 'on the replica')")
                    refused = None
                except psycopg.errors.ReadOnlySqlTransaction as e:
                    refused = str(e).strip()
                in_recovery = r.execute("SELECT pg_is_in_recovery()").fetchone()[0]
                out[replica] = {"seen_after": seen, "refused": refused, "in_recovery": in_recovery,
                                "row": row[0] if row else None}
        p.execute(f"DROP TABLE {table}")
    print(json.dumps(out))
""")


# --- PostgreSQL ------------------------------------------------------------------------------


def test_primary_streams_to_every_replica(lab, xmpp):
    rows = lab.run(xmpp.primary, f"{PSQL} -c \"SELECT host(client_addr), state FROM pg_stat_replication\"",
                   check=True).stdout.split()
    for replica in xmpp.replicas:
        assert f"{xmpp.inv.service_address(replica)}|streaming" in rows, rows
        slot = topology.slot_name(replica)
        active = lab.run(xmpp.primary, f"{PSQL} -c \"SELECT active FROM pg_replication_slots "
                                       f"WHERE slot_name = '{slot}'\"", check=True).stdout.strip()
        assert active == "t"


def test_a_row_written_on_the_primary_is_on_the_replica_within_a_second_and_the_replica_refuses_writes(
        lab, xmpp):
    args = {
        "db": postgres.DB, "user": postgres.DB_USER, "password": xmpp.db_password,
        "primary": xmpp.inv.service_address(xmpp.primary),
        "replicas": [xmpp.inv.service_address(r) for r in xmpp.replicas],
        "table": f"hastack_probe_{uuid.uuid4().hex[:8]}", "note": uuid.uuid4().hex,
    }
    # From an ejabberd node: the hosts pg_hba and the firewalls admit.
    out = in_netns(lab, xmpp.nodes[0], PG_PROBE, json.dumps(args))
    for replica in args["replicas"]:
        r = out[replica]
        assert r["row"] == args["note"] and r["seen_after"] is not None and r["seen_after"] < 1.0, r
        assert r["in_recovery"] is True
        assert r["refused"] and "read-only" in r["refused"], r


def test_only_listed_addresses_may_connect(lab, xmpp):
    hba = lab.run(xmpp.primary, "grep -vE '^(#|$)' /etc/postgresql/15/main/pg_hba.conf", check=True).stdout
    assert "trust" not in hba and "0.0.0.0/0" not in hba and " md5" not in hba
    listen = lab.run(xmpp.primary, "ss -Hltn 'sport = :5432'", check=True).stdout
    assert "*:5432" not in listen and "0.0.0.0:5432" not in listen
    assert f"{xmpp.inv.service_address(xmpp.primary)}:5432" in listen


# --- ejabberd --------------------------------------------------------------------------------


def test_every_node_lists_the_whole_cluster(lab, xmpp):
    want = {ejabberd.node_name(h) for h in xmpp.nodes}
    for host in xmpp.nodes:
        assert cluster_of(lab, host) == want, host


def test_cookie_and_node_name(lab, xmpp):
    res = lab.run_all(xmpp.nodes, "stat -c '%U:%a' /var/lib/ejabberd/.erlang.cookie && md5sum "
                                  "< /var/lib/ejabberd/.erlang.cookie")
    sums = set()
    for host, r in res.items():
        owner, digest = r.stdout.split("\n", 1)
        assert owner == "ejabberd:400"
        sums.add(digest.strip())
    assert len(sums) == 1, "the nodes must share one cookie"


def test_users_log_in_over_starttls_at_the_vip_and_messages_cross_the_cluster(lab, xmpp):
    vip = chat(lab, xmpp, [xmpp.vip, xmpp.vip])
    for login in vip["logins"]:
        assert login["status"] == "ok" and login["tls"], login
        assert xmpp.domain in login["peer"]
    # alice on the first node, bob on the second: the message crosses the cluster.
    a, b = (str(xmpp.inv.hosts[h].addresses[xmpp.vip_network]) for h in xmpp.nodes[:2])
    body = f"hello bob {uuid.uuid4().hex[:6]}"
    out = chat(lab, xmpp, [a, b], message=body)
    assert [l["status"] for l in out["logins"]] == ["ok", "ok"], out
    assert out["received"] == [body]


def test_an_unknown_ca_fails_the_login(lab, xmpp):
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "not the site CA")])
    now = __import__("datetime").datetime.now(__import__("datetime").timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(1).not_valid_before(now).not_valid_after(now.replace(year=now.year + 1))
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .sign(key, hashes.SHA256()))
    other = xmpp.folder / "other-ca.crt"
    other.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    out = chat(lab, xmpp, [xmpp.vip], ca=other)
    assert out["logins"][0]["status"] != "ok", out


def test_users_are_rows_in_postgresql(lab, xmpp):
    users = lab.run(xmpp.primary, f"{PSQL} -d {postgres.DB} -c 'SELECT username FROM users'",
                    check=True).stdout.split()
    assert {"alice", "bob"} <= set(users)
    # and the replica has them too
    for replica in xmpp.replicas:
        assert {"alice", "bob"} <= set(lab.run(replica, f"{PSQL} -d {postgres.DB} -c 'SELECT username FROM users'",
                                               check=True).stdout.split())


@pytest.mark.parametrize("args, error", [
    (["mallory@example.org", "--password", "pw"], "is not served here"),
    (["bad user", "--password", "pw"], "not a valid JID"),
    (["carol", "--password", ""], "empty password refused"),
    (["alice", "--password", "other"], "already registered"),
])
def test_bad_input_is_refused_and_changes_nothing(lab, xmpp, args, error):
    before = lab.run(xmpp.primary, f"{PSQL} -d {postgres.DB} -c 'SELECT username, password FROM users ORDER BY 1'",
                     check=True).stdout
    out = lab.invoke("ejabberd.register-user", *args)
    assert out.returncode == 1 and error in out.stdout + out.stderr, out.stdout + out.stderr
    assert "Traceback" not in out.stdout + out.stderr
    after = lab.run(xmpp.primary, f"{PSQL} -d {postgres.DB} -c 'SELECT username, password FROM users ORDER BY 1'",
                    check=True).stdout
    assert before == after


def test_replica_task_refuses_a_host_outside_the_role(lab, xmpp):
    out = lab.invoke("postgres.replica", xmpp.nodes[0])
    assert out.returncode == 1 and "not role postgres_replica" in out.stdout + out.stderr
    assert "Traceback" not in out.stdout + out.stderr


def test_cluster_status_shows_nodes_vip_and_sessions(lab, xmpp):
    out = lab.invoke("ejabberd.cluster-status")
    ok(out)
    holder = lab.vip_holders("xmpp")
    assert len(holder) == 1
    assert f"holds the VIP {xmpp.vip}" in out.stdout
    for host in xmpp.nodes:
        assert f"{ejabberd.node_name(host)} running" in out.stdout


# --- admins, MUC, MQTT ------------------------------------------------------------------------


def logins(lab, x, clients: list[dict]) -> list[dict]:
    """Each of ``clients`` ({"jid", "password", "host"}) logs in over STARTTLS (the site CA verified)."""
    spec = {"ca": str(x.ca), "timeout": 20, "message": None, "clients": clients}
    return in_netns(lab, x.gateway, CLIENT.read_text(), json.dumps(spec))["logins"]


def test_admins_log_in_with_their_generated_passwords(lab, xmpp):
    admins = ejabberd.local_admins(xmpp.inv)
    assert admins, "the lab inventory names no admin of the XMPP domain"
    for local in admins:
        jid, key = f"{local}@{xmpp.domain}", ejabberd.admin_secret(local)
        password = xmpp.secrets.require(key)
        good, bad = logins(lab, xmpp, [{"jid": jid, "password": password, "host": xmpp.vip},
                                       {"jid": jid, "password": password + "x", "host": xmpp.vip}])
        assert good["status"] == "ok" and good["tls"], good
        assert bad["status"] != "ok", bad
        # the task says where the password is, not what it is
        out = lab.invoke("ejabberd.admin-password", local)
        ok(out)
        assert f"{jid}: the password is in {xmpp.secrets.path}, key {key}" in out.stdout
        assert password not in out.stdout + out.stderr
    out = lab.invoke("ejabberd.admin-password", "alice")
    assert out.returncode == 1 and "'alice' is not an admin of this site" in out.stdout + out.stderr
    assert "Traceback" not in out.stdout + out.stderr


MUC_CLIENT = textwrap.dedent("""\
    import asyncio, json, logging, sys
    from pathlib import Path
    import slixmpp
    from slixmpp import JID

    logging.basicConfig(level=logging.CRITICAL)
    spec = json.load(sys.stdin)
    ROOM, TIMEOUT = spec["room"], float(spec["timeout"])


    async def login(c):
        client = slixmpp.ClientXMPP(c["jid"], c["password"])
        for plugin in ("xep_0030", "xep_0004", "xep_0045"):
            client.register_plugin(plugin)
        client.ca_certs = Path(spec["ca"])
        client.enable_direct_tls, client.enable_starttls, client.enable_plaintext = False, True, False
        result = asyncio.get_running_loop().create_future()

        def done(status):
            if not result.done():
                result.set_result(status)

        async def started(_event):
            client.send_presence()
            await client.get_roster()
            done("ok")

        client.add_event_handler("session_start", started)
        client.add_event_handler("failed_auth", lambda _e: done("authentication failed"))
        client.add_event_handler("ssl_invalid_chain", lambda e: done(f"invalid certificate: {e}"))
        client.add_event_handler("connection_failed", lambda e: done(f"connection failed: {e}"))
        client.connect(c["host"], c.get("port", 5222))
        status = await asyncio.wait_for(result, TIMEOUT)
        if status != "ok":
            raise RuntimeError(f"{c['jid']} at {c['host']}: {status}")
        return client


    async def join(client, nick):
        muc = client.plugin["xep_0045"]
        joined = asyncio.get_running_loop().create_future()

        def self_presence(pr):
            if not joined.done():
                joined.set_result(pr)

        client.add_event_handler(f"muc::{ROOM}::self-presence", self_presence)
        client.add_event_handler(f"muc::{ROOM}::presence-error", self_presence)
        muc.rooms[None][JID(ROOM)] = {}
        muc.our_nicks[None][JID(ROOM)] = nick
        muc.make_join_stanza(JID(ROOM), nick, maxstanzas=0).send()
        pr = await asyncio.wait_for(joined, TIMEOUT)
        if pr["type"] == "error":
            raise RuntimeError(f"{nick} cannot join {ROOM}: {pr['error']['condition']}")
        return sorted(pr["muc"]["status_codes"])


    async def main():
        out = {}
        owner = await login(spec["clients"][0])
        muc = owner.plugin["xep_0045"]
        out["owner_codes"] = await join(owner, "alice")  # 201: the room was created
        if spec["action"] == "destroy":
            await muc.destroy(ROOM, reason="test done", timeout=TIMEOUT)
            out["destroyed"] = True
            owner.disconnect()
            return out
        # The owner's configuration (also what unlocks a new room): persistent.
        form = owner.plugin["xep_0004"].make_form(ftype="submit")
        form.add_field(var="FORM_TYPE", ftype="hidden", value="http://jabber.org/protocol/muc#roomconfig")
        form.add_field(var="muc#roomconfig_persistentroom", ftype="boolean", value=True)
        await muc.set_room_config(ROOM, form, timeout=TIMEOUT)
        config = await muc.get_room_config(ROOM, timeout=TIMEOUT)
        out["persistent"] = config.get_values().get("muc#roomconfig_persistentroom")
        member = await login(spec["clients"][1])
        inbox = asyncio.Queue()

        def groupchat(msg):
            if msg["type"] == "groupchat" and msg["body"] and msg["from"].bare == ROOM \\
                    and msg.get_plugin("delay", check=True) is None:
                inbox.put_nowait({"from": msg["from"].resource, "body": str(msg["body"])})

        member.add_event_handler("groupchat_message", groupchat)
        out["member_codes"] = await join(member, "bob")
        owner.send_message(mto=JID(ROOM), mbody=spec["message"], mtype="groupchat")
        try:
            out["received"] = [await asyncio.wait_for(inbox.get(), TIMEOUT)]
        except asyncio.TimeoutError:
            out["received"] = []
        for client, nick in ((member, "bob"), (owner, "alice")):
            muc_of = client.plugin["xep_0045"]
            muc_of.leave_muc(JID(ROOM), nick)
        await asyncio.sleep(0.5)
        member.disconnect()
        owner.disconnect()
        await asyncio.sleep(0.5)
        return out


    try:
        result = asyncio.run(main())
    except Exception as exc:
        result = {"error": f"{type(exc).__name__}: {exc}"}
    print(json.dumps(result))
""")


def muc(lab, x, hosts: list[str], room: str, action: str, message: str = "") -> dict:
    spec = {"ca": str(x.ca), "timeout": 20, "room": room, "action": action, "message": message,
            "clients": [{"jid": f"{u}@{x.domain}", "password": x.users[u], "host": h}
                        for u, h in zip(("alice", "bob"), hosts)]}
    out = in_netns(lab, x.gateway, MUC_CLIENT, json.dumps(spec))
    assert "error" not in out, out
    return out


def muc_rooms(lab, x) -> set[str]:
    rows = lab.run(x.primary, f"{PSQL} -d {postgres.DB} -c \"SELECT name || '@' || host FROM muc_room\"",
                   check=True).stdout.split()
    return set(rows)


def test_two_users_chat_in_a_persistent_room_on_the_conference_service(lab, xmpp):
    room = f"test-{uuid.uuid4().hex[:8]}@{ejabberd.muc_host(xmpp.domain)}"
    # alice on the first node, bob on the second: the room's messages cross the cluster
    a, b = (str(xmpp.inv.hosts[h].addresses[xmpp.vip_network]) for h in xmpp.nodes[:2])
    body = f"hello room {uuid.uuid4().hex[:6]}"
    try:
        out = muc(lab, xmpp, [a, b], room, "chat", body)
        assert 201 in out["owner_codes"] and 110 in out["owner_codes"], out  # alice created it
        assert 110 in out["member_codes"], out
        assert out["persistent"] is True, out
        assert out["received"] == [{"from": "alice", "body": body}], out
        # persistent, and stored in PostgreSQL: still there after everyone left
        assert room in muc_rooms(lab, xmpp)
    finally:
        out = muc(lab, xmpp, [a, b], room, "destroy")
        assert out.get("destroyed") is True, out
    assert room not in muc_rooms(lab, xmpp)


MQTT_PROBE = textwrap.dedent("""\
    import json, socket, ssl, struct, sys

    a = json.load(sys.stdin)


    def string(s):
        data = s.encode()
        return struct.pack("!H", len(data)) + data


    def connect_packet(client_id, user, password):
        # MQTT 3.1.1: protocol "MQTT" level 4, flags user name + password + clean session, keep-alive 30 s
        variable = string("MQTT") + bytes([4, 0xC2]) + struct.pack("!H", 30)
        body = variable + string(client_id) + string(user) + string(password)
        length, n = b"", len(body)
        while True:
            byte, n = n % 128, n // 128
            length += bytes([byte | (0x80 if n else 0)])
            if not n:
                break
        return bytes([0x10]) + length + body


    def read_exactly(sock, n):
        data = b""
        while len(data) < n:
            chunk = sock.recv(n - len(data))
            if not chunk:
                break
            data += chunk
        return data


    def attempt(password, tls):
        out = {"tls": tls}
        try:
            raw = socket.create_connection((a["host"], a["port"]), timeout=a["timeout"])
            raw.settimeout(a["timeout"])
            sock = raw
            if tls:
                ctx = ssl.create_default_context(cafile=a["ca"])
                sock = ctx.wrap_socket(raw, server_hostname=a["server_name"])
                cert = sock.getpeercert()
                out["peer"] = [v for kind, v in cert.get("subjectAltName", ()) if kind == "DNS"]
            sock.sendall(connect_packet(a["client_id"], a["user"], password))
            reply = read_exactly(sock, 4)
            out["connack"] = list(reply)
            if len(reply) == 4 and reply[0] == 0x20 and reply[1] == 2:
                out["code"] = reply[3]
                if reply[3] == 0:
                    sock.sendall(bytes([0xE0, 0]))  # DISCONNECT
            sock.close()
        except (OSError, ssl.SSLError) as exc:
            out["error"] = f"{type(exc).__name__}: {exc}"
        return out


    print(json.dumps({
        "good": attempt(a["password"], True),
        "wrong": attempt(a["password"] + "-wrong", True),
        "plain": attempt(a["password"] + "-wrong", False),  # never the real password in clear
    }))
""")


def test_mqtt_over_tls_at_the_vip_accepts_users_and_refuses_a_wrong_password(lab, xmpp):
    args = {"host": xmpp.vip, "port": 1883, "ca": str(xmpp.ca), "server_name": xmpp.domain, "timeout": 15,
            "client_id": f"hastack-{uuid.uuid4().hex[:8]}", "user": f"alice@{xmpp.domain}",
            "password": xmpp.users["alice"]}
    out = in_netns(lab, xmpp.gateway, MQTT_PROBE, json.dumps(args))
    good, wrong, plain = out["good"], out["wrong"], out["plain"]
    assert good.get("code") == 0, out  # CONNACK: connection accepted
    assert xmpp.domain in good["peer"], out
    # refused: CONNACK 4 (bad user name or password) / 5 (not authorized), never 0
    assert wrong.get("code") in (4, 5), out
    # the port speaks TLS only: a plaintext CONNECT gets no CONNACK
    assert "code" not in plain, out


# --- faults ----------------------------------------------------------------------------------


def test_vip_follows_ejabberd_and_the_node_rejoins(lab, xmpp):
    holders = wait_for(lambda: lab.vip_holders("xmpp"), 30, "a node to hold the VIP")
    assert len(holders) == 1
    down = holders[0]
    lab.run(down, "systemctl stop ejabberd", check=True, timeout=120)
    try:
        def elsewhere():
            holders = lab.vip_holders("xmpp")
            return None if down in holders else holders

        moved = wait_for(elsewhere, 30, f"the VIP to leave {down}")
        assert len(moved) == 1
        body = f"after failover {uuid.uuid4().hex[:6]}"
        out = chat(lab, xmpp, [xmpp.vip, xmpp.vip], message=body)
        assert [l["status"] for l in out["logins"]] == ["ok", "ok"], out
        assert out["received"] == [body]
    finally:
        lab.run(down, "systemctl start ejabberd", timeout=150)
        wait_started(lab, down)
    want = {ejabberd.node_name(h) for h in xmpp.nodes}
    for host in xmpp.nodes:
        wait_for(lambda: cluster_of(lab, host) == want, 60, f"{host} to list the whole cluster")
    wait_for(lambda: lab.run(down, "/usr/local/lib/hastack/check-ejabberd").returncode == 0, 30,
             f"the health check on {down} to pass again")


def test_ops_refuse_when_no_node_answers(lab, xmpp):
    lab.run_all(xmpp.nodes, "systemctl stop ejabberd", timeout=120)
    try:
        out = lab.invoke("ejabberd.register-user", "dave", "--password", "pw-of-dave")
        assert out.returncode == 1 and "no ejabberd node answers" in out.stdout + out.stderr, out.stdout
    finally:
        lab.run_all(xmpp.nodes, "systemctl start ejabberd", timeout=150)
        for host in xmpp.nodes:
            wait_started(lab, host)
    users = lab.run(xmpp.primary, f"{PSQL} -d {postgres.DB} -c 'SELECT username FROM users'", check=True).stdout
    assert "dave" not in users.split()
    want = {ejabberd.node_name(h) for h in xmpp.nodes}
    for host in xmpp.nodes:
        wait_for(lambda: cluster_of(lab, host) == want, 60, f"{host} to list the whole cluster")
    wait_for(lambda: len(lab.vip_holders("xmpp")) == 1, 30, "one node to hold the VIP again")


# --- idempotence (last) --------------------------------------------------------------------------


def test_second_deploy_changes_nothing(lab, xmpp):
    # The system identifier says it is the same cluster; the postmaster's start
    # time that it was neither rebuilt nor restarted.
    ident = "SELECT system_identifier || ' ' || pg_postmaster_start_time() FROM pg_control_system()"
    sysid = {r: lab.run(r, f'{PSQL} -c "{ident}"', check=True).stdout.strip() for r in xmpp.replicas}
    clusters = {h: cluster_of(lab, h) for h in xmpp.nodes}
    out = lab.invoke("deploy.xmpp")
    ok(out)
    _, changed, failed = recap(out)
    assert (changed, failed) == (0, 0), out.stdout[-4000:]
    assert "pg_basebackup" not in out.stdout and "join_cluster" not in out.stdout
    for r in xmpp.replicas:
        assert lab.run(r, f'{PSQL} -c "{ident}"', check=True).stdout.strip() == sysid[r]
    assert {h: cluster_of(lab, h) for h in xmpp.nodes} == clusters
