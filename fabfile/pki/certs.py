"""The pki tier's work: the site CA, the host certificates and the steps that
put them on hosts. It needs `cryptography`, so the tier's tasks (in
``__init__``) import it when they run, not when the tasks are listed."""

from __future__ import annotations

import datetime as dt
import io
import ipaddress
from dataclasses import dataclass
from typing import TYPE_CHECKING

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from ..core import HostFailed, UserError, q
from ..core.topology import CA_FILE, KEY_GROUP, PKI_DIR as DIR, cert_path, key_path, xmpp_service_hosts

if TYPE_CHECKING:
    from ..core import HostSession, Run
    from ..core.inventory import Inventory
    from ..core.secrets import Secrets

CA_KEY_SECRET = "pki_ca_key"
CA_CERT_SECRET = "pki_ca_cert"
CA_DAYS = 3650
HOST_DAYS = 825          # the longest validity Apple clients accept from a private CA
RENEW_DAYS = 30          # re-issue a host certificate this close to its expiry
CA_WARN_DAYS = 365       # warn when the CA itself gets this close to its expiry
BACKDATE = dt.timedelta(hours=1)  # not_valid_before in the past: hosts' clocks may lag

TRUST_FILE = "/usr/local/share/ca-certificates/hastack-ca.crt"
TRUST_LINK = "/etc/ssl/certs/hastack-ca.pem"  # what update-ca-certificates makes of TRUST_FILE
KEY_OWNER, KEY_MODE = "root", "0640"
PACKAGES = ["ca-certificates", "openssl", "ssl-cert"]
GENKEY = "openssl genpkey -algorithm EC -pkeyopt ec_paramgen_curve:P-256"


def _utcnow() -> dt.datetime:
    return dt.datetime.now(dt.timezone.utc)


# --- the CA ---------------------------------------------------------------------


@dataclass(frozen=True)
class CA:
    key: ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey
    cert: x509.Certificate

    @property
    def cert_pem(self) -> str:
        return self.cert.public_bytes(serialization.Encoding.PEM).decode()

    @property
    def fingerprint(self) -> str:
        return self.cert.fingerprint(hashes.SHA256()).hex(":").upper()

    def describe(self) -> str:
        cn = self.cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value
        return f"'{cn}', valid until {self.cert.not_valid_after_utc:%Y-%m-%d}, SHA-256 {self.fingerprint[:23]}…"


def ca_name(site: str) -> str:
    return f"{site} hastack CA"


def new_ca_key_pem() -> str:
    key = ec.generate_private_key(ec.SECP256R1())
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    ).decode()


def new_ca_cert_pem(key_pem: str, site: str, *, now: dt.datetime | None = None) -> str:
    key = serialization.load_pem_private_key(key_pem.encode(), password=None)
    now = now or _utcnow()
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, ca_name(site))])
    ski = x509.SubjectKeyIdentifier.from_public_key(key.public_key())
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - BACKDATE)
        .not_valid_after(now + dt.timedelta(days=CA_DAYS))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=False, content_commitment=False, key_encipherment=False,
                data_encipherment=False, key_agreement=False, key_cert_sign=True, crl_sign=True,
                encipher_only=False, decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(ski, critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ski), critical=False)
        .sign(key, hashes.SHA256())
    )
    return cert.public_bytes(serialization.Encoding.PEM).decode()


def has_ca(secrets: Secrets) -> bool:
    return CA_KEY_SECRET in secrets and CA_CERT_SECRET in secrets


def load_ca(secrets: Secrets, site: str, *, create: bool) -> tuple[CA, bool]:
    """The site CA from the secrets store; made (and stored) first when
    ``create`` and there is none. Returns (ca, created)."""
    created = not has_ca(secrets)
    if created and not create:
        raise UserError(f"{secrets.path}: the site has no CA yet (no '{CA_KEY_SECRET}'); run `inv pki.init` first")
    key_pem = secrets.get(CA_KEY_SECRET, generate=new_ca_key_pem)
    cert_pem = secrets.get(CA_CERT_SECRET, generate=lambda: new_ca_cert_pem(key_pem, site))
    where = f"{secrets.path}: {CA_KEY_SECRET}/{CA_CERT_SECRET}"
    try:
        key = serialization.load_pem_private_key(key_pem.encode(), password=None)
        cert = x509.load_pem_x509_certificate(cert_pem.encode())
    except ValueError as exc:
        raise UserError(f"{where}: not a PEM key and certificate ({exc})") from None
    if cert.public_key().public_bytes(*_SPKI) != key.public_key().public_bytes(*_SPKI):
        raise UserError(f"{where}: the CA certificate does not belong to the CA key")
    try:
        is_ca = cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    except x509.ExtensionNotFound:
        is_ca = False
    if not is_ca:
        raise UserError(f"{where}: the stored certificate is not a CA certificate")
    if cert.not_valid_after_utc <= _utcnow():
        raise UserError(f"{where}: the CA expired on {cert.not_valid_after_utc:%Y-%m-%d}; "
                        "every host certificate it signed is invalid (rotating the CA is not automated yet)")
    return CA(key, cert), created


