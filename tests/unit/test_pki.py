"""PKI tier without SSH: the CA, the names each host's certificate carries,
openssl's verdict on the issued certificates, the re-issue decision, and the
per-host runbook against a small fake host (canned state in, commands out)."""

from __future__ import annotations

import datetime as dt
import hashlib
import re
import shutil
import stat
import subprocess
from pathlib import Path
from types import SimpleNamespace

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from invoke import Collection, Config, Context

from fabfile import pki
from fabfile.core import HostFailed
from fabfile.core.errors import UserError
from fabfile.core.inventory import load
from fabfile.core.remote import Result
from fabfile.core.secrets import Secrets
from fabfile.core.testing import RecordingRun

ROOT = Path(__file__).resolve().parents[2]
LAB = ROOT / "inventory" / "lab.yml"
NOW = dt.datetime.now(dt.timezone.utc)
OPENSSL = shutil.which("openssl")
needs_openssl = pytest.mark.skipif(OPENSSL is None, reason="openssl not installed")


@pytest.fixture(scope="module")
def inv():
    return load(LAB)


@pytest.fixture(scope="module")
def ca(tmp_path_factory):
    secrets = Secrets(tmp_path_factory.mktemp("ca") / "lab.secrets.yml")
    return pki.load_ca(secrets, "lab", create=True)[0]


@pytest.fixture(scope="module")
def other_ca(tmp_path_factory):
    secrets = Secrets(tmp_path_factory.mktemp("other") / "lab.secrets.yml")
    return pki.load_ca(secrets, "lab", create=True)[0]


def new_key():
    return ec.generate_private_key(ec.SECP256R1())


def pem(obj) -> str:
    if isinstance(obj, x509.Certificate):
        return obj.public_bytes(serialization.Encoding.PEM).decode()
    if isinstance(obj, ec.EllipticCurvePrivateKey):
        return obj.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                 serialization.NoEncryption()).decode()
    return obj.public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo).decode()


def expected_sans(inv, host):
    """Independent statement of what a host answers on (the issue's wording)."""
    h = inv.hosts[host]
    dns = {host, f"{host}.{inv.site.domain}"}
    ips = {str(a) for a in h.addresses.values()}
    for vip in inv.vips.values():
        if vip.role in h.roles:
            ips.add(str(vip.address))
            dns |= set(vip.names)
    if "ejabberd" in h.roles and inv.xmpp:
        dns.add(inv.xmpp.domain)
        dns |= {f"conference.{inv.xmpp.domain}", f"pubsub.{inv.xmpp.domain}"}  # MUC and pubsub, for s2s
    return dns, ips


# --- the CA --------------------------------------------------------------------------


def test_ca_is_made_once_and_reused(tmp_path):
    path = tmp_path / "lab.secrets.yml"
    first, created = pki.load_ca(Secrets(path), "lab", create=True)
    assert created
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    again, created_again = pki.load_ca(Secrets(path), "lab", create=True)
    assert not created_again
    assert again.cert_pem == first.cert_pem
    assert pem(again.key) == pem(first.key)
    stored = Secrets(path)
    assert "BEGIN PRIVATE KEY" in stored.get(pki.CA_KEY_SECRET, generate=lambda: pytest.fail("regenerated"))
    assert stored.get(pki.CA_CERT_SECRET, generate=lambda: pytest.fail("regenerated")) == first.cert_pem


def test_ca_certificate_properties(ca):
    cert = ca.cert
    assert cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == "lab hastack CA"
    assert cert.issuer == cert.subject
    bc = cert.extensions.get_extension_for_class(x509.BasicConstraints)
    assert bc.critical and bc.value.ca and bc.value.path_length == 0
    ku = cert.extensions.get_extension_for_class(x509.KeyUsage).value
    assert ku.key_cert_sign and ku.crl_sign and not ku.digital_signature
    assert isinstance(ca.key, ec.EllipticCurvePrivateKey) and ca.key.curve.name == "secp256r1"
    life = cert.not_valid_after_utc - cert.not_valid_before_utc
    assert dt.timedelta(days=3640) < life < dt.timedelta(days=3660)
    # the clock now, not at import: a long session (the lab tests first) runs this much later
    assert cert.not_valid_before_utc < dt.datetime.now(dt.timezone.utc) - dt.timedelta(minutes=30), \
        "backdated for clock skew"


