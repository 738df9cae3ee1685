"""The Vagrantfile builds exactly the machines the inventory describes.

inventory/vagrant.yml is checked with the core's validator (fast, no Vagrant).
The Vagrantfile is checked by asking Vagrant itself: with HASTACK_VAGRANT_DUMP
set, `vagrant validate` writes the machine list from the config objects it
evaluated (names, networks, provider settings, disks, provisioners; see the
HAStackVagrant plugin in the Vagrantfile), and that list is compared with the
inventory. Those tests need Debian's `vagrant` and `vagrant-libvirt` packages
and skip without them; no box is downloaded and no VM is started.
"""

from __future__ import annotations

import ipaddress
import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from fabfile.core.inventory import Inventory, load

ROOT = Path(__file__).resolve().parents[2]
VAGRANT_INVENTORY = ROOT / "inventory" / "vagrant.yml"
VAGRANT = shutil.which("vagrant")

needs_vagrant = pytest.mark.skipif(
    VAGRANT is None,
    reason="vagrant is not installed (apt-get install vagrant vagrant-libvirt)",
)


# --- the inventory (fast) -----------------------------------------------------


@pytest.fixture(scope="module")
def inv() -> Inventory:
    return load(VAGRANT_INVENTORY)


def test_vagrant_inventory_validates(inv):
    assert inv.management_network == "mgmt"
    assert inv.site.name == "vagrant"


def test_mail_hosts_have_the_seed_addresses(inv):
    expected = {
        "ngx01": 111, "ngx02": 112,
        "postfix01": 113, "postfix02": 114,
        "pxc1": 120, "pxc2": 121, "pxc3": 122,
    }
    assert inv.networks["mail"].cidr == ipaddress.ip_network("192.168.11.0/24")
    for host, last in expected.items():
        assert str(inv.hosts[host].addresses["mail"]) == f"192.168.11.{last}"
        assert inv.management_address(host) == f"192.168.121.{last}"
    assert {name: str(vip.address) for name, vip in inv.vips.items() if vip.network == "mail"} == {
        "webmail": "192.168.11.100",
        "mail": "192.168.11.110",
        "dbproxy": "192.168.11.116",
    }


def test_xmpp_hosts_have_the_seed_addresses(inv):
    assert inv.networks["mgmt"].cidr == ipaddress.ip_network("192.168.121.0/24")
    assert inv.networks["dmz"].cidr == ipaddress.ip_network("192.168.1.0/29")
    assert inv.networks["internal"].cidr == ipaddress.ip_network("192.168.1.8/29")
    expected = {
        "e1server": (10, {"dmz": "192.168.1.2"}),
        "e2server": (11, {"dmz": "192.168.1.3"}),
        "psql1server": (12, {"internal": "192.168.1.10"}),
        "psql2server": (13, {"internal": "192.168.1.11"}),
        "gw1server": (14, {"dmz": "192.168.1.1", "internal": "192.168.1.9"}),
        "bk1server": (15, {"internal": "192.168.1.12"}),
        "mon1server": (16, {"internal": "192.168.1.13", "mail": "192.168.11.130"}),  # scrapes the mail cluster
        # the seed's internal address, and one on the DMZ so it can replace an ejabberd node
        "r1server": (17, {"internal": "192.168.1.14", "dmz": "192.168.1.5"}),
    }
    for host, (last, others) in expected.items():
        addresses = {net: str(a) for net, a in inv.hosts[host].addresses.items()}
        assert addresses == {"mgmt": f"192.168.121.{last}", **others}, host
    assert inv.hosts["r1server"].roles == ["spare"]


def test_production_settings(inv):
    assert inv.mail is not None and inv.xmpp is not None
    assert (inv.mail.galera_flavour, inv.mail.db_proxy, inv.mail.storage) == ("percona", "proxysql", "drbd")
    assert inv.mail.fence_agent in ("fence_virsh", "fence_vbox")
    assert inv.lab is None, "the Vagrant site has no lab stand-ins"
    for name in inv.with_role("mail_backend"):
        host = inv.hosts[name]
        assert host.disks_gb and host.disks_gb[0] >= 10, f"{name} needs a DRBD backing disk"
        assert "drbd" in host.kernel_modules