_SPKI = (serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)


# --- what a host answers on -------------------------------------------------------


@dataclass(frozen=True)
class Served:
    """One name or address a host answers on, and why."""

    kind: str   # "dns" or "ip"
    value: str
    source: str  # "host", "network mgmt", "vip webmail", "xmpp domain"


def served(inv: Inventory, host: str) -> list[Served]:
    """Every DNS name and IP address ``host`` answers on, in a stable order."""
    me = inv.hosts[host]
    out = [Served("dns", host, "host"), Served("dns", inv.fqdn(host), "host")]
    out += [Served("ip", str(addr), f"network {net}") for net, addr in me.addresses.items()]
    for name, vip in inv.vips.items():
        if vip.role in me.roles:
            out.append(Served("ip", str(vip.address), f"vip {name}"))
            out += [Served("dns", dns, f"vip {name}") for dns in vip.names]
    if inv.xmpp is not None and "ejabberd" in me.roles:
        out.append(Served("dns", inv.xmpp.domain, "xmpp domain"))
        out += [Served("dns", name, "xmpp service") for name in xmpp_service_hosts(inv)]
    seen: set[tuple[str, str]] = set()
    unique = []
    for s in out:
        if (s.kind, s.value) not in seen:
            seen.add((s.kind, s.value))
            unique.append(s)
    return unique


@dataclass(frozen=True)
class Sans:
    dns: frozenset[str]
    ips: frozenset[str]

    @classmethod
    def for_host(cls, inv: Inventory, host: str) -> "Sans":
        entries = served(inv, host)
        return cls(frozenset(s.value for s in entries if s.kind == "dns"),
                   frozenset(s.value for s in entries if s.kind == "ip"))

    @classmethod
    def of(cls, cert: x509.Certificate) -> "Sans":
        try:
            san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        except x509.ExtensionNotFound:
            return cls(frozenset(), frozenset())
        return cls(frozenset(san.get_values_for_type(x509.DNSName)),
                   frozenset(str(a) for a in san.get_values_for_type(x509.IPAddress)))

    def covers(self, entry: Served) -> bool:
        return entry.value in (self.dns if entry.kind == "dns" else self.ips)

    def describe(self) -> str:
        return ", ".join(sorted(self.dns) + sorted(self.ips, key=ipaddress.ip_address))

    def diff(self, other: "Sans") -> str:
        """What ``other`` (wanted) adds to and removes from self (present)."""
        added = sorted(other.dns - self.dns) + sorted(other.ips - self.ips)
        removed = sorted(self.dns - other.dns) + sorted(self.ips - other.ips)
        return " ".join([f"+{v}" for v in added] + [f"-{v}" for v in removed])


# --- host certificates --------------------------------------------------------------


def sign_host_cert(ca: CA, public_key, fqdn: str, sans: Sans, *, now: dt.datetime | None = None,
                   days: int = HOST_DAYS) -> x509.Certificate:
    """A TLS server+client certificate for ``public_key`` naming ``sans``."""
    now = now or _utcnow()
    is_rsa = isinstance(public_key, rsa.RSAPublicKey)
    ca_ski = ca.cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
    names = [x509.DNSName(d) for d in sorted(sans.dns)]
    names += [x509.IPAddress(ipaddress.ip_address(a)) for a in sorted(sans.ips, key=ipaddress.ip_address)]
    return (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, fqdn)]))
        .issuer_name(ca.cert.subject)
        .public_key(public_key)
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - BACKDATE)
        .not_valid_after(min(now + dt.timedelta(days=days), ca.cert.not_valid_after_utc))
        .add_extension(x509.SubjectAlternativeName(names), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True, content_commitment=False, key_encipherment=is_rsa,
                data_encipherment=False, key_agreement=False, key_cert_sign=False, crl_sign=False,
                encipher_only=False, decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(
            x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]),
            critical=False,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(public_key), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ca_ski), critical=False)
        .sign(ca.key, hashes.SHA256())
    )


def signed_by(cert: x509.Certificate, ca: CA) -> bool:
    try:
        cert.verify_directly_issued_by(ca.cert)
    except (InvalidSignature, ValueError, TypeError):  # bad signature, other issuer, key type
        return False
    return True