def test_issue_without_ca_names_the_fix(tmp_path):
    with pytest.raises(UserError, match=r"lab.secrets.yml: the site has no CA yet .* run `inv pki.init` first"):
        pki.load_ca(Secrets(tmp_path / "lab.secrets.yml"), "lab", create=False)
    assert not (tmp_path / "lab.secrets.yml").exists()


def test_check_mode_ca_is_not_stored(tmp_path):
    path = tmp_path / "lab.secrets.yml"
    _, created = pki.load_ca(Secrets(path, persist=False), "lab", create=True)
    assert created and not path.exists()


def test_mismatched_ca_key_and_cert_are_refused(tmp_path, other_ca):
    path = tmp_path / "lab.secrets.yml"
    s = Secrets(path)
    s.get(pki.CA_KEY_SECRET, generate=pki.new_ca_key_pem)
    s.get(pki.CA_CERT_SECRET, generate=lambda: other_ca.cert_pem)
    with pytest.raises(UserError, match="the CA certificate does not belong to the CA key"):
        pki.load_ca(Secrets(path), "lab", create=True)


# --- names and addresses ------------------------------------------------------------


def test_sans_of_every_lab_host_are_names_addresses_and_vips(inv, ca):
    for host in inv.hosts:
        dns, ips = expected_sans(inv, host)
        cert = pki.sign_host_cert(ca, new_key().public_key(), inv.fqdn(host), pki.Sans.for_host(inv, host))
        have = pki.Sans.of(cert)
        assert have.dns == dns, host
        assert have.ips == ips, host


def test_sans_spelled_out_for_vip_carriers(inv):
    assert pki.Sans.for_host(inv, "postfix01") == pki.Sans(
        frozenset({"postfix01", "postfix01.lab.test", "mail.lab.test"}),
        frozenset({"10.200.0.113", "10.200.11.113", "10.200.11.110", "10.200.11.116"}),
    )
    assert pki.Sans.for_host(inv, "e2server") == pki.Sans(
        frozenset({"e2server", "e2server.lab.test", "xmpp.lab.test", "conference.xmpp.lab.test",
                   "pubsub.xmpp.lab.test"}),
        frozenset({"10.200.0.11", "10.200.1.3", "10.200.1.4"}),
    )
    assert pki.Sans.for_host(inv, "gw1server") == pki.Sans(
        frozenset({"gw1server", "gw1server.lab.test"}),
        frozenset({"10.200.0.14", "10.200.1.1", "10.200.1.9"}),
    )


def test_every_vip_is_served_by_each_carrier(inv):
    for name, vip in inv.vips.items():
        carriers = inv.with_role(vip.role)
        assert carriers
        for host in carriers:
            sans = pki.Sans.for_host(inv, host)
            assert str(vip.address) in sans.ips and set(vip.names) <= sans.dns, (name, host)


def test_vip_without_names_is_noted(inv):
    notes = pki.vip_notes(inv)
    assert len(notes) == 1
    assert notes[0].startswith("vip dbproxy (10.200.11.116, role mail_backend) has no DNS names")


def test_host_certificate_properties(inv, ca):
    key = new_key()
    cert = pki.sign_host_cert(ca, key.public_key(), "ngx01.lab.test", pki.Sans.for_host(inv, "ngx01"))
    assert cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == "ngx01.lab.test"
    assert not cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    now = dt.datetime.now(dt.timezone.utc)  # not NOW (import time): the session may be long by now
    assert cert.not_valid_before_utc < now - dt.timedelta(minutes=30)
    assert cert.not_valid_after_utc - now > dt.timedelta(days=800)
    other = pki.sign_host_cert(ca, key.public_key(), "ngx01.lab.test", pki.Sans.for_host(inv, "ngx01"))
    assert other.serial_number != cert.serial_number and cert.serial_number > 2**64


