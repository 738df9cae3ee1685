"""Inventory validation: each bad inventory is refused with the file, the key
path and what is wrong; the shipped inventories validate."""

import copy
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from fabfile.core.inventory import InventoryError, load, parse
from tests.unit.shipped import INVENTORIES as SHIPPED

ROOT = Path(__file__).resolve().parents[2]

BASE = {
    "site": {"name": "t", "domain": "t.test"},
    "networks": {
        "mgmt": {"cidr": "10.0.0.0/24", "management": True},
        "mail": {"cidr": "10.0.1.0/24"},
        "dmz": {"cidr": "10.0.2.0/29"},
    },
    "hosts": {
        "pxc1": {"roles": ["galera"], "addresses": {"mgmt": "10.0.0.21", "mail": "10.0.1.21"}},
        "pxc2": {"roles": ["galera"], "addresses": {"mgmt": "10.0.0.22", "mail": "10.0.1.22"}},
        "pxc3": {"roles": ["galera"], "addresses": {"mgmt": "10.0.0.23", "mail": "10.0.1.23"}},
        "pf1": {"roles": ["mail_backend"], "addresses": {"mgmt": "10.0.0.31", "mail": "10.0.1.31"}},
        "pf2": {"roles": ["mail_backend"], "addresses": {"mgmt": "10.0.0.32", "mail": "10.0.1.32"}},
        "e1": {"roles": ["ejabberd"], "addresses": {"mgmt": "10.0.0.41", "dmz": "10.0.2.2"}},
        "db1": {"roles": ["postgres_primary"], "addresses": {"mgmt": "10.0.0.51"}},
    },
    "vips": {"mail": {"address": "10.0.1.100", "network": "mail", "role": "mail_backend"}},
    "mail": {"domain": "t.test"},
    "xmpp": {"domain": "xmpp.t.test"},
}


def problems_of(data) -> list[tuple[str, str]]:
    with pytest.raises(InventoryError) as info:
        parse(yaml.safe_dump(data, sort_keys=False), "site.yml")
    assert str(info.value).count("site.yml: ") == len(info.value.problems)
    return info.value.problems


def mutate(fn):
    data = copy.deepcopy(BASE)
    fn(data)
    return data


def test_base_is_valid():
    inv = parse(yaml.safe_dump(BASE), "site.yml")
    assert inv.with_role("galera") == ["pxc1", "pxc2", "pxc3"]
    assert inv.management_address("e1") == "10.0.0.41"


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: p.name)
def test_shipped_inventories_validate(path):
    inv = load(path)
    assert inv.hosts and inv.management_network


def test_lab_inventory_mirrors_both_seeds():
    inv = load(ROOT / "inventory/lab.yml")
    assert set(inv.hosts) == {
        "ngx01", "ngx02", "postfix01", "postfix02", "postfix03", "pxc1", "pxc2", "pxc3",
        "e1server", "e2server", "gw1server", "psql1server", "psql2server", "bk1server", "mon1server", "r1server",
    }
    assert set(inv.hosts["gw1server"].addresses) == {"mgmt", "dmz", "internal"}
    assert set(inv.networks) == {"mgmt", "mail", "dmz", "internal"}


def _set(path, value):
    def fn(data):
        node = data
        *parents, last = path.split(".")
        for key in parents:
            node = node[key]
        node[last] = value
    return fn


def _delete(path):
    def fn(data):
        node = data
        *parents, last = path.split(".")
        for key in parents:
            node = node[key]
        del node[last]
    return fn


def _add_host(name, **host):
    return _set(f"hosts.{name}", host)


