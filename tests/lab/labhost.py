"""The lab as tests see it: the loaded inventory plus real SSH to its hosts.

Tier tests get it from the session fixture `lab` (tests/lab/conftest.py):

    def test_something(lab):
        r = lab.run("e1server", "systemctl is-active ejabberd")
        assert r.returncode == 0, r.stderr
        lab.inv.with_role("ejabberd")          # the Inventory
        lab.address("e1server", "dmz")         # "10.200.1.2"
"""

from __future__ import annotations

import os
import re
import subprocess
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from fabfile import lab as labmod
from fabfile.core.inventory import Inventory
from fabfile.core.tasks import DEFAULT_INVENTORY, PROJECT_ROOT

INV_BIN = PROJECT_ROOT / ".venv" / "bin" / "inv"


def lab_inventory_path() -> Path:
    """The inventory the lab tests bring up: HASTACK_LAB_INVENTORY, else the default lab."""
    return Path(os.environ.get("HASTACK_LAB_INVENTORY") or PROJECT_ROOT / DEFAULT_INVENTORY)


def run_inv(*args: str, inventory: Path | None = None, env: dict | None = None,
            user: int | None = None, timeout: float = 1800) -> subprocess.CompletedProcess:
    """`inv ARGS` from the project root, as an operator runs it (INVOKE_INVENTORY names the inventory)."""
    env = dict(os.environ if env is None else env)
    if inventory is not None or "INVOKE_INVENTORY" not in env:
        env["INVOKE_INVENTORY"] = str(inventory or lab_inventory_path())
    cmd = [str(INV_BIN), *args]
    if user is not None:
        cmd = ["setpriv", f"--reuid={user}", f"--regid={user}", "--clear-groups", *cmd]
    return subprocess.run(cmd, cwd=PROJECT_ROOT, capture_output=True, text=True, timeout=timeout, env=env)


def recap(out: subprocess.CompletedProcess) -> tuple[int, int, int]:
    """(ok, changed, failed) from a runbook's summary line."""
    m = re.search(r"(\d+) ok, (\d+) (?:would )?change[d]?, (\d+) failed", out.stdout)
    assert m, f"no recap in the output:\n{out.stdout[-3000:]}\n{out.stderr[-2000:]}"
    return int(m[1]), int(m[2]), int(m[3])


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

    def vip_holders(self, vip: str) -> list[str]:
        """The hosts that carry the inventory's VIP `vip` right now (normally none or one)."""
        v = self.inv.vips[vip]
        held = self.run_all(self.inv.with_role(v.role), f"ip -o -4 addr show | grep -q ' {v.address}/'")
        return [h for h, r in held.items() if r.returncode == 0]

    def invoke(self, *args: str, **kw) -> subprocess.CompletedProcess:
        """`inv ARGS` against this lab's inventory."""
        return run_inv(*args, inventory=self.inv.path, **kw)

    def converge(self, *tasks: str, timeout: float = 3600) -> subprocess.CompletedProcess:
        """Run deploy tasks in order and assert each succeeds; returns the last output.

        A lab brought up again from its disks is a site after a power cut: every
        Galera node was stopped, and pxc.deploy refuses to guess. The operator's
        cold start, `inv pxc.bootstrap --yes`, runs first then."""
        out = None
        for task in tasks:
            args = task.split()
            out = self.invoke(*args, timeout=timeout)
            if out.returncode != 0 and "run `inv pxc.bootstrap`" in out.stdout:
                cold = self.invoke("pxc.bootstrap", "--yes", timeout=timeout)
                assert cold.returncode == 0, f"inv pxc.bootstrap failed:\n{cold.stdout[-4000:]}\n{cold.stderr[-2000:]}"
                out = self.invoke(*args, timeout=timeout)
            assert out.returncode == 0, f"inv {task} failed:\n{out.stdout[-5000:]}\n{out.stderr[-3000:]}"
        return out

    def up(self, hosts: str | None = None) -> dict:
        return labmod.lab_up(self.inv, hosts=hosts, state_dir=self.state_dir)

    def down(self, purge: bool = False, disks: bool = False) -> list[str]:
        return labmod.lab_down(self.inv, purge=purge, disks=disks, state_dir=self.state_dir)
