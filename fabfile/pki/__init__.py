"""PKI tier: the site's own certificate authority and a TLS certificate per host.

Runbook:
1. The CA (`pki.init`, once per site): an EC P-256 key and a self-signed
   certificate (CN "<site> hastack CA", CA:TRUE pathlen 0, keyCertSign+cRLSign,
   ~10 years), kept in the secrets store as `pki_ca_key` / `pki_ca_cert`.
2. Trust (every host): openssl, ca-certificates and ssl-cert (the group that
   may read keys); /etc/ssl/hastack/ca.crt, and the CA in the host's trust
   store (/usr/local/share/ca-certificates/hastack-ca.crt, update-ca-certificates).
3. Certificates (every host): /etc/ssl/hastack/<host>.crt (0644) for the key
   /etc/ssl/hastack/<host>.key (0640 root:ssl-cert). The key is generated ON
   the host with openssl and never leaves it; only its public key is read and
   signed here. The certificate names everything the host answers on: its
   short name, FQDN, every address on every network, every VIP it may carry
   (VIPs whose role the host has: address and names) and its service names
   (the XMPP domain on ejabberd nodes).
   A certificate is kept while it is signed by the current CA, matches the
   host's key, names exactly those names and addresses and is valid for more
   than 30 days; otherwise it is re-issued (the key is kept).
4. Coverage: every VIP without DNS names is reported (clients must use its
   address); `pki.verify` lists, per host, every name and address it serves
   and fails for any the certificate on the host does not cover.

Service tiers copy or chown the key for their own users; `pki.export-ca`
writes the CA certificate for clients and browsers.
"""

from __future__ import annotations

import importlib
import os
from pathlib import Path
from typing import TYPE_CHECKING

from invoke import Collection

from ..core import load_inventory, runbook, task
from ..core.secrets import Secrets

if TYPE_CHECKING:
    from types import ModuleType

    from ..core import Run


def _certs() -> ModuleType:
    """The tier's work (.certs). It needs `cryptography` (~0.1 s to import), so it
    is imported when a pki task runs, not when the tasks are listed."""
    return importlib.import_module(".certs", __name__)


def __getattr__(name: str):
    # fabfile.pki.<name> for what .certs holds (Sans, load_ca, review, ...), imported on first use.
    if not name.startswith("__"):
        try:
            return getattr(_certs(), name)
        except AttributeError:
            pass
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def converge(run: Run) -> None:
    """Init the CA if needed, trust it on every host, issue what is missing."""
    _certs().converge(run)


# --- tasks --------------------------------------------------------------------------


@runbook(default=True)
def deploy(run):
    """Converge the PKI: make the site CA if needed, trust it and issue host certificates."""
    converge(run)


@runbook
def init(run):
    """Make the site CA once (key and certificate in the secrets store); later runs reuse it."""
    _certs()._ca(run, create=True)


@runbook(help={"renew": "re-issue every selected host's certificate even when it is still valid (keys are kept)"})
def issue(run, renew=False):
    """Issue and install a certificate per host for every name and address it answers on."""
    certs = _certs()
    certs._issue(run, certs._ca(run, create=False), renew=renew)


@runbook
def verify(run):
    """List what each host answers on and fail for anything its certificate does not cover."""
    certs = _certs()
    ca = certs._ca(run, create=False)
    run.step("pki: verify host certificates", run.hosts(), lambda h: certs._verify(h, ca))
    for note in certs.vip_notes(run.inv):
        run.report.note(note)


@task(help={"path": "where to write the CA certificate (default: <inventory>.ca.crt beside the inventory)"})
def export_ca(c, path=None):
    """Write the site CA certificate (PEM) for clients and browsers to import."""
    inv = load_inventory(c)
    secrets = Secrets(inv.site_file("secrets.yml"), persist=False)
    ca, _ = _certs().load_ca(secrets, inv.site.name, create=False)
    dest = Path(path).expanduser() if path else inv.site_file("ca.crt")
    dest.parent.mkdir(parents=True, exist_ok=True)
    if dest.exists() and dest.read_text() == ca.cert_pem:
        print(f"{dest}: already the site CA ({ca.describe()})")
        return
    tmp = dest.with_name(dest.name + ".tmp")
    tmp.write_text(ca.cert_pem)
    os.chmod(tmp, 0o644)
    os.replace(tmp, dest)
    print(f"{dest}: wrote the site CA {ca.describe()}")


ns = Collection("pki", deploy, init, issue, verify, export_ca)
