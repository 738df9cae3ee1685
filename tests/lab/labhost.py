"""The lab as tests see it: the loaded inventory plus real SSH to its hosts.

Tier tests get it from the session fixture `lab` (tests/lab/conftest.py):

    def test_something(lab):
        r = lab.run("e1server", "systemctl is-active ejabberd")
        assert r.returncode == 0, r.stderr
        lab.inv.with_role("ejabberd")          # the Inventory
        lab.address("e1server", "dmz")         # "10.200.1.2"
"""

from __future__ import annotations

import subprocess
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from fabfile import lab as labmod
from fabfile.core.inventory import Inventory


class RemoteCommandFailed(AssertionError):
    pass


@dataclass
class LabHosts:
    inv: Inventory
    state_dir: Path = field(default_factory=lambda: labmod.STATE_DIR)

    @property
    def inventory(self) -> Inventory:
        return self.inv

    @property
    def plan(self) -> labmod.Plan:
        return labmod.Plan(self.inv, self.state_dir)

    @property
    def hosts(self) -> list[str]:
        return list(self.inv.hosts)

    def address(self, host: str, network: str | None = None) -> str:
        return str(self.inv.hosts[host].addresses[network or self.inv.management_network])

    def ssh_command(self, host: str) -> list[str]:
        return labmod.ssh_command(self.inv, host)

    def run(self, host: str, cmd: str, *, timeout: float = 120, check: bool = False,
            input: str | None = None) -> subprocess.CompletedProcess:
        """Run `cmd` (a shell command line) on `host` as the inventory's SSH user, over real SSH."""
        proc = subprocess.run(
            [*self.ssh_command(host), cmd],
            capture_output=True, text=True, timeout=timeout,
            input=input, stdin=None if input is not None else subprocess.DEVNULL,
        )
        if check and proc.returncode != 0:
            raise RemoteCommandFailed(
                f"{host}: `{cmd}` exited {proc.returncode}\nstdout: {proc.stdout}\nstderr: {proc.stderr}"
            )
        return proc

    def run_all(self, hosts: list[str], cmd: str, **kw) -> dict[str, subprocess.CompletedProcess]:
        """`run` on several hosts at once."""
        with ThreadPoolExecutor(max_workers=8) as pool:
            return dict(zip(hosts, pool.map(lambda h: self.run(h, cmd, **kw), hosts)))

    def up(self, hosts: str | None = None) -> dict:
        return labmod.lab_up(self.inv, hosts=hosts, state_dir=self.state_dir)

    def down(self, purge: bool = False) -> list[str]:
        return labmod.lab_down(self.inv, purge=purge, state_dir=self.state_dir)