@needs_openssl
def test_openssl_verifies_every_host_for_every_name_and_address(inv, ca, tmp_path):
    ca_file = tmp_path / "ca.pem"
    ca_file.write_text(ca.cert_pem)
    for host in inv.hosts:
        cert_file = tmp_path / f"{host}.pem"
        cert_file.write_text(pem(pki.sign_host_cert(
            ca, new_key().public_key(), inv.fqdn(host), pki.Sans.for_host(inv, host))))
        base = [OPENSSL, "verify", "-CAfile", str(ca_file), "-purpose", "sslserver"]
        out = subprocess.run([*base, str(cert_file)], capture_output=True, text=True)
        assert out.returncode == 0 and f"{cert_file}: OK" in out.stdout, out.stdout + out.stderr
        dns, ips = expected_sans(inv, host)
        for name in dns:
            out = subprocess.run([*base, "-verify_hostname", name, str(cert_file)], capture_output=True, text=True)
            assert out.returncode == 0, f"{host} {name}: {out.stdout}{out.stderr}"
        for ip in ips:
            out = subprocess.run([*base, "-verify_ip", ip, str(cert_file)], capture_output=True, text=True)
            assert out.returncode == 0, f"{host} {ip}: {out.stdout}{out.stderr}"
        # and a name the host does not answer on is refused
        out = subprocess.run([*base, "-verify_hostname", "intruder.lab.test", str(cert_file)],
                             capture_output=True, text=True)
        assert out.returncode != 0


@needs_openssl
def test_openssl_refuses_a_certificate_from_another_ca(inv, ca, other_ca, tmp_path):
    (tmp_path / "ca.pem").write_text(ca.cert_pem)
    (tmp_path / "h.pem").write_text(pem(pki.sign_host_cert(
        other_ca, new_key().public_key(), "ngx01.lab.test", pki.Sans.for_host(inv, "ngx01"))))
    out = subprocess.run([OPENSSL, "verify", "-CAfile", str(tmp_path / "ca.pem"), str(tmp_path / "h.pem")],
                         capture_output=True, text=True)
    assert out.returncode != 0


# --- keep or re-issue ---------------------------------------------------------------


@pytest.fixture
def host_state(inv, ca):
    """A converged ngx01: key and a fresh certificate."""
    key = new_key()
    want = pki.Sans.for_host(inv, "ngx01")
    cert = pki.sign_host_cert(ca, key.public_key(), "ngx01.lab.test", want)
    return SimpleNamespace(key=key, want=want, cert=cert)


def test_valid_certificate_is_kept(ca, host_state):
    assert pki.review(pem(host_state.cert), pem(host_state.key.public_key()), ca, host_state.want) == []


def test_certificate_expiring_in_10_days_is_reissued(ca, host_state):
    old = pki.sign_host_cert(ca, host_state.key.public_key(), "ngx01.lab.test", host_state.want,
                             now=NOW - dt.timedelta(days=815))
    reasons = pki.review(pem(old), pem(host_state.key.public_key()), ca, host_state.want)
    assert len(reasons) == 1 and re.fullmatch(r"expires on \d{4}-\d\d-\d\d, within 30 days", reasons[0])
    ok = pki.sign_host_cert(ca, host_state.key.public_key(), "ngx01.lab.test", host_state.want,
                            now=NOW - dt.timedelta(days=700))
    assert pki.review(pem(ok), pem(host_state.key.public_key()), ca, host_state.want) == []


def test_expired_certificate_is_reissued(ca, host_state):
    old = pki.sign_host_cert(ca, host_state.key.public_key(), "ngx01.lab.test", host_state.want,
                             now=NOW - dt.timedelta(days=900))
    assert pki.review(pem(old), pem(host_state.key.public_key()), ca, host_state.want)[0].startswith("expired on")


def test_changed_sans_are_reissued(inv, ca, host_state):
    # the inventory gained a name and lost an address
    want = pki.Sans(host_state.want.dns | {"www.lab.test"}, host_state.want.ips - {"10.200.0.111"})
    reasons = pki.review(pem(host_state.cert), pem(host_state.key.public_key()), ca, want)
    assert reasons == ["names changed (+www.lab.test -10.200.0.111)"]


