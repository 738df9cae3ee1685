"""A real browser for the lab tests: Playwright driving Debian's chromium (no
browser download), inside a lab host's network namespace, trusting our CA
through an NSS database made with certutil (never by ignoring certificate
errors: a page whose certificate does not verify fails to load).

    with lab_browser(lab, "pxc1", ca_file, {"webmail.lab.test": "10.200.11.100"}, tmp) as browser:
        page = browser.new_context().new_page()

Names are resolved with chromium's --host-resolver-rules (the lab has no DNS
server), so the certificate is still checked against the name typed.
Screenshots go to logs/artifacts/<test>/ (ARTIFACTS), beside the test log.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
from pathlib import Path

import pytest

CHROMIUM = "/usr/bin/chromium"
ARTIFACTS = Path(__file__).resolve().parents[2] / "logs" / "artifacts"
# As the machine's own probe runs chromium as root without a display: no
# sandbox (root), and no background calls home (the lab has no internet).
FLAGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
         "--disable-component-update", "--disable-sync", "--disable-dev-shm-usage"]


def nss_trusting(home: Path, ca_file: Path) -> Path:
    """$HOME/.pki/nssdb (chromium's trust store on Linux) trusting only ``ca_file`` as a CA."""
    db = home / ".pki" / "nssdb"
    db.mkdir(parents=True, exist_ok=True)
    subprocess.run(["certutil", "-N", "--empty-password", "-d", f"sql:{db}"], check=True, capture_output=True)
    subprocess.run(["certutil", "-A", "-n", "hastack lab CA", "-t", "C,,", "-i", str(ca_file), "-d", f"sql:{db}"],
                   check=True, capture_output=True)
    return db


@contextlib.contextmanager
def lab_browser(netns: str, ca_file: Path, names: dict[str, str], workdir: Path):
    """A headless chromium in ``netns`` that resolves ``names`` (name -> address) and trusts ``ca_file``."""
    if not Path(CHROMIUM).exists() or not shutil.which("certutil"):
        pytest.fail("the browser tests need Debian's chromium and libnss3-tools (./run test installs them)")
    from playwright.sync_api import sync_playwright

    home = workdir / "home"
    nss_trusting(home, ca_file)
    wrapper = workdir / "chromium-in-netns"
    wrapper.write_text(f"#!/bin/sh\nexec ip netns exec {netns} {CHROMIUM} \"$@\"\n")
    wrapper.chmod(0o755)
    rules = ", ".join(f"MAP {name} {address}" for name, address in names.items())
    env = {**os.environ, "HOME": str(home)}
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=str(wrapper), args=[*FLAGS, f"--host-resolver-rules={rules}"],
                                    env=env, headless=True)
        try:
            yield browser
        finally:
            browser.close()


def screenshot(page, test: str, name: str) -> Path:
    """Save a PNG of ``page`` as an artifact of ``test``; its path."""
    folder = ARTIFACTS / test
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{name}.png"
    page.screenshot(path=str(path), full_page=True)
    print(f"screenshot: {path}")
    return path
