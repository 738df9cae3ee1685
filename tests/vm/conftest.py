"""VM lab tests: the mail store on DRBD, on the lab of inventory/lab-drbd.yml
(two mail back ends as qemu VMs with Debian's kernel and DRBD 8.4, three
Galera containers). Marked `vm`; `./run test -m vm` runs only them.

The session fixture `drbd_lab` brings that lab up on fresh disks, runs
`inv deploy.all` onto it once, and always takes it down at the end (disks
included), failures too. HASTACK_LAB_REUSE=1 keeps a running lab and its disks.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest

from fabfile.core.inventory import load
from fabfile.core.tasks import PROJECT_ROOT
from tests.lab.labhost import LabHosts

INVENTORY = PROJECT_ROOT / "inventory" / "lab-drbd.yml"


def pytest_collection_modifyitems(config, items):
    here = Path(__file__).parent
    for item in items:
        if here in Path(str(item.path)).parents:
            item.add_marker(pytest.mark.vm)


@pytest.fixture(scope="session")
def drbd_lab():
    if os.geteuid() != 0:
        pytest.skip("VM lab tests need root (bridges, taps, qemu): run them as root")
    hosts = LabHosts(load(INVENTORY, roles_file=False))
    fresh = os.environ.get("HASTACK_LAB_REUSE") != "1"
    started = True
    try:
        if fresh:
            hosts.down(disks=True)
        t0 = time.monotonic()
        started = bool(hosts.up()["started"])
        booted = time.monotonic() - t0
        t0 = time.monotonic()
        hosts.converge("deploy.all", timeout=3600)
        print(f"\nVM lab: up in {booted:.0f} s, deploy.all in {time.monotonic() - t0:.0f} s")
        yield hosts
    finally:
        if fresh or started:
            hosts.down(disks=fresh)