def test_certificate_from_another_ca_is_reissued(ca, other_ca, host_state):
    foreign = pki.sign_host_cert(other_ca, host_state.key.public_key(), "ngx01.lab.test", host_state.want)
    assert pki.review(pem(foreign), pem(host_state.key.public_key()), ca, host_state.want) == [
        "not signed by the current CA"]


def test_certificate_for_another_key_is_reissued(ca, host_state):
    assert pki.review(pem(host_state.cert), pem(new_key().public_key()), ca, host_state.want) == [
        "does not match the host's key"]


def test_missing_or_broken_files(ca, host_state):
    pub = pem(host_state.key.public_key())
    assert pki.review(None, pub, ca, host_state.want) == ["no certificate"]
    assert pki.review("garbage", pub, ca, host_state.want) == ["certificate unreadable"]
    assert pki.review(None, None, ca, host_state.want) == ["no usable key"]
    assert pki.review(pem(host_state.cert), None, ca, host_state.want) == ["no usable key for the certificate"]


# --- the per-host runbook against a fake host ---------------------------------------


class Shell:
    """A responder for the recording host: just enough of a Debian host's shell
    for the pki steps (files with owner:group:mode, openssl pkey/genpkey, cat,
    stat, sha256sum, chown, chmod, mv, rm, dpkg-query)."""

    def __init__(self):
        self.files: dict[str, list[str]] = {}  # path -> [content, "owner:group:mode"]
        self.trusted = False  # the CA is in the trust store (what update-ca-certificates does)

    def upload(self, host, path, text):
        self.files[path] = [text, "root:root:644"]

    def __call__(self, host, cmd, stdin):
        out = []
        for part in cmd.split(" && "):
            if part == "umask 077":
                continue
            if m := re.fullmatch(r"openssl pkey -in (\S+) -pubout 2>/dev/null; echo ==hastack-cert==; "
                                 r"cat (\S+) 2>/dev/null", part):
                pub = self(host, f"openssl pkey -in {m[1]} -pubout", None)
                crt = self(host, f"cat {m[2]}", None)
                out.append((pub.stdout if pub.ok else "") + "==hastack-cert==\n" + (crt.stdout if crt.ok else ""))
            elif part.startswith("dpkg-query"):
                out.append("".join(f"{p} installed\n" for p in pki.PACKAGES))
            elif m := re.fullmatch(r"openssl pkey -in (\S+) -pubout", part):
                content = self.files.get(m[1], [""])[0]
                if "PRIVATE KEY" not in content:
                    return Result("", "Could not read key", 1)
                key = serialization.load_pem_private_key(content.encode(), None)
                out.append(pem(key.public_key()))
            elif m := re.fullmatch(re.escape(pki.GENKEY) + r" -out (\S+)", part):
                self.files[m[1]] = [pem(new_key()), "root:root:600"]
            elif m := re.fullmatch(r"cat (\S+)", part):
                if m[1] not in self.files:
                    return Result("", f"cat: {m[1]}: No such file or directory", 1)
                out.append(self.files[m[1]][0])
            elif m := re.fullmatch(r"stat -c '%U:%G:%a' (\S+)", part):
                if m[1] not in self.files:
                    return Result("", "No such file", 1)
                out.append(self.files[m[1]][1] + "\n")
            elif m := re.fullmatch(r"sha256sum (\S+)", part):
                out.append(hashlib.sha256(self.files[m[1]][0].encode()).hexdigest() + f"  {m[1]}\n")
            elif m := re.fullmatch(r"chown (\w[\w-]*):(\w[\w-]*) (\S+)", part):
                o, g, mode = self.files[m[3]][1].split(":")
                self.files[m[3]][1] = f"{m[1]}:{m[2]}:{mode}"
            elif m := re.fullmatch(r"chmod 0?(\d+) (\S+)", part):
                o, g, _ = self.files[m[2]][1].split(":")
                self.files[m[2]][1] = f"{o}:{g}:{m[1]}"
            elif m := re.fullmatch(r"mv -f (\S+) (\S+)", part):
                self.files[m[2]] = self.files.pop(m[1])
            elif m := re.fullmatch(r"rm -f (\S+)", part):
                self.files.pop(m[1], None)
            elif re.fullmatch(r'mkdir -p "\$\(dirname \S+\)"', part):
                pass
            elif m := re.fullmatch(r"openssl verify (\S+)", part):
                if m[1] == pki.CA_FILE and not self.trusted:
                    return Result("error 18 at 0 depth lookup: self-signed certificate", "", 2)
            elif part == f'test "$(readlink -f {pki.TRUST_LINK})" = {pki.TRUST_FILE}':
                if not self.trusted:
                    return Result("", "", 1)
            elif part == "update-ca-certificates --fresh":
                self.trusted = pki.TRUST_FILE in self.files
            else:
                raise AssertionError(f"simulated host does not know: {part}")
        return Result("".join(out), "", 0)


