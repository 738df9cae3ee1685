"""Mail back ends on real lab hosts (issue 7, the mail tier): after the common
tiers, Galera and the database proxy, `inv mail.deploy`; then prove with real
clients (run inside a client host's network namespace, from a local network
the firewall admits) that
- mailboxes made by `inv mail.add-mailbox` exchange mail: smtplib submits on
  587 (STARTTLS with the certificate verified against the site CA, AUTH), to a
  mailbox and to an alias, and imaplib (STARTTLS on 143 and IMAPS on 993, both
  verified) sees it arrive; a changed password works at once;
- AUTH is not offered before STARTTLS; an unknown CA fails the TLS handshake;
- unauthenticated relay to a foreign domain is refused on 25 and 587;
- Postfixadmin answers over HTTPS and its setup page is not served; every
  table of its schema has a primary key (Galera);
- bad input to the ops tasks is refused with a clear message, nothing changed;
- failover: with the back end holding the mail VIP in standby, mail is
  submitted and read on the VIP again (the seconds are printed);
- a second `inv mail.deploy` changes nothing.

Clients connect to the mail VIP when a back end holds it (the cluster tier
ran), otherwise to the first back end's address on the VIP's network. Hosts
and addresses come from the inventory: this runs against any lab inventory
with a mail cluster.
"""

from __future__ import annotations

import datetime
import json
import os
import subprocess
import sys
import time
import uuid
from pathlib import Path
from types import SimpleNamespace

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from fabfile import mail
from fabfile.core import topology
from fabfile.core.secrets import token
from tests.lab.labhost import INV_BIN, recap

pytestmark = pytest.mark.lab

CLIENT = Path(__file__).with_name("mail_client.py")


def ok(out) -> None:
    assert out.returncode == 0, f"{out.args}\n{out.stdout[-5000:]}\n{out.stderr[-3000:]}"


@pytest.fixture(scope="module")
def m(lab, tmp_path_factory):
    inv = lab.inv
    if inv.mail is None:
        pytest.skip("the lab inventory has no mail cluster")
    backends = inv.with_role("mail_backend")
    ok(lab.invoke("deploy.common", "--hosts", ",".join(inv.with_role("galera", "mail_backend"))))
    for tier in ("pxc.deploy", "dbproxy.deploy", "mail.deploy"):
        ok(lab.invoke(tier))
    vip = inv.vips["mail"]
    client = next(h for h in inv.with_role("webmail") + list(inv.hosts)
                  if vip.network in inv.hosts[h].addresses and h not in backends)
    target = str(vip.address) if lab.vip_holders("mail") else lab.address(backends[0], vip.network)
    folder = tmp_path_factory.mktemp("mail")
    ca = folder / "ca.crt"
    ok(lab.invoke("pki.export-ca", "--path", str(ca)))
    tag = uuid.uuid4().hex[:8]
    domain = inv.mail.domain
    users = {f"t{tag}a@{domain}": token(16), f"t{tag}b@{domain}": token(16)}
    for address, password in users.items():
        ok(lab.invoke("mail.add-mailbox", address, "--password", password))
    alias = f"t{tag}list@{domain}"
    ok(lab.invoke("mail.add-alias", alias, ",".join(users)))
    return SimpleNamespace(inv=inv, backends=backends, client=client, target=target, ca=ca, tag=tag,
                           domain=domain, users=users, alias=alias, a=next(iter(users)), b=list(users)[1])


def client(lab, m, spec: dict, *, check: bool = True) -> dict | subprocess.CompletedProcess:
    spec = {"host": m.target, "ca": str(m.ca), "timeout": 60, **spec}
    out = subprocess.run(["ip", "netns", "exec", lab.plan.netns(m.client), sys.executable, str(CLIENT)],
                         input=json.dumps(spec), capture_output=True, text=True, timeout=300, check=False)
    if not check:
        return out
    assert out.returncode == 0, f"mail client in {m.client} failed:\n{out.stdout[-3000:]}\n{out.stderr[-3000:]}"
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_submission_to_a_mailbox_and_an_alias_arrives_over_imap(lab, m):
    for to, reader in ((m.b, m.b), (m.alias, m.a)):
        subject = f"hastack {m.tag} to {to}"
        r = client(lab, m, {
            "submit": {"from": m.a, "password": m.users[m.a], "to": to, "subject": subject},
            "fetch": {"user": reader, "password": m.users[reader], "subject": subject, "wait": 60},
        })
        print(f"{m.a} -> {to}: submitted in {r['submit_seconds']}s over {r['tls_version']}, "
              f"seen by {reader}: {r['found']}")
        assert r["submitted"]
        assert r["auth_before_tls"] is False
        assert r["found"] == {"imap_starttls": 1, "imaps": 1}


def test_unauthenticated_relay_is_refused(lab, m):
    r = client(lab, m, {"relay": {"from": "someone@example.com", "to": "victim@example.net"}})
    for port, (mail_code, rcpt_code, text) in r["relay"].items():
        assert rcpt_code >= 500, f"port {port} accepted a foreign recipient: {rcpt_code} {text}"