def review(cert_pem: str | None, public_key_pem: str | None, ca: CA, want: Sans, *,
           now: dt.datetime | None = None) -> list[str]:
    """Why the certificate on a host must be re-issued (empty: keep it).

    ``cert_pem`` is the host's certificate, ``public_key_pem`` the public half of
    the key beside it (None when either is missing)."""
    now = now or _utcnow()
    if public_key_pem is None:
        return ["no usable key"] if cert_pem is None else ["no usable key for the certificate"]
    if not cert_pem or not cert_pem.strip():
        return ["no certificate"]
    try:
        cert = x509.load_pem_x509_certificate(cert_pem.encode())
    except ValueError:
        return ["certificate unreadable"]
    reasons = []
    if not signed_by(cert, ca):
        reasons.append("not signed by the current CA")
    try:
        key = serialization.load_pem_public_key(public_key_pem.encode())
        if key.public_bytes(*_SPKI) != cert.public_key().public_bytes(*_SPKI):
            reasons.append("does not match the host's key")
    except ValueError:
        reasons.append("host key unreadable")
    expires = cert.not_valid_after_utc
    if expires <= now:
        reasons.append(f"expired on {expires:%Y-%m-%d}")
    elif expires - now < dt.timedelta(days=RENEW_DAYS):
        reasons.append(f"expires on {expires:%Y-%m-%d}, within {RENEW_DAYS} days")
    if cert.not_valid_before_utc > now + BACKDATE:
        reasons.append(f"not valid before {cert.not_valid_before_utc:%Y-%m-%d %H:%M}")
    have = Sans.of(cert)
    if have != want:
        reasons.append(f"names changed ({have.diff(want)})")
    return reasons


def vip_notes(inv: Inventory) -> list[str]:
    """Coverage remarks that are not errors: VIPs clients can reach only by address."""
    return [f"vip {name} ({vip.address}, role {vip.role}) has no DNS names: certificates cover it "
            "by address only, so clients must connect to the address"
            for name, vip in inv.vips.items() if not vip.names]


# --- on the hosts -------------------------------------------------------------------


def converge(run: Run) -> None:
    """Init the CA if needed, trust it on every host, issue what is missing."""
    ca = _ca(run, create=True)
    _issue(run, ca)


def _ca(run: Run, *, create: bool) -> CA:
    ca, created = load_ca(run.secrets, run.inv.site.name, create=create)
    where = run.secrets.path
    if created:
        verb = "would create" if run.check else "created"
        run.report.result("local", "would change" if run.check else "changed",
                          f"{verb} the site CA {ca.describe()} in {where}")
    else:
        run.report.result("local", "ok", f"site CA {ca.describe()} ({where})")
        left = ca.cert.not_valid_after_utc - _utcnow()
        if left < dt.timedelta(days=CA_WARN_DAYS):
            run.report.note(f"warning: the site CA expires in {left.days} days; plan its rotation")
    return ca


def _issue(run: Run, ca: CA, *, renew: bool = False) -> None:
    hosts = run.hosts()
    run.step("pki: trust the site CA", hosts, lambda h: _trust(h, ca))
    run.step("pki: host certificates", hosts, lambda h: _host_cert(h, ca, renew=renew))
    for note in vip_notes(run.inv):
        run.report.note(note)


def _trust(h: HostSession, ca: CA) -> None:
    h.packages(PACKAGES)
    h.directory(DIR, mode="0755")
    h.put(ca.cert_pem, CA_FILE, mode="0644")
    changed = h.put(ca.cert_pem, TRUST_FILE, mode="0644")
    if h.run.check and changed:
        h.changed("would run: update-ca-certificates")
        return
    # The link is what update-ca-certificates leaves behind; a run that stopped
    # between the upload and the update is caught here.
    linked = h.probe(f"test \"$(readlink -f {TRUST_LINK})\" = {TRUST_FILE}").ok
    if not changed and linked:
        h.ok("the host trusts the site CA")
        return
    h.sh("update-ca-certificates --fresh", message="update-ca-certificates (add the site CA to the trust store)")
    if not h.run.check:
        check = h.probe(f"openssl verify {CA_FILE}")
        if not check.ok:
            raise HostFailed(f"the site CA is not trusted after update-ca-certificates:\n{check.stdout}{check.stderr}")