class SimulatedHost:
    """The recording host of the core's test support over the simulated shell,
    with the old test names: files, commands (changing ones), changes (reported)."""

    def __init__(self, inv, name, *, check=False):
        self.shell = Shell()
        self.run = RecordingRun(inv, responder=self.shell, check=check)
        self.h = self.run.session(name)
        self.h.directory = lambda path, **kw: self.shell.files.setdefault(path + "/", ["", "root:root:755"])
        self.name, self.inv = name, inv
        self.reset()

    def reset(self):
        self.h.changes.clear()
        self.h.commands.clear()
        self.run.results.clear()

    @property
    def files(self):
        return self.shell.files

    @property
    def trusted(self):
        return self.shell.trusted

    @trusted.setter
    def trusted(self, value):
        self.shell.trusted = value

    @property
    def commands(self):  # what changed the host: commands run and files uploaded
        return self.h.changes + [c for c in self.h.commands if c.startswith("<sftp")]

    @property
    def changes(self):
        return self.h.reported("changed") + self.h.reported("would change")

    @property
    def oks(self):
        return self.h.reported("ok")

    def read(self, cmd):
        return self.h.read(cmd)


def _cert_on(host: SimulatedHost) -> x509.Certificate:
    return x509.load_pem_x509_certificate(host.files[pki.cert_path(host.name)][0].encode())


def test_trust_installs_the_ca_once(inv, ca):
    h = SimulatedHost(inv, "gw1server")
    pki._trust(h.h, ca)
    assert h.files[pki.CA_FILE] == [ca.cert_pem, "root:root:644"]
    assert h.files[pki.TRUST_FILE] == [ca.cert_pem, "root:root:644"]
    assert h.trusted and "update-ca-certificates --fresh" in h.commands
    h.reset()
    pki._trust(h.h, ca)
    assert h.changes == [] and h.commands == []
    assert h.oks[-1] == "the host trusts the site CA"
    # an earlier run stopped between the upload and update-ca-certificates
    h.trusted = False
    pki._trust(h.h, ca)
    assert h.commands == ["update-ca-certificates --fresh"] and h.trusted


def test_trust_in_check_mode_changes_nothing(inv, ca):
    h = SimulatedHost(inv, "gw1server", check=True)
    pki._trust(h.h, ca)
    assert h.commands == [] and pki.CA_FILE not in h.files and not h.trusted
    assert "would run: update-ca-certificates" in h.changes


def test_fresh_host_gets_a_key_made_on_it_and_a_certificate(inv, ca):
    h = SimulatedHost(inv, "postfix02")
    pki._host_cert(h.h, ca)
    key, crt = pki.key_path("postfix02"), pki.cert_path("postfix02")
    assert h.files[key][1] == "root:ssl-cert:640"
    assert h.files[crt][1] == "root:root:644"
    assert not [p for p in h.files if p.endswith(".hastack-new")]
    assert any(pki.GENKEY in c for c in h.commands)
    cert = _cert_on(h)
    assert pki.Sans.of(cert) == pki.Sans.for_host(inv, "postfix02")
    assert pki.review(h.files[crt][0], h.read(f"openssl pkey -in {key} -pubout"), ca, pki.Sans.for_host(inv, "postfix02")) == []
    assert h.changes[-1].startswith(f"issued {crt} (no usable key): serial ")