def _other_ca(path: Path) -> None:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "not the site CA")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(now)
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .sign(key, hashes.SHA256()))
    path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))


def test_an_unknown_ca_fails_the_handshake(lab, m, tmp_path):
    other = tmp_path / "other-ca.crt"
    _other_ca(other)
    out = client(lab, m, {"ca": str(other), "submit": {"from": m.a, "password": m.users[m.a], "to": m.b,
                                                        "subject": "never"}}, check=False)
    assert out.returncode != 0 and "CERTIFICATE_VERIFY_FAILED" in out.stderr, out.stderr[-2000:]


def test_set_password_takes_effect(lab, m):
    new = token(16)
    ok(lab.invoke("mail.set-password", m.b, "--password", new))
    m.users[m.b] = new
    subject = f"hastack {m.tag} after the password change"
    r = client(lab, m, {
        "submit": {"from": m.b, "password": new, "to": m.b, "subject": subject},
        "fetch": {"user": m.b, "password": new, "subject": subject, "wait": 60},
    })
    assert r["found"]["imaps"] == 1


def test_mail_answers_on_the_vip_after_standby(lab, m):
    active = next(iter(lab.vip_holders("mail")), None)
    if active is None:
        pytest.skip("no back end holds the mail VIP: the cluster tier has not run")
    subject = f"hastack {m.tag} after failover"
    spec = {"timeout": 5, "submit": {"from": m.a, "password": m.users[m.a], "to": m.b, "subject": subject},
            "fetch": {"user": m.b, "password": m.users[m.b], "subject": subject, "wait": 30}}
    t0 = time.monotonic()
    ok(lab.invoke("cluster.standby", active))
    try:
        while True:
            out = client(lab, m, spec, check=False)
            if out.returncode == 0:
                break
            assert time.monotonic() - t0 < 180, f"no mail on the VIP 180 s after standby:\n{out.stderr[-2000:]}"
            time.sleep(0.5)
        seconds = time.monotonic() - t0
        new = lab.vip_holders("mail")
        print(f"\nstandby of {active}: SMTP submission and IMAP on the VIP ({', '.join(new)}) again "
              f"after {seconds:.1f}s")
        assert len(new) == 1 and new != [active], new
        found = json.loads(out.stdout.strip().splitlines()[-1])["found"]  # a retried submit may land twice
        assert set(found) == {"imap_starttls", "imaps"} and min(found.values()) >= 1, found
    finally:
        ok(lab.invoke("cluster.unstandby", active))


def test_postfixadmin_serves_but_not_its_setup_page(lab, m):
    target = lab.address(m.backends[0], m.inv.vips["mail"].network)
    r = client(lab, m, {"host": target, "http": ["/login.php", "/setup.php"]})
    assert r["http"] == {"/login.php": 200, "/setup.php": 404}


def test_every_postfixadmin_table_has_a_primary_key(lab, m):
    h = m.backends[0]
    db = next(c for c in (mail.client(a) for a in topology.db_proxy_addresses(m.inv, h))
              if lab.run(h, f"{c} -e 'SELECT 1'").returncode == 0)
    tables = lab.run(h, f"{db} -e 'SHOW TABLES'", check=True).stdout.split()
    assert {"domain", "mailbox", "alias", "admin", "domain_admins", "log", "config"} <= set(tables)
    no_pk = lab.run(h, f"{db} -e \"{mail.NO_PK_SQL}\"", check=True).stdout.split()
    assert no_pk == []
    admins = lab.run(h, f"{db} -e \"SELECT username FROM admin WHERE superadmin = 1\"",
                     check=True).stdout.split()
    assert f"admin@{m.domain}" in admins


def listing(lab) -> list[str]:
    out = lab.invoke("mail.list")
    ok(out)
    return [x for x in out.stdout.splitlines() if x.startswith(("domain ", "mailbox ", "alias "))]


@pytest.mark.parametrize("args, error", [
    (["mail.add-mailbox", "x@not-added.example", "--password", "long-enough-1"], "is not served here"),
    (["mail.add-mailbox", "bad..address@{domain}", "--password", "long-enough-1"], "before '@'"),
    (["mail.add-mailbox", "no-at-sign", "--password", "long-enough-1"], "not an e-mail address"),
    (["mail.add-mailbox", "{a}", "--password", "long-enough-1"], "exists already"),
    (["mail.add-alias", "x@not-added.example", "{a}"], "is not served here"),
    (["mail.add-domain", "{domain}"], "exists already"),
    (["mail.set-password", "nobody{tag}@{domain}", "--password", "long-enough-1"], "no mailbox"),
])
def test_bad_input_is_refused_and_changes_nothing(lab, m, args, error):
    if not hasattr(m, "listing"):  # nothing else changes the rows between these cases
        m.listing = listing(lab)
        assert f"mailbox {m.a}" in m.listing and f"alias   {m.alias} -> {','.join(m.users)}" in m.listing
    args = [a.format(domain=m.domain, a=m.a, tag=m.tag) for a in args]
    out = lab.invoke(*args)
    assert out.returncode == 1, out.stdout[-2000:]
    assert error in out.stderr + out.stdout
    assert "Traceback" not in out.stderr
    assert listing(lab) == m.listing