def _host_cert(h: HostSession, ca: CA, *, renew: bool = False) -> None:
    crt, key = cert_path(h.name), key_path(h.name)
    qc, qk = q(crt), q(key)
    want = Sans.for_host(h.inv, h.name)
    # One round trip: the key's public half (the key never leaves the host), then the certificate.
    both = h.probe(f"openssl pkey -in {qk} -pubout 2>/dev/null; echo ==hastack-cert==; cat {qc} 2>/dev/null")
    pub_text, _, cert_text = both.stdout.partition("==hastack-cert==\n")
    public_key_pem = pub_text if "PUBLIC KEY" in pub_text else None
    cert_pem = cert_text if "BEGIN CERTIFICATE" in cert_text else None
    reasons = review(cert_pem, public_key_pem, ca, want)
    if renew and not reasons:
        reasons = ["--renew"]

    if not reasons:
        cert = x509.load_pem_x509_certificate(cert_pem.encode())
        h.ok(f"{crt}: valid until {cert.not_valid_after_utc:%Y-%m-%d}, signed by the site CA, "
             f"names {want.describe()}")
        h.put(cert_pem, crt, mode="0644")  # owner and mode only: the content is the same
        _key_mode(h, key)
        return

    why = "; ".join(reasons)
    new_key = public_key_pem is None
    if h.run.check:
        h.changed(f"would issue {crt} ({why}){' with a new key' if new_key else ''}: {want.describe()}")
        return
    if new_key:
        qn = q(key + ".hastack-new")
        h.sh(f"umask 077 && {GENKEY} -out {qn} && chown {KEY_OWNER}:{KEY_GROUP} {qn} && chmod {KEY_MODE} {qn}",
             message=f"generate a new EC P-256 key for {key} (on the host)")
        public_key_pem = h.read(f"openssl pkey -in {qn} -pubout")
    public_key = serialization.load_pem_public_key(public_key_pem.encode())
    cert = sign_host_cert(ca, public_key, h.inv.fqdn(h.name), want)
    pem = cert.public_bytes(serialization.Encoding.PEM).decode()
    # The certificate is public: SFTP is fine (and fast); the swap is one command.
    try:
        h.conn.put(io.BytesIO(pem.encode()), crt + ".hastack-new")
    except (OSError, EOFError) as exc:
        raise HostFailed(f"upload of {crt}.hastack-new failed: {exc}") from None
    tmp = q(crt + ".hastack-new")
    install = f"chown root:root {tmp} && chmod 0644 {tmp}"
    if new_key:
        install += f" && mv -f {q(key + '.hastack-new')} {qk}"
    install += f" && mv -f {tmp} {qc}"
    h.sh(install,
         message=f"issued {crt} ({why}): serial {cert.serial_number:x}, valid until "
                 f"{cert.not_valid_after_utc:%Y-%m-%d}, names {want.describe()}")
    if not new_key:
        _key_mode(h, key)


def _key_mode(h: HostSession, key: str) -> None:
    qk = q(key)
    want = f"{KEY_OWNER}:{KEY_GROUP}:{int(KEY_MODE, 8):o}"
    state = h.probe(f"stat -c '%U:%G:%a' {qk}")
    if state.ok and state.stdout.strip() == want:
        h.ok(f"{key}: {want}")
        return
    h.sh(f"chown {KEY_OWNER}:{KEY_GROUP} {qk} && chmod {KEY_MODE} {qk}", message=f"{key}: owner/mode {want}")


def _verify(h: HostSession, ca: CA) -> None:
    crt, key = cert_path(h.name), key_path(h.name)
    have = h.probe(f"cat {q(crt)}")
    pub = h.probe(f"openssl pkey -in {q(key)} -pubout")
    if not have.ok:
        raise HostFailed(f"{crt}: no certificate; it covers none of: "
                         + ", ".join(s.value for s in served(h.inv, h.name)))
    try:
        cert = x509.load_pem_x509_certificate(have.stdout.encode())
    except ValueError:
        raise HostFailed(f"{crt}: not a PEM certificate") from None
    sans = Sans.of(cert)
    want = Sans.for_host(h.inv, h.name)
    entries = served(h.inv, h.name)
    covered = [f"{s.value} ({s.source})" for s in entries if sans.covers(s)]
    problems = [f"does not cover {s.value} ({s.source})" for s in entries if not sans.covers(s)]
    public_key_pem = pub.stdout if pub.ok and "PUBLIC KEY" in pub.stdout else None
    problems += [r for r in review(have.stdout, public_key_pem, ca, want) if not r.startswith("names changed")]
    stale = sorted(sans.dns - want.dns) + sorted(sans.ips - want.ips)
    if stale:
        h.note(f"{crt} also names what the inventory no longer gives this host: {' '.join(stale)}")
    if not h.probe(f"openssl verify {q(crt)}").ok:
        problems.append("the host does not trust its own certificate (CA missing from its trust store?)")
    if problems:
        raise HostFailed(f"{crt}: " + "; ".join(problems))
    h.ok(f"{crt}: valid until {cert.not_valid_after_utc:%Y-%m-%d}, trusted by the host, "
         f"covers {', '.join(covered)}")
