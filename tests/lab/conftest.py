"""Lab tests: real Debian hosts (systemd-nspawn containers) reached over real SSH.

The session fixture `lab` brings the lab up once (from inventory/lab.yml, or the
file named by HASTACK_LAB_INVENTORY) on fresh disks, and always takes it down at
the end of the session, failures included, with the hosts' disks (the cached root
and the package cache stay). What an earlier run left on the hosts' disks is no
evidence for this one: a test run proves a deploy onto fresh hosts.
HASTACK_LAB_REUSE=1 keeps running hosts and disks instead (quicker while working
on one tier; a lab restarted from its disks gets the Galera cold start), and
leaves a lab that was already running up at the end.

Order: the lab's own checks (test_lab.py) run first, on fresh hosts, then
`inv deploy.all` onto them (test_deploy.py), then the tier tests; tests marked
`lab_teardown` (the "nothing left after lab.down" check) run last of all.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from fabfile.core.inventory import load

from tests.lab.labhost import LabHosts, lab_inventory_path


# The lab's own checks on fresh hosts, then `inv deploy.all` onto those fresh
# hosts (the README's deploy); every tier test after them converges its tier
# again (a no-op) and proves it with real clients and faults.
FIRST = ("test_lab.py", "test_deploy.py")


def pytest_configure(config):
    config.addinivalue_line("markers", "lab_teardown: runs after every other lab test (takes the lab down)")


def pytest_collection_modifyitems(config, items):
    here = Path(__file__).parent
    for item in items:
        if "lab" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.lab)

    def rank(item):
        if item.get_closest_marker("lab_teardown"):
            return 3
        path = Path(str(item.path))
        if here in path.parents and path.name in FIRST:
            return FIRST.index(path.name)
        return 2

    items.sort(key=rank)  # stable: keeps the file order within each rank


@pytest.fixture(scope="session")
def lab():
    """The running lab: `.inv`/`.inventory` (the Inventory), `.run(host, cmd)` over real SSH."""
    if os.geteuid() != 0:
        pytest.skip("lab tests need root (namespaces, bridges, mounts, containers): run them as root")
    hosts = LabHosts(load(lab_inventory_path(), roles_file=False))
    fresh = os.environ.get("HASTACK_LAB_REUSE") != "1"
    started = True
    try:
        if fresh:
            hosts.down(disks=True)
            # What a rescue recorded about the old hosts is no fact about fresh ones.
            hosts.inv.roles_file.unlink(missing_ok=True)
        started = bool(hosts.up()["started"])
        yield hosts
    finally:
        # A reused lab that was already running is left running (its owner takes
        # it down); what this session started, it takes down.
        if fresh or started:
            hosts.down(disks=fresh)