def test_add_mailbox_without_password_or_terminal_is_refused(lab, m):
    env = {**os.environ, "INVOKE_INVENTORY": str(m.inv.path)}
    out = subprocess.run([str(INV_BIN), "mail.add-mailbox", f"new{m.tag}@{m.domain}"], stdin=subprocess.DEVNULL,
                         capture_output=True, text=True, timeout=300, env=env, check=False, cwd=Path(__file__).parents[2])
    assert out.returncode == 1 and "no password given" in out.stdout + out.stderr, out.stdout[-2000:]
    assert f"new{m.tag}@" not in lab.invoke("mail.list").stdout


def test_second_deploy_changes_nothing(lab, m):
    out = lab.invoke("mail.deploy")
    ok(out)
    _, changed, failed = recap(out)
    assert (changed, failed) == (0, 0), out.stdout[-4000:]


# --- issue 12: postmaster@/abuse@ aliases, ManageSieve for the webmail front ends ----------


def test_postmaster_and_abuse_reach_the_mailbox_the_inventory_names(lab, m):
    box = m.inv.mail.postmaster_address
    if box is None or not box.endswith(f"@{m.domain}"):
        pytest.skip("mail.postmaster is not a mailbox of the mail domain in this inventory")
    rows = listing(lab)
    for role in ("postmaster", "abuse"):
        assert f"alias   {role}@{m.domain} -> {box}" in rows, rows
    password = token(16)  # the mailbox may be left from an earlier run: give it a known password
    ok(lab.invoke("mail.set-password" if f"mailbox {box}" in rows else "mail.add-mailbox", box, "--password", password))
    for role in ("postmaster", "abuse"):
        subject = f"hastack {m.tag} to {role}@"
        r = client(lab, m, {
            "submit": {"from": m.a, "password": m.users[m.a], "to": f"{role}@{m.domain}", "subject": subject},
            "fetch": {"user": box, "password": password, "subject": subject, "wait": 60},
        })
        assert r["submitted"] and r["found"] == {"imap_starttls": 1, "imaps": 1}, r


# ManageSieve (RFC 5804) by hand: greeting, STARTTLS verified against the site CA
# for the mail name, the capabilities again; JSON out.
SIEVE_PROBE = r'''
import json, socket, ssl, sys
spec = json.load(sys.stdin)
try:
    sock = socket.create_connection((spec["host"], 4190), timeout=spec["timeout"])
except OSError as exc:
    print(json.dumps({"connect": type(exc).__name__}))
    sys.exit(0)
def caps(f):
    lines = []
    while not (lines and lines[-1].startswith(("OK", "NO", "BYE"))):
        lines.append(f.readline().decode().rstrip("\r\n"))
    return lines
before = caps(sock.makefile("rb"))
sock.sendall(b"STARTTLS\r\n")
reply = sock.makefile("rb").readline().decode().strip()
tls = ssl.create_default_context(cafile=spec["ca"]).wrap_socket(sock, server_hostname=spec["name"])
after = caps(tls.makefile("rb"))
tls.sendall(b"LOGOUT\r\n")
print(json.dumps({"connect": "ok", "before": before, "starttls": reply, "tls": tls.version(), "after": after}))
'''


def _sieve_probe(lab, m, host: str) -> dict:
    spec = {"host": str(m.inv.vips["mail"].address), "name": m.inv.vips["mail"].names[0], "ca": str(m.ca),
            "timeout": 5}
    out = subprocess.run(["ip", "netns", "exec", lab.plan.netns(host), sys.executable, "-c", SIEVE_PROBE],
                         input=json.dumps(spec), capture_output=True, text=True, timeout=60, check=False)
    assert out.returncode == 0, f"ManageSieve probe from {host} failed:\n{out.stderr[-3000:]}"
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_managesieve_on_the_vip_for_the_webmail_hosts_only(lab, m):
    if not lab.vip_holders("mail") or not m.inv.vips["mail"].names:
        pytest.skip("no back end holds the mail VIP (the cluster tier has not run) or it has no name")
    for host in m.inv.with_role("webmail"):
        r = _sieve_probe(lab, m, host)
        assert r["connect"] == "ok" and '"STARTTLS"' in r["before"], r
        assert not any(line.startswith('"SASL"') and "PLAIN" in line for line in r["before"]), r
        assert r["starttls"].startswith("OK") and r["tls"] in ("TLSv1.2", "TLSv1.3"), r
        assert any(line.startswith('"SASL"') and "PLAIN" in line for line in r["after"]), r
    others = [h for h in m.inv.with_role("galera") if m.inv.vips["mail"].network in m.inv.hosts[h].addresses]
    if not others:
        pytest.skip("no Galera host on the mail VIP's network to try from")
    r = _sieve_probe(lab, m, others[0])
    assert r["connect"] in ("TimeoutError", "ConnectionRefusedError"), f"{others[0]} reached ManageSieve: {r}"
