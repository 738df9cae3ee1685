"""The lab as a whole: `lab_up` makes every piece (key, bridges, apt proxy,
power listener, cached root, disks, namespaces, containers) and waits for the
hosts; `lab_down` removes what the lab made, in the reverse order. Both are
idempotent and take the lab's lock; the tasks, the tests, the benchmarks and
the power listener (to boot a host again) call them."""

from __future__ import annotations

import math
import os
import shutil
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING

from ..core import UserError
from ..core.report import Report
from ..core.secrets import Secrets
from ..core.topology import FENCE_LAB_PORT, FENCE_LAB_SECRET
from ..core.wait import TimedOut, poll
from . import machines, networks, vm
from .apt_proxy import acng_pids, ensure_apt_proxy, listening
from .machines import NSPAWN_TMPFS
from .networks import NETNS_DIR
from .plan import STATE_DIR, Plan
from .system import (escape, is_mount, locked, mounts, processes, require_root, require_tools, say, stop_pids, tail,
                     umount)

if TYPE_CHECKING:
    from ..core.inventory import Inventory

PROJECT_ROOT = Path(__file__).resolve().parents[2]
MACHINE = "machine"  # what the report calls this machine beside the lab hosts
# `python -m LISTENER INVENTORY STATE_DIR` runs the power listener (fence.py).
LISTENER = "fabfile.lab.fence"
LISTENERS = (LISTENER, "fabfile.labfence")  # the old name: one started before the move still stops


def _result(report: Report, host: str, status: str, message: str) -> None:
    report.result(host, status, escape(message))


def seconds(value, what: str = "--timeout") -> float:
    """A timeout given by the operator: a positive number of seconds."""
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise UserError(f"{what} must be a number of seconds, not {value!r}") from None
    if not math.isfinite(number) or number <= 0:
        raise UserError(f"{what} must be a positive number of seconds, not {value!r}")
    return number


BOOT_TIMEOUT = 180  # seconds for containers to answer SSH
VM_BOOT_TIMEOUT = 600  # ... when a VM is among them (an emulated CPU boots in 1-2 minutes, more under load)


def lab_up(inv: Inventory, hosts: str | None = None, timeout: float | None = None, state_dir: Path | None = None,
           report: Report | None = None) -> dict:
    """Bring the lab (or the chosen hosts) up; return a summary dict."""
    plan = Plan(inv, state_dir or STATE_DIR)
    selected = plan.select(hosts)
    default = VM_BOOT_TIMEOUT if vm.vm_hosts(plan, selected) else BOOT_TIMEOUT
    timeout = seconds(default if timeout is None else timeout)
    require_root("lab.up")
    require_tools()
    own = report is None
    report = report or Report("lab.up")
    try:
        return _up(plan, selected, timeout, report)
    finally:
        if own:
            report.close()


