"""The plan: every name, path and address the lab uses for one inventory.

Pure: reads the inventory, touches nothing on the machine. Names on the
machine carry the inventory's lab.bridge_prefix: bridges `<prefix>-<network>`,
namespaces `<prefix>-<host>`, veths `<prefix><NN>-<network>`, cgroups
`hastack-lab/<prefix>-<host>`.
"""

from __future__ import annotations

import hashlib
import ipaddress
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING
from urllib.parse import urlparse

from ..core import UserError

if TYPE_CHECKING:
    from ..core.inventory import Inventory

STATE_DIR = Path(os.environ.get("HASTACK_LAB_STATE", "/var/lib/hastack-lab"))

SUITE = "bookworm"
MIRROR = "http://deb.debian.org/debian"
SECURITY_MIRROR = "http://deb.debian.org/debian-security"
# What every lab host has before any tier runs: a bootable systemd, sshd, python
# for the tiers, and the tools later tiers' tests use to probe networking.
PACKAGES = (
    "systemd", "systemd-sysv", "dbus", "openssh-server", "iproute2", "python3", "sudo",
    "iputils-ping", "netcat-openbsd", "iptables", "ca-certificates", "curl", "gnupg",
    "procps", "less",
)  # fmt: skip
# Bump when machines._finalize_root changes what it writes: a new cached root is built.
ROOT_LAYOUT = 1
DEBOOTSTRAP_ARGS = ("--variant=minbase", f"--include={','.join(PACKAGES)}", SUITE, MIRROR)
DEFAULT_PROXY_PORT = 3142


def root_name() -> str:
    """The cached root's directory name: changes whenever what goes into it changes."""
    digest = hashlib.sha256(repr((DEBOOTSTRAP_ARGS, ROOT_LAYOUT)).encode()).hexdigest()[:12]
    return f"{SUITE}-{digest}"


@dataclass
class Plan:
    inv: Inventory
    state_dir: Path = field(default_factory=lambda: STATE_DIR)

    def __post_init__(self):
        # here, not at the top: the inventory module (pydantic) loads when a task runs, not for `inv --list`
        from ..core.inventory import Lab as LabSettings

        settings = self.inv.lab or LabSettings()
        self.prefix = settings.bridge_prefix
        self.marker = f"hastack-lab:{self.prefix}"
        self.dir = self.state_dir / "labs" / self.prefix
        self.roots_dir = self.state_dir / "roots"
        self.root = self.roots_dir / root_name()
        self.apt_cache = self.state_dir / "apt-cache" / self.prefix
        self.acng_dir = self.dir / "apt-cacher-ng"
        self.mgmt = self.inv.management_network
        self.bridges = self._bridge_names()
        self.veths = self._veth_names()

    # --- names ------------------------------------------------------------

    def _bridge_names(self) -> dict[str, str]:
        names = {}
        for i, net in enumerate(self.inv.networks):
            name = f"{self.prefix}-{net}"
            if len(name) > 15 or name in names.values():
                name = f"{self.prefix}-n{i}"
            names[net] = name
        return names

    def _veth_names(self) -> dict[tuple[str, str], str]:
        """Machine-side veth names (15 chars at most): <prefix><host index>-<network>."""
        names: dict[tuple[str, str], str] = {}
        for hi, (host, spec) in enumerate(self.inv.hosts.items()):
            for ni, net in enumerate(self.inv.networks):
                if net not in spec.addresses:
                    continue
                name = f"{self.prefix}{hi:02d}-{net}"
                if len(name) > 15:
                    name = f"{self.prefix}{hi:02d}-{ni}"
                names[(host, net)] = name
        return names

    def netns(self, host: str) -> str:
        return f"{self.prefix}-{host}"

    def cgroup(self, host: str) -> str:
        return f"hastack-lab/{self.prefix}-{host}"

    # --- paths ------------------------------------------------------------

    def host_dir(self, host: str) -> Path:
        return self.dir / "hosts" / host

    def merged(self, host: str) -> Path:
        return self.host_dir(host) / "root"

    def console_log(self, host: str) -> Path:
        return self.dir / "console" / f"{host}.log"

    # --- addresses --------------------------------------------------------

    @property
    def bridge_interface(self) -> ipaddress.IPv4Interface:
        """The machine's address on the management bridge: the first usable one."""
        net = self.inv.networks[self.mgmt].cidr
        return ipaddress.IPv4Interface(f"{next(net.hosts())}/{net.prefixlen}")

    @property
    def proxy_port(self) -> int:
        url = self.inv.site.apt_proxy
        return (urlparse(url).port if url else None) or DEFAULT_PROXY_PORT

    @property
    def proxy_url(self) -> str:
        return f"http://{self.bridge_interface.ip}:{self.proxy_port}"

    def nics(self, host: str) -> list[tuple[str, ipaddress.IPv4Interface]]:
        """(network name = NIC name, address/prefix) in inventory network order."""
        spec = self.inv.hosts[host]
        return [
            (net, ipaddress.IPv4Interface(f"{spec.addresses[net]}/{self.inv.networks[net].cidr.prefixlen}"))
            for net in self.inv.networks
            if net in spec.addresses
        ]

    # --- the operator's choice of hosts -------------------------------------

    def select(self, hosts: str | None) -> list[str]:
        """The hosts named by --hosts, in inventory order (None: every host): `Inventory.select`."""
        return self.inv.select(hosts)

    def host(self, host: str) -> str:
        """`host` if it is an inventory host; else an error naming it and the known ones."""
        if host not in self.inv.hosts:
            raise UserError(f"unknown host {host}; the inventory {self.inv.path} has: {', '.join(self.inv.hosts)}")
        return host