def test_converged_host_is_left_alone(inv, ca):
    h = SimulatedHost(inv, "e1server")
    pki._host_cert(h.h, ca)
    before = {k: list(v) for k, v in h.files.items()}
    h.reset()
    pki._host_cert(h.h, ca)
    assert h.changes == [] and h.commands == []
    assert h.files == before
    assert h.oks[0].startswith(f"{pki.cert_path('e1server')}: valid until ")


def test_check_mode_says_what_would_be_issued_and_changes_nothing(inv, ca):
    h = SimulatedHost(inv, "ngx01", check=True)
    pki._host_cert(h.h, ca)
    assert h.files == {} and h.commands == []
    assert h.changes == [
        "would issue /etc/ssl/hastack/ngx01.crt (no usable key) with a new key: "
        "ngx01, ngx01.lab.test, webmail.lab.test, 10.200.0.111, 10.200.11.100, 10.200.11.111"]


def test_expiring_certificate_is_reissued_for_the_same_key(inv, ca):
    h = SimulatedHost(inv, "ngx02")
    pki._host_cert(h.h, ca)
    key = pki.key_path("ngx02")
    key_before = h.files[key][0]
    old = pki.sign_host_cert(ca, serialization.load_pem_private_key(key_before.encode(), None).public_key(),
                             "ngx02.lab.test", pki.Sans.for_host(inv, "ngx02"), now=NOW - dt.timedelta(days=820))
    h.files[pki.cert_path("ngx02")][0] = pem(old)
    h.reset()
    pki._host_cert(h.h, ca)
    assert not any(pki.GENKEY in c for c in h.commands)
    assert h.files[key][0] == key_before
    assert _cert_on(h).serial_number != old.serial_number
    assert _cert_on(h).not_valid_after_utc - NOW > dt.timedelta(days=800)
    assert "within 30 days" in h.changes[0]


def test_key_mode_drift_is_repaired_without_reissuing(inv, ca):
    h = SimulatedHost(inv, "pxc1")
    pki._host_cert(h.h, ca)
    serial = _cert_on(h).serial_number
    h.files[pki.key_path("pxc1")][1] = "root:root:644"
    h.reset()
    pki._host_cert(h.h, ca)
    assert _cert_on(h).serial_number == serial
    assert h.files[pki.key_path("pxc1")][1] == "root:ssl-cert:640"
    assert h.changes == ["/etc/ssl/hastack/pxc1.key: owner/mode root:ssl-cert:640"]


def test_renew_reissues_a_valid_certificate_and_keeps_the_key(inv, ca):
    h = SimulatedHost(inv, "pxc2")
    pki._host_cert(h.h, ca)
    key_before, serial = h.files[pki.key_path("pxc2")][0], _cert_on(h).serial_number
    pki._host_cert(h.h, ca, renew=True)
    assert _cert_on(h).serial_number != serial
    assert h.files[pki.key_path("pxc2")][0] == key_before


def test_verify_lists_coverage_and_fails_on_an_uncovered_name(inv, ca):
    h = SimulatedHost(inv, "postfix03")
    pki._host_cert(h.h, ca)
    h.reset()
    pki._verify(h.h, ca)
    assert "mail.lab.test (vip mail)" in h.oks[0] and "10.200.11.116 (vip dbproxy)" in h.oks[0]
    # a certificate issued before the host got the mail VIP
    key = serialization.load_pem_private_key(h.files[pki.key_path("postfix03")][0].encode(), None)
    narrow = pki.Sans(frozenset({"postfix03", "postfix03.lab.test"}),
                      frozenset({"10.200.0.115", "10.200.11.115"}))
    h.files[pki.cert_path("postfix03")][0] = pem(pki.sign_host_cert(ca, key.public_key(), "postfix03.lab.test", narrow))
    with pytest.raises(HostFailed) as err:
        pki._verify(h.h, ca)
    msg = str(err.value)
    for missing in ("mail.lab.test (vip mail)", "10.200.11.110 (vip mail)", "10.200.11.116 (vip dbproxy)"):
        assert f"does not cover {missing}" in msg
    assert "postfix03.lab.test" not in msg