def _up(plan: Plan, selected: list[str], timeout: float, report: Report) -> dict:
    inv = plan.inv
    t0 = time.monotonic()
    with locked(plan.state_dir, report):
        networks.check_machine(plan)
        vms = vm.vm_hosts(plan, selected)
        if vms:
            require_tools(vm.TOOLS)
            usable, why = vm.kvm_usable()
            report.note(escape(f"{', '.join(vms)} load kernel modules ("
                               f"{', '.join(sorted({m for h in vms for m in inv.hosts[h].kernel_modules}))}): "
                               f"qemu VMs, {'KVM (TCG if a guest stays silent)' if usable else f'TCG: {why}'}"))
        if machines.ensure_key(inv):
            _result(report, MACHINE, "changed", f"made the lab's SSH key {inv.key_file}")
        machines.ensure_run_mounts(plan)
        raised = machines.ensure_inotify_limits()
        if raised:
            _result(report, MACHINE, "changed", f"raised {', '.join(raised)} "
                                              "(every container's systemd takes inotify instances)")
        made = networks.ensure_bridges(plan)
        if made:
            _result(report, MACHINE, "changed", f"made bridges {', '.join(made)}; "
                                              f"{plan.bridges[plan.mgmt]} has {plan.bridge_interface}")
        if ensure_apt_proxy(plan):
            _result(report, MACHINE, "changed", f"started apt-cacher-ng on {plan.proxy_url} (cache {plan.apt_cache})")
        if ensure_fence_listener(plan):  # before the hosts boot: their cluster monitors it at once
            _result(report, MACHINE, "changed", f"started the fence_lab power listener on {plan.bridge_interface.ip}")
        built = machines.ensure_root(plan, report)
        _result(report, MACHINE, "changed" if built is not None else "ok",
                      f"cached root {plan.root}: " + (f"built in {built:.0f}s" if built is not None else "reused"))

        lower = {}
        if any(not vm.disk(plan, h).exists() for h in vms):
            # the VM hosts' image root (the cached root, a kernel, a head start of
            # packages): only for a new disk; an existing one boots its own root's kernel
            vm_root, vm_built = vm.ensure_vm_root(plan, vm.packages(plan, vm.vm_hosts(plan, list(inv.hosts))), report)
            lower = {h: vm_root for h in vms}
            _result(report, MACHINE, "changed" if vm_built is not None else "ok",
                    f"VM root {vm_root}: " + (f"built in {vm_built:.0f}s" if vm_built is not None else "reused"))

        running = [h for h in selected if machines.running_pid(plan, h)]
        to_start = [h for h in selected if h not in running]
        with ThreadPoolExecutor(max_workers=4) as pool:
            fresh = pool.map(lambda h: machines.prepare_disk(plan, h, lower.get(h)), to_start)
            new_disks = [h for h, new in zip(to_start, fresh) if new]
        replaced = machines.update_known_hosts(plan, selected)
        started = {}
        for host in to_start:
            if vm.is_vm(plan, host):
                started[host] = vm.start_vm(plan, host)
            else:
                networks.ensure_netns(plan, host)
                started[host] = machines.start_container(plan, host)
        states = machines.wait_ready(plan, started, timeout) if started else {}
    elapsed = time.monotonic() - t0
    for host, state in states.items():
        _result(report, host, "changed", f"booted{' on a new disk' if host in new_disks else ''}: systemd {state}")
    degraded = sorted(h for h, s in states.items() if s == "degraded")
    msg = f"{len(running)} hosts already running, {len(to_start)} started"
    if new_disks:
        msg += f" ({len(new_disks)} with new disks)"
    if replaced and new_disks:
        msg += f"; {len(replaced)} host keys written to {inv.known_hosts_file}"
    say(report, f"{msg} in {elapsed:.1f}s")
    if degraded:
        report.note(escape(f"note: systemd reports 'degraded' on {', '.join(degraded)} "
                           "(see: inv lab.ssh HOST -c 'systemctl --failed')"))
    return {"running": running, "started": to_start, "new_disks": new_disks, "seconds": elapsed,
            "root_seconds": built, "states": states}


def lab_down(inv: Inventory, purge: bool = False, disks: bool = False, state_dir: Path | None = None,
             report: Report | None = None) -> list[str]:
    """Stop every host of this lab and remove what the lab made; return what was removed."""
    plan = Plan(inv, state_dir or STATE_DIR)
    require_root("lab.down")
    own = report is None
    report = report or Report("lab.down")
    try:
        with locked(plan.state_dir, report):
            return _down(plan, purge, disks)
    finally:
        if own:
            report.close()