CASES = [
    ("misspelt top-level key", _set("hostz", {}), "hostz", "unknown key"),
    ("misspelt host key", _set("hosts.pxc1.role", ["galera"]), "hosts.pxc1.role", "unknown key"),
    ("misspelt network key", _set("networks.mail.cdir", "10.9.0.0/24"), "networks.mail.cdir", "unknown key"),
    ("unknown role", _set("hosts.pxc1.roles", ["galera", "webserver"]), "hosts.pxc1.roles.1",
     "unknown role 'webserver' (known: webmail, mail_backend, galera, ejabberd, postgres_primary, "
     "postgres_replica, gateway, backup, monitoring, spare)"),
    ("missing site", _delete("site"), "site", "required key is missing"),
    ("missing host addresses", _set("hosts.pxc1", {"roles": ["galera"]}), "hosts.pxc1.addresses",
     "required key is missing"),
    ("bad CIDR", _set("networks.mail.cidr", "10.0.1.300/24"), "networks.mail.cidr",
     "Input is not a valid IPv4 network (got '10.0.1.300/24')"),
    ("bad address", _set("hosts.pxc1.addresses.mail", "10.0.1"), "hosts.pxc1.addresses.mail",
     "Input is not a valid IPv4 address (got '10.0.1')"),
    ("address outside its network", _set("hosts.pxc1.addresses.mail", "10.0.9.21"), "hosts.pxc1.addresses.mail",
     "10.0.9.21 is outside network mail (10.0.1.0/24)"),
    ("network address used by a host", _set("hosts.pxc1.addresses.mail", "10.0.1.0"), "hosts.pxc1.addresses.mail",
     "10.0.1.0 is the network or broadcast address of 10.0.1.0/24"),
    ("duplicate address", _set("hosts.pxc2.addresses.mail", "10.0.1.21"), "hosts.pxc2.addresses.mail",
     "address 10.0.1.21 is already used by hosts.pxc1.addresses.mail"),
    ("address on an unknown network", _set("hosts.pxc1.addresses.storage", "10.0.5.1"),
     "hosts.pxc1.addresses.storage", "unknown network 'storage' (known: mgmt, mail, dmz)"),
    ("host without management address", _set("hosts.db1.addresses", {"mail": "10.0.1.51"}), "hosts.db1.addresses",
     "no address on the management network 'mgmt'"),
    ("no management network", _set("networks.mgmt.management", False), "networks",
     "exactly one network must have 'management: true' (found 0)"),
    ("two management networks", _set("networks.mail.management", True), "networks",
     "exactly one network must have 'management: true' (found 2)"),
    ("overlapping networks", _set("networks.dmz.cidr", "10.0.1.0/29"), "networks.dmz.cidr",
     "10.0.1.0/29 overlaps network mail (10.0.1.0/24)"),
    ("VIP outside its network", _set("vips.mail.address", "10.0.2.5"), "vips.mail.address",
     "10.0.2.5 is outside network mail (10.0.1.0/24)"),
    ("VIP on a network its hosts are not on",
     _set("vips.mail", {"address": "10.0.2.5", "network": "dmz", "role": "mail_backend"}), "vips.mail.network",
     "host pf1 (role mail_backend) has no address on network dmz"),
    ("VIP on an unknown network", _set("vips.mail.network", "public"), "vips.mail.network",
     "unknown network 'public'"),
    ("VIP that clashes with a host", _set("vips.mail.address", "10.0.1.31"), "vips.mail.address",
     "address 10.0.1.31 is already used by hosts.pf1.addresses.mail"),
    ("VIP role no host has", _set("vips.web", {"address": "10.0.1.101", "network": "mail", "role": "webmail"}),
     "vips.web.role", "no host has role 'webmail' to carry this VIP"),
    ("even number of Galera nodes", _add_host("pxc4", roles=["galera"], addresses={"mgmt": "10.0.0.24"}), "hosts",
     "role galera needs an odd number of hosts, at least 3 (found 4)"),
    ("one Galera node", _set("hosts.pxc2.roles", []) , "hosts",
     "role galera needs an odd number of hosts, at least 3 (found 2)"),
    ("one Pacemaker node", _set("hosts.pf2.roles", []), "hosts",
     "role mail_backend (Pacemaker) needs at least 2 hosts (found 1)"),
    ("two PostgreSQL primaries",
     _add_host("db2", roles=["postgres_primary"], addresses={"mgmt": "10.0.0.52"}), "hosts",
     "role postgres_primary needs exactly 1 host (found 2)"),
    ("no PostgreSQL primary", _set("hosts.db1.roles", ["postgres_replica"]), "hosts",
     "role postgres_primary needs exactly 1 host (found 0)"),
    ("no ejabberd node", _set("hosts.e1.roles", []), "hosts", "role ejabberd needs at least 1 host (found 0)"),
    ("mail roles without a mail section", _delete("mail"), "mail",
     "hosts have role galera but the inventory has no 'mail' section"),
    ("unknown Galera flavour", _set("mail.galera_flavour", "mysql"), "mail.galera_flavour",
     "Input should be 'percona' or 'mariadb' (got 'mysql')"),
    ("bad domain", _set("site.domain", "not a domain"), "site.domain", "'not a domain' is not valid here (a DNS name such as example.com)"),
    ("bad apt proxy", _set("site.apt_proxy", "10.0.0.1:3142"), "site.apt_proxy", "'10.0.0.1:3142' is not valid here (an http(s):// URL)"),
    ("port out of range", _set("ssh", {"port": 70000}), "ssh.port",
     "Input should be less than or equal to 65535 (got 70000)"),
    ("DRBD backing disk not under /dev", _set("mail.drbd_backing", {"disk": "vdb"}), "mail.drbd_backing.disk",
     "not a device path: give a path under /dev such as /dev/vdb or /dev/disk/by-id/NAME (letters, digits, "
     "'_', '+', ':', '.', '-'; no . or ..) (got 'vdb')"),
    ("DRBD backing volume group with a space", _set("mail.drbd_backing", {"volume_group": "vg 0"}),
     "mail.drbd_backing.volume_group",
     "not an LVM name: a letter or digit, then letters, digits, '_', '.', '+', '-' (at most 127) (got 'vg 0')"),
    ("DRBD backing size without a unit", _set("mail.drbd_backing", {"size": "20"}), "mail.drbd_backing.size",
     "not a volume size: PERCENT%FREE or PERCENT%VG (1-100, e.g. 100%FREE), or a size such as 900M or 20G "
     "(K, M, G, T) (got '20')"),
]