def test_verify_fails_without_a_certificate(inv, ca):
    with pytest.raises(HostFailed, match=r"/etc/ssl/hastack/pxc3.crt: no certificate; it covers none of: pxc3, "):
        pki._verify(SimulatedHost(inv, "pxc3").h, ca)


# --- export-ca and wiring ------------------------------------------------------------


def _ctx(inventory: Path) -> Context:
    return Context(Config(overrides={"inventory": str(inventory)}))


def test_export_ca_writes_beside_the_inventory_and_to_a_path(tmp_path, capsys):
    inventory = tmp_path / "lab.yml"
    shutil.copy(LAB, inventory)
    ca_, _ = pki.load_ca(Secrets(tmp_path / "lab.secrets.yml"), "lab", create=True)
    pki.export_ca(_ctx(inventory))
    assert (tmp_path / "lab.ca.crt").read_text() == ca_.cert_pem
    assert stat.S_IMODE((tmp_path / "lab.ca.crt").stat().st_mode) == 0o644
    pki.export_ca(_ctx(inventory))
    assert "already the site CA" in capsys.readouterr().out
    pki.export_ca(_ctx(inventory), path=str(tmp_path / "out" / "ca.pem"))
    assert (tmp_path / "out" / "ca.pem").read_text() == ca_.cert_pem


def test_export_ca_without_ca_fails_cleanly(tmp_path):
    from invoke.exceptions import Exit

    inventory = tmp_path / "lab.yml"
    shutil.copy(LAB, inventory)
    with pytest.raises(Exit, match="no CA yet"):
        pki.export_ca(_ctx(inventory))
    assert not (tmp_path / "lab.ca.crt").exists()
    assert not (tmp_path / "lab.secrets.yml").exists()


def test_collection_tasks_are_documented():
    coll = Collection.from_module(pki)
    assert set(coll.tasks) == {"deploy", "init", "issue", "verify", "export-ca"}
    assert coll.default == "deploy"
    for name, t in coll.tasks.items():
        assert t.__doc__ and t.__doc__.strip(), name
        for arg in t.get_arguments():
            assert arg.help, f"{name} --{arg.name}"


@pytest.mark.parametrize("groups, member", [("pgbackrest ssl-cert", True), ("pgbackrest ssl-cert-old", False),
                                            ("ssl-cert-old ssl", False), ("pgbackrest", False)])
def test_key_reader_probe_is_a_full_match_on_the_group(groups, member):
    """The membership probe, run by bash on `id`'s output: a group such as
    `ssl-cert-old` is not ssl-cert (`grep -w` took it for one)."""
    from fabfile.core import topology

    run = RecordingRun(load(LAB))
    h = run.session("bk1server")
    topology.key_reader(h, "pgbackrest", "pgBackRest reads the host key")
    probe = h.commands[0]
    assert probe.startswith("id -nG pgbackrest | ")
    shell = subprocess.run(["bash", "-c", probe.replace("id -nG pgbackrest", f"echo {groups}", 1)])
    assert (shell.returncode == 0) is member


def test_key_reader_quotes_the_user_and_leaves_a_member_alone():
    from fabfile.core import topology

    run = RecordingRun(load(LAB))
    h = run.session("bk1server")
    assert topology.key_reader(h, "x;id", "a daemon reads the host key") is True
    assert h.commands[0].startswith("id -nG 'x;id' | ")
    assert h.changes == ["usermod -a -G ssl-cert 'x;id'"]

    run = RecordingRun(load(LAB), answers={"*": [(r"^id -nG bacula \| ", Result())]})
    h = run.session("bk1server")
    assert topology.key_reader(h, "bacula", "the director reads the host key") is False
    assert h.changes == []