def _down(plan: Plan, purge: bool, disks: bool) -> list[str]:
    done: list[str] = []
    hosts_dir = plan.dir / "hosts"
    on_disk = [p.name for p in hosts_dir.iterdir() if p.is_dir()] if hosts_dir.is_dir() else []
    known = list(dict.fromkeys([*plan.inv.hosts, *on_disk]))
    # 1. containers: SIGTERM asks nspawn for an orderly poweroff.
    needle = str(hosts_dir) + "/"
    pids = [pid for pid, argv in processes()
            if os.path.basename(argv[0]) == "systemd-nspawn"
            and any(a.startswith("--directory=" + needle) for a in argv)]
    if pids:
        stop_pids(pids, grace=30)
        done.append(f"{len(pids)} containers")
    vms = vm.lab_pids(plan)
    if vms:  # SIGTERM: qemu stops the VM at once (their disks are kept, as after a power cut)
        stop_pids(vms, grace=10)
        done.append(f"{len(vms)} VMs")
    for host in known:  # anything still in the hosts' cgroups (nothing, normally)
        machines.remove_cgroups(plan, host)
    machines.remove_stray_cgroups(plan)
    machines.remove_cgroup_parent()
    # 2. the apt proxy and the fence listener
    fence = fence_listener_pids(plan)
    if fence:
        stop_pids(fence, grace=5)
        done.append("fence listener")
    acng = acng_pids(plan)
    if acng:
        stop_pids(acng, grace=10)
        done.append("apt-cacher-ng")
    # 3. mounts: the hosts' overlays
    ours = [Path(p) for p in mounts() if p.startswith(str(plan.dir) + "/")]
    for point in reversed(ours):
        umount(point)
    if ours:
        done.append(f"{len(ours)} mounts")
    # 4. namespaces (their veth ends go with them), stray veths, bridges
    done += networks.remove_networks(plan, known)
    # 5. machine-wide mounts the lab made, once no lab is left using them
    if not _any_nspawn(plan.state_dir):
        marker = plan.state_dir / "made-nspawn-tmpfs"
        if marker.exists() and is_mount(NSPAWN_TMPFS):
            umount(NSPAWN_TMPFS)
            done.append(str(NSPAWN_TMPFS))
        marker.unlink(missing_ok=True)
    marker = plan.state_dir / "made-run-netns"
    if marker.exists() and is_mount(NETNS_DIR) and not any(NETNS_DIR.iterdir()):
        umount(NETNS_DIR)
        marker.unlink(missing_ok=True)
        done.append(str(NETNS_DIR))
    if disks and not purge:
        if hosts_dir.exists():
            shutil.rmtree(hosts_dir)
            done.append(f"the hosts' disks ({hosts_dir})")
    if purge:
        gone = [p for p in (plan.dir, plan.roots_dir) if p.exists()]
        for path in gone:
            shutil.rmtree(path)
        if gone:
            done.append("disks and cached root (" + ", ".join(str(p) for p in gone) + ")")
    return done


def _any_nspawn(state_dir: Path) -> bool:
    needle = "--directory=" + str(state_dir) + "/"
    return any(os.path.basename(argv[0]) == "systemd-nspawn" and any(a.startswith(needle) for a in argv)
               for _, argv in processes())


# --- the power listener's process (what it does: fence.py) ------------------


def _listener_address(plan: Plan) -> str:
    return f"{plan.bridge_interface.ip}:{FENCE_LAB_PORT}"


def fence_listener_pids(plan: Plan) -> list[int]:
    """The listener of this lab: started for this inventory, or bound to this
    lab's bridge address from another checkout of the same lab (it holds the
    address, with another secrets file: it must go)."""
    inventory = str(Path(plan.inv.path).resolve())
    address = _listener_address(plan)
    return [pid for pid, argv in processes() if any(m in argv for m in LISTENERS)
            and (inventory in argv or address in argv)]


def ensure_fence_listener(plan: Plan) -> bool:
    """The power listener fence_lab talks to, when the inventory fences with fence_lab."""
    if plan.inv.mail is None or plan.inv.mail.fence_agent != "fence_lab":
        return False
    inventory = str(Path(plan.inv.path).resolve())
    running = {pid: argv for pid, argv in processes() if pid in fence_listener_pids(plan)}
    if any(inventory in argv for argv in running.values()):
        return False
    if running:  # another checkout's listener on this lab's address: its secret is not ours
        stop_pids(list(running), grace=5)
    Secrets(plan.inv.site_file("secrets.yml")).get(FENCE_LAB_SECRET)  # made now, before the listener reads it
    log = plan.dir / "fence-listener.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "ab") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", LISTENER, inventory, str(plan.state_dir), _listener_address(plan)],
            stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
            start_new_session=True, cwd=str(PROJECT_ROOT), close_fds=True,
        )
    address = (str(plan.bridge_interface.ip), FENCE_LAB_PORT)
    try:  # ours must be the one listening: one that died (address in use) gives up at once
        poll(lambda: proc.poll() is None and listening(address), bool, timeout=15, interval=0.2,
             what=f"the fence listener on {address[0]}:{address[1]}",
             give_up=lambda _v, _s: "it exited" if proc.poll() is not None else None)
    except TimedOut:
        raise UserError(f"the fence listener did not start on {address[0]}:{address[1]}\n{tail(log)}") from None
    return True
