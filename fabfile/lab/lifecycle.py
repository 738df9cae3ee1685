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
from . import machines, networks
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


def lab_up(inv: Inventory, hosts: str | None = None, timeout: float = 180, state_dir: Path | None = None,
           report: Report | None = None) -> dict:
    """Bring the lab (or the chosen hosts) up; return a summary dict."""
    plan = Plan(inv, state_dir or STATE_DIR)
    timeout = seconds(timeout)
    selected = plan.select(hosts)
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
        with_modules = [f"{h} ({', '.join(inv.hosts[h].kernel_modules)})" for h in selected if inv.hosts[h].kernel_modules]
        if with_modules:
            report.note(escape(f"note: {', '.join(with_modules)} want kernel modules; a container cannot load "
                               "them, so these hosts run as containers without them (see the README's fidelity table)"))
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

        running = [h for h in selected if machines.running_pid(plan, h)]
        to_start = [h for h in selected if h not in running]
        with ThreadPoolExecutor(max_workers=4) as pool:
            fresh = pool.map(lambda h: machines.prepare_disk(plan, h), to_start)
            new_disks = [h for h, new in zip(to_start, fresh) if new]
        replaced = machines.update_known_hosts(plan, selected)
        started = {}
        for host in to_start:
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