def test_drbd_8_4_on_two_back_ends_on_the_attached_disk(inv):
    """Debian's kernel DRBD 8.4 (no third-party repository) replicates between two
    nodes: the drbd tier accepts the site, and its backing disk is the one the
    Vagrantfile attaches with libvirt (the first virtio disk after the box's vda)."""
    from fabfile import drbd

    assert inv.mail.drbd_version == 8 and inv.with_role("mail_backend") == ["postfix01", "postfix02"]
    drbd.check(inv)
    assert drbd.members(inv) == ["postfix01", "postfix02"]
    b = inv.mail.drbd_backing
    assert (b.disk, b.device, b.size) == ("/dev/vdb", "/dev/vg0/mail", "100%FREE")
    for name in inv.with_role("galera"):
        assert inv.hosts[name].memory_mb >= 2048, "Percona XtraDB Cluster wants 2 GiB"


# --- what Vagrant builds from it ------------------------------------------------


def vagrant_validate(provider: str, workdir: Path, *args: str, inventory: Path | None = None):
    """Run `vagrant validate` in the project; return (process, machines dumped)."""
    dump = workdir / f"machines-{provider}.json"
    env = {
        **os.environ,
        "VAGRANT_DEFAULT_PROVIDER": provider,
        "HASTACK_VAGRANT_DUMP": str(dump),
        # Keep Vagrant's per-project state out of the work tree.
        "VAGRANT_DOTFILE_PATH": str(workdir / "dotfile"),
        "VAGRANT_CHECKPOINT_DISABLE": "1",
        "VAGRANT_NO_COLOR": "1",
    }
    env.pop("HASTACK_INVENTORY", None)
    if inventory is not None:
        env["HASTACK_INVENTORY"] = str(inventory)
    proc = subprocess.run(
        [VAGRANT, "validate", *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300
    )
    machines = json.loads(dump.read_text()) if dump.exists() else None
    return proc, machines


def isolated(inv: Inventory, net: str) -> bool:
    """The Vagrantfile's rule: a network whose first address is taken by a host
    or VIP is isolated from the machine running Vagrant; otherwise the machine
    gets that first address."""
    first = inv.networks[net].cidr.network_address + 1
    used = {a for h in inv.hosts.values() for a in h.addresses.values()} | {v.address for v in inv.vips.values()}
    return first in used


@pytest.fixture(scope="module")
def libvirt_machines(inv, tmp_path_factory):
    """`VAGRANT_DEFAULT_PROVIDER=libvirt vagrant validate` on the default inventory."""
    proc, machines = vagrant_validate("libvirt", tmp_path_factory.mktemp("libvirt"))
    if proc.returncode != 0 and "provider 'libvirt' could not be found" in proc.stdout + proc.stderr:
        pytest.skip("the vagrant-libvirt plugin is not installed (apt-get install vagrant-libvirt)")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "Vagrantfile validated successfully" in proc.stdout
    return machines


@pytest.fixture(scope="module")
def virtualbox_run(tmp_path_factory):
    """`vagrant validate --ignore-provider` with virtualbox on a copy of the
    inventory that has its own SSH key (VirtualBox itself is not in Debian)."""
    work = tmp_path_factory.mktemp("virtualbox")
    site = work / "site.yml"
    shutil.copy(VAGRANT_INVENTORY, site)
    subprocess.run(
        ["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", "test-key", "-f", str(work / "site.id_ed25519")],
        check=True,
    )
    proc, machines = vagrant_validate("virtualbox", work, "--ignore-provider", inventory=site)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "Vagrantfile validated successfully" in proc.stdout
    return work, proc, machines


def expected_networks(inv: Inventory, host: str) -> list[tuple[str, str, str]]:
    """(network, address, netmask) per interface, in the inventory's network order."""
    addresses = inv.hosts[host].addresses
    return [
        (net, str(addresses[net]), str(inv.networks[net].cidr.netmask))
        for net in inv.networks
        if net in addresses
    ]


def check_common(inv: Inventory, machines: dict, provider: str):
    assert machines is not None, "the Vagrantfile wrote no machine list"
    assert list(machines) == list(inv.hosts), "machines differ from the inventory's hosts"
    for name, m in machines.items():
        assert m["provider"] == provider
        assert m["box"] == "debian/bookworm64"
        assert m["hostname"] == name  # short, as the base tier sets it
        assert m["synced_folders"]["/vagrant"]["disabled"] is True
        got = [(n["hastack__network"], n["ip"], n["netmask"]) for n in m["networks"]]
        assert got == expected_networks(inv, name), name
        assert [p["name"] for p in m["provisioners"]] == ["authorized-key"]


@needs_vagrant
def test_libvirt_machines_equal_the_inventory(inv, libvirt_machines):
    check_common(inv, libvirt_machines, "libvirt")
    site = inv.site.name
    link = ipaddress.ip_network(libvirt_machines["ngx01"]["libvirt"]["management_network_address"])
    assert not any(link.overlaps(n.cidr) for n in inv.networks.values()), "Vagrant's link overlaps a site network"
    for name, m in libvirt_machines.items():
        host, lv = inv.hosts[name], m["libvirt"]
        assert (lv["cpus"], lv["memory"]) == (host.cpus, host.memory_mb), name
        assert lv["domain"] == f"{site}-{name}"
        assert lv["qemu_use_session"] is False
        assert [d["size"] for d in lv["disks"]] == [f"{gb}G" for gb in host.disks_gb], name
        for net in m["networks"]:
            name_ = net["hastack__network"]
            assert net["libvirt__network_name"] == f"{site}-{name_}"
            assert net["libvirt__dhcp_enabled"] is False
            if isolated(inv, name_):
                assert net["libvirt__forward_mode"] == "veryisolated"
                assert "libvirt__host_ip" not in net
            else:
                assert net["libvirt__forward_mode"] == "none"
                assert net["libvirt__host_ip"] == str(inv.networks[name_].cidr.network_address + 1)


@needs_vagrant
def test_drbd_disks_on_the_mail_back_ends(inv, libvirt_machines):
    with_disks = {name for name, m in libvirt_machines.items() if m["libvirt"]["disks"]}
    assert with_disks == set(inv.with_role("mail_backend")) == {"postfix01", "postfix02"}


@needs_vagrant
def test_management_network_reaches_every_host(inv, libvirt_machines):
    """The tasks connect over mgmt: every VM has its inventory address there,
    on a network the machine running Vagrant is on."""
    assert not isolated(inv, "mgmt")
    for name, m in libvirt_machines.items():
        mgmt = [n for n in m["networks"] if n["hastack__network"] == "mgmt"]
        assert [n["ip"] for n in mgmt] == [inv.management_address(name)]


@needs_vagrant
def test_virtualbox_machines_equal_the_inventory(inv, virtualbox_run):
    work, proc, machines = virtualbox_run
    check_common(inv, machines, "virtualbox")
    site = inv.site.name
    for name, m in machines.items():
        host, vb = inv.hosts[name], machines[name]["virtualbox"]
        assert vb["name"] == f"{site}-{name}"
        commands = [c["command"] for c in vb["customize"]]
        assert ["modifyvm", "id", "--cpus", host.cpus] in commands
        assert ["modifyvm", "id", "--memory", str(host.memory_mb)] in commands
        created = [c for c in commands if c[0] == "createmedium"]
        attached = [c for c in commands if c[0] == "storageattach"]
        assert [c[c.index("--size") + 1] for c in created] == [gb * 1024 for gb in host.disks_gb], name
        assert [c[c.index("--medium") + 1] for c in attached] == [c[c.index("--filename") + 1] for c in created]
        for net in m["networks"]:
            name_ = net["hastack__network"]
            if isolated(inv, name_):
                assert net["virtualbox__intnet"] == f"{site}-{name_}"  # internal network
            else:
                assert "virtualbox__intnet" not in net  # host-only: the machine is on .1


@needs_vagrant
def test_provisioning_installs_the_inventory_key_for_root(virtualbox_run):
    work, proc, machines = virtualbox_run
    public_key = (work / "site.id_ed25519.pub").read_text().strip()
    for name, m in machines.items():
        script = m["provisioners"][0]["inline"]
        assert public_key.split()[1] in script, name
        assert "/root/.ssh/authorized_keys" in script


@needs_vagrant
def test_fence_agent_mismatch_is_reported(inv, virtualbox_run):
    work, proc, machines = virtualbox_run
    if inv.mail.fence_agent == "fence_virsh":
        assert "set mail.fence_agent: fence_vbox" in proc.stdout + proc.stderr


@needs_vagrant
def test_a_bad_inventory_is_refused_with_file_and_key(tmp_path):
    data = yaml.safe_load(VAGRANT_INVENTORY.read_text())
    data["hosts"]["ngx01"]["addresses"]["mail"] = "192.168.12.111"
    bad = tmp_path / "bad.yml"
    bad.write_text(yaml.safe_dump(data))
    proc, machines = vagrant_validate("libvirt", tmp_path, inventory=bad)
    assert proc.returncode != 0
    assert f"{bad}: hosts.ngx01.addresses.mail: 192.168.12.111 is outside 192.168.11.0/24" in proc.stdout + proc.stderr
    assert machines is None