@pytest.mark.parametrize("name,change,path,message", CASES, ids=[c[0] for c in CASES])
def test_invalid_inventory_is_refused(name, change, path, message):
    assert (path, message) in problems_of(mutate(change))


def test_drbd_backing_defaults_and_values():
    from fabfile.core.inventory import DrbdBacking

    b = DrbdBacking()
    assert (b.disk, b.volume_group, b.volume, b.size) == ("/dev/vdb", "vg0", "mail", "100%FREE")
    assert (b.device, b.lvcreate_size) == ("/dev/vg0/mail", ("-l", "100%FREE"))
    assert DrbdBacking(size="80%VG").lvcreate_size == ("-l", "80%VG")
    assert DrbdBacking(size="900M").lvcreate_size == ("-L", "900M")
    assert DrbdBacking(size="1.5T").lvcreate_size == ("-L", "1.5T")
    assert DrbdBacking(disk="/dev/disk/by-id/virtio-hastack-disk0").disk == "/dev/disk/by-id/virtio-hastack-disk0"
    assert DrbdBacking(disk="/dev/disk/by-path/pci-0000:00:08.0").disk.endswith("08.0")


@pytest.mark.parametrize("key, value", [
    ("disk", "/dev/vdb; rm -rf /"), ("disk", "/dev/vdb\n"), ("disk", "/dev/../etc/passwd"), ("disk", "/dev/"),
    ("disk", "/dev/$(id)"), ("disk", "/etc/vdb"), ("disk", "/dev/vd b"),
    ("volume_group", "-vg"), ("volume_group", "vg/0"), ("volume_group", "vg0\n"), ("volume_group", ""),
    ("volume", "mail;id"), ("volume", "."), ("volume", "'mail'"),
    ("size", "0%FREE"), ("size", "101%FREE"), ("size", "100%free"), ("size", "20 G"), ("size", "-20G"),
    ("size", "20G\n"), ("size", "20g"), ("size", "100%PVS"),
])
def test_drbd_backing_refuses(key, value):
    from pydantic import ValidationError

    from fabfile.core.inventory import DrbdBacking

    with pytest.raises(ValidationError, match=key):
        DrbdBacking(**{key: value})


def test_enough_invalid_cases():
    assert len(CASES) >= 20


def test_duplicate_host_name():
    text = yaml.safe_dump(BASE, sort_keys=False)
    text = text.replace("  pxc2:\n", "  pxc1:\n", 1)
    with pytest.raises(InventoryError) as info:
        parse(text, "site.yml")
    (loc, msg), = info.value.problems
    assert msg.startswith("malformed YAML at line ") and msg.endswith("duplicate key 'pxc1'")


def test_malformed_yaml():
    with pytest.raises(InventoryError) as info:
        parse("site: {name: t\nhosts: [", "broken.yml")
    assert str(info.value).startswith("invalid inventory\n  broken.yml: malformed YAML at line ")


def test_not_a_mapping():
    with pytest.raises(InventoryError) as info:
        parse("- a\n- b\n", "list.yml")
    assert info.value.problems == [("", "the inventory must be a YAML mapping")]


def test_every_problem_is_reported_at_once():
    data = mutate(_set("hosts.pxc1.addresses.mail", "10.0.9.21"))
    data["hosts"]["pf2"]["roles"] = []
    assert len(problems_of(data)) == 2


def test_bad_inventory_from_the_command_line_is_one_clear_message(tmp_path):
    bad = tmp_path / "bad.yml"
    bad.write_text(yaml.safe_dump(mutate(_set("hosts.pxc1.addresses.mail", "10.0.9.21"))))
    out = subprocess.run(
        [sys.executable, "-m", "invoke", "deploy.all", "--check"], cwd=ROOT, capture_output=True, text=True,
        env={"INVOKE_INVENTORY": str(bad), "PATH": "/usr/bin:/bin"},
    )
    assert out.returncode == 1
    assert "Traceback" not in out.stderr + out.stdout
    assert f"{bad}: hosts.pxc1.addresses.mail: 10.0.9.21 is outside network mail (10.0.1.0/24)" in out.stderr
