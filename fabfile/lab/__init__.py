"""The embedded lab: real Debian hosts as systemd-nspawn containers on this machine.

`inv lab.up` turns every inventory host into a booted Debian 12 container with
its own network namespace, one NIC per inventory network (named after the
network: mgmt, mail, dmz, internal), joined to one Linux bridge per network.
Only the management bridge has an address on the machine; apt-cacher-ng on that
address is the hosts' only way to the Debian archive. A host that loads kernel
modules (`kernel_modules` in the inventory: DRBD) boots as a qemu VM instead,
with taps on the same bridges (`vm`).

Everything lives under STATE_DIR (/var/lib/hastack-lab):

    roots/bookworm-<hash>/        cached debootstrap root, shared read-only lower dir
    roots/bookworm-<hash>-vm-<h>/ the VM hosts' root: that root + a kernel and their packages
    apt-cache/<prefix>/           apt-cacher-ng's package cache (kept by --purge too)
    labs/<prefix>/hosts/<host>/   upper/ work/ root/ (the overlay: the host's disk);
                                  a VM's disk.img (made from its overlay once), disk1.img...
    labs/<prefix>/console/        each container's console log
    labs/<prefix>/apt-cacher-ng/  its config, logs and pid file

The package: `plan` (every name, path and address, from the inventory),
`system` (this machine: commands, processes, mounts), `networks` (bridges,
namespaces, veths), `apt_proxy`, `machines` (cached root, disks, containers,
keys, waits, power), `vm` (the VM hosts: image, disks, taps, qemu), `lifecycle` (lab_up / lab_down), `fence` (the fence_lab
power listener and its protocol; `python -m fabfile.lab.fence`), and here the
tasks: up, down, status, ssh, power.
"""

from __future__ import annotations

import subprocess
import sys

from invoke import Collection
from invoke.exceptions import Exit

from ..core import UserError, load_inventory, task
from ..core.report import Report
from .apt_proxy import acng_pids
from .lifecycle import lab_down, lab_up, seconds
from .machines import host_states, power_off, power_state, running_pid, ssh_command, update_known_hosts
from .plan import DEBOOTSTRAP_ARGS, STATE_DIR, Plan, root_name
from .system import require_root, root_builder, say

__all__ = [
    "DEBOOTSTRAP_ARGS", "STATE_DIR", "Plan", "host_states", "lab_down", "lab_up", "ns", "power_off",
    "power_state", "require_root", "root_builder", "root_name", "running_pid", "seconds", "ssh_command",
    "update_known_hosts",
]

POWER_ACTIONS = ("on", "off", "status")


@task(help={
    "hosts": "comma-separated host names to start (default: every inventory host)",
    "timeout": "seconds to wait for the hosts to answer SSH (default 180; 600 with VM hosts)",
})
def up(c, hosts=None, timeout=None):
    """Start the lab: one booted Debian container per inventory host, a qemu VM per host with kernel_modules (idempotent)."""
    # timeout defaults to None, not 180: invoke would parse the option as an int
    # then, and `--timeout abc` would end in its traceback instead of our message.
    lab_up(load_inventory(c, roles_file=False), hosts=hosts, timeout=None if timeout is None else seconds(timeout))


@task(help={
    "purge": "also delete the hosts' disks and the cached Debian root (the package cache stays)",
    "disks": "also delete the hosts' disks, keep the cached root (fresh hosts on the next lab.up)",
})
def down(c, purge=False, disks=False):
    """Stop every lab host and remove everything the lab made on this machine."""
    inv = load_inventory(c, roles_file=False)
    require_root("lab.down")
    report = Report("lab.down")
    try:
        done = lab_down(inv, purge=purge, disks=disks, report=report)
        say(report, "removed: " + ", ".join(done) if done else "nothing of the lab was running")
    finally:
        report.close()


@task
def status(c):
    """Show each lab host: state, kind (container or VM, and its accelerator), addresses, memory in use."""
    from rich.table import Table  # here, not at the top: `inv --list` stays fast without rich

    plan = Plan(load_inventory(c, roles_file=False))
    table = Table(title=f"lab {plan.inv.site.name} ({plan.inv.path})")
    for col in ("host", "state", "kind", "addresses", "memory", "roles"):
        table.add_column(col, justify="right" if col == "memory" else "left")
    colours = {"running": "green", "stopped": "yellow", "absent": "dim"}
    for row in host_states(plan):
        table.add_row(
            row["host"],
            f"[{colours[row['state']]}]{row['state']}[/]",
            row["kind"],
            ", ".join(f"{net} {iface.ip}" for net, iface in row["addresses"]),
            (f"{row['memory'] / 2**20:.0f} MiB" if row["memory"] is not None else "-")
            + (f" of {row['memory_max'] / 2**20:.0f}" if row["memory_max"] else ""),
            ", ".join(row["roles"]),
        )
    report = Report("lab.status")
    try:
        report.table(table)
        acng = "running" if acng_pids(plan) else "not running"
        say(report, f"apt proxy {plan.proxy_url}: {acng}; state dir {plan.state_dir}")
    finally:
        report.close()


@task(help={"host": "the lab host to log into", "command": "run this command instead of a shell; exit with its status"})
def ssh(c, host, command=None):
    """Open a shell on a lab host over SSH, or run one command (-c) and return its exit status."""
    inv = load_inventory(c, roles_file=False)
    plan = Plan(inv)
    plan.host(host)
    if running_pid(plan, host) is None:
        raise UserError(f"{host} is not running; start it with: inv lab.up --hosts {host}")
    if not inv.key_file.exists():
        raise UserError(f"the lab key {inv.key_file} is missing; inv lab.up makes it")
    interactive = command is None and sys.stdin.isatty()
    cmd = ssh_command(inv, host, batch=not interactive, tty=interactive)
    if command is not None:
        cmd.append(command)  # one argument: ssh hands it to the host's shell, as typed
    code = subprocess.run(cmd).returncode
    if code:
        raise Exit(code=code)


@task(help={"host": "the lab host", "action": "off (pull the plug), on (boot it), or status"})
def power(c, host, action):
    """Power one lab host off (hard), on, or show its power state: what fence_lab does."""
    if action not in POWER_ACTIONS:
        raise UserError(f"lab.power: action must be on, off or status, not {action!r}")
    inv = load_inventory(c, roles_file=False)
    plan = Plan(inv)
    plan.host(host)
    if action in ("on", "off"):
        require_root("lab.power")
    report = Report("lab.power")
    try:
        if action == "off":
            power_off(plan, host)
        elif action == "on" and power_state(plan, host) == "off":
            lab_up(inv, hosts=host, report=report)
        say(report, f"{host}: {power_state(plan, host)}")
    finally:
        report.close()


ns = Collection("lab", up, down, status, ssh, power)
