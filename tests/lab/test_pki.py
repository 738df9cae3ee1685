"""PKI on real lab hosts: after `inv base.deploy` and `inv pki.deploy` every
host's certificate verifies against the site CA for every name and address the
host answers on, the host trusts the CA, a re-run changes nothing, and a
certificate about to expire is re-issued (check mode first: it only says so)."""

from __future__ import annotations

import datetime as dt
import subprocess
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from fabfile import pki
from fabfile.core.inventory import load
from fabfile.core.secrets import Secrets

from tests.lab.labhost import lab_inventory_path, recap, run_inv as inv

pytestmark = pytest.mark.lab

INVENTORY_PATH = lab_inventory_path()
INVENTORY = load(INVENTORY_PATH)
HOSTS = list(INVENTORY.hosts)


def changed_count(out: subprocess.CompletedProcess) -> int:
    return recap(out)[1]


@pytest.fixture(scope="module")
def deployed(lab, tmp_path_factory):
    for task in ("base.deploy", "pki.deploy"):
        out = inv(task)
        assert out.returncode == 0, f"inv {task} failed:\n{out.stdout[-4000:]}\n{out.stderr[-2000:]}"
    ca_file = tmp_path_factory.mktemp("pki") / "ca.crt"
    out = inv("pki.export-ca", "--path", str(ca_file))
    assert out.returncode == 0, out.stderr
    return ca_file


def fetch_cert(lab, host: str, dest: Path) -> Path:
    out = lab.run(host, f"cat {pki.cert_path(host)}")
    assert out.returncode == 0, out.stderr
    dest.write_text(out.stdout)
    return dest


@pytest.mark.parametrize("host", HOSTS)
def test_certificate_verifies_for_every_name_and_address(lab, deployed, host, tmp_path):
    cert_file = fetch_cert(lab, host, tmp_path / f"{host}.crt")
    base = ["openssl", "verify", "-CAfile", str(deployed), "-purpose", "sslserver"]
    entries = pki.served(INVENTORY, host)
    assert entries
    for entry in entries:
        flag = "-verify_hostname" if entry.kind == "dns" else "-verify_ip"
        out = subprocess.run([*base, flag, entry.value, str(cert_file)], capture_output=True, text=True)
        assert out.returncode == 0, f"{host}: {entry}: {out.stdout}{out.stderr}"
    out = subprocess.run([*base, "-verify_hostname", "not-this-host.lab.test", str(cert_file)],
                         capture_output=True, text=True)
    assert out.returncode != 0


@pytest.mark.parametrize("host", HOSTS)
def test_host_trusts_the_ca_and_key_files_are_protected(lab, deployed, host):
    crt, key = pki.cert_path(host), pki.key_path(host)
    out = lab.run(host, f"openssl verify {crt}")  # the host's own trust store, no -CAfile
    assert out.returncode == 0 and out.stdout.strip() == f"{crt}: OK", out.stdout + out.stderr
    assert lab.run(host, f"test -L {pki.TRUST_LINK} && cmp {pki.TRUST_FILE} {pki.CA_FILE}").returncode == 0
    modes = lab.run(host, f"stat -c '%n %U:%G:%a' {crt} {key} {pki.DIR}").stdout.split("\n")
    assert modes[:3] == [f"{crt} root:root:644", f"{key} root:ssl-cert:640", f"{pki.DIR} root:root:755"]
    same = lab.run(host, f"[ \"$(openssl pkey -in {key} -pubout)\" = \"$(openssl x509 -in {crt} -noout -pubkey)\" ]")
    assert same.returncode == 0, "the certificate does not match the key beside it"


def test_ca_on_hosts_is_the_exported_one(lab, deployed):
    want = deployed.read_text()
    for host in HOSTS:
        assert lab.run(host, f"cat {pki.CA_FILE}").stdout == want, host


def test_rerun_changes_nothing(deployed):
    out = inv("pki.deploy")
    assert out.returncode == 0, out.stdout[-4000:]
    assert changed_count(out) == 0, out.stdout[-4000:]
    assert "nothing to do" in out.stdout


def test_verify_reports_full_coverage(deployed):
    out = inv("pki.verify")
    assert out.returncode == 0, out.stdout[-4000:]
    assert "vip dbproxy (10.200.11.116, role mail_backend) has no DNS names" in out.stdout


def test_expiring_certificate_is_reissued_with_the_same_key(lab, deployed):
    host = "pxc2"
    crt, key = pki.cert_path(host), pki.key_path(host)
    ca, _ = pki.load_ca(Secrets(INVENTORY.site_file("secrets.yml"), persist=False), INVENTORY.site.name,
                        create=False)
    public_pem = lab.run(host, f"openssl pkey -in {key} -pubout").stdout
    public_key = serialization.load_pem_public_key(public_pem.encode())
    old = pki.sign_host_cert(ca, public_key, INVENTORY.fqdn(host), pki.Sans.for_host(INVENTORY, host),
                             now=dt.datetime.now(dt.timezone.utc) - dt.timedelta(days=pki.HOST_DAYS - 10))
    old_pem = old.public_bytes(serialization.Encoding.PEM).decode()
    put = lab.run(host, f"cat > {crt}", input=old_pem)
    assert put.returncode == 0, put.stderr
    key_sum = lab.run(host, f"sha256sum {key}").stdout

    check = inv("pki.issue", "--check", "--hosts", host)
    assert check.returncode == 0, check.stdout[-4000:]
    assert f"would issue {crt} (expires on" in check.stdout and "within 30 days" in check.stdout
    assert lab.run(host, f"cat {crt}").stdout == old_pem, "check mode changed the certificate"

    out = inv("pki.issue", "--hosts", host)
    assert out.returncode == 0, out.stdout[-4000:]
    assert changed_count(out) == 1, out.stdout[-4000:]
    new = x509.load_pem_x509_certificate(lab.run(host, f"cat {crt}").stdout.encode())
    assert new.serial_number != old.serial_number
    assert new.not_valid_after_utc - dt.datetime.now(dt.timezone.utc) > dt.timedelta(days=pki.HOST_DAYS - 2)
    assert lab.run(host, f"sha256sum {key}").stdout == key_sum, "the key was replaced"
    assert lab.run(host, f"openssl verify {crt}").returncode == 0
    assert changed_count(inv("pki.issue", "--hosts", host)) == 0
