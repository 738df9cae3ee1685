#!/usr/bin/env python3
"""Measure `inv deploy.all` on the lab and print the figures.

    sudo .venv/bin/python scripts/bench_deploy.py              # fresh disks: first deploy, then a re-run
    sudo .venv/bin/python scripts/bench_deploy.py --floor      # ... and the package-install floor
    sudo .venv/bin/python scripts/bench_deploy.py --keep-disks # converge whatever the hosts have, then re-run

Figures: wall time of the first deploy onto fresh hosts (packages come from
the lab's apt-cacher-ng, so a warm package cache is part of the figure), and the
medians of --rounds re-runs (which must change nothing) and dry runs (--check),
alternating. Each line also gives the run's own recap counts. With --floor, each host's final package
set (`apt-mark showmanual` after the deploy) is then installed onto fresh hosts
again with one parallel `apt-get install` per host: the part of a deploy no
tool can skip; the first deploy's ratio to it is printed. For the first deploy
and the floor, the CPU time the whole machine spent (the lab's hosts share its
CPUs) and how busy it was every 10 s are printed too (benchcpu.py): on a machine
whose CPUs are busy throughout, the ratio of the CPU times bounds the ratio of
the wall times. Leaves the lab down unless --leave-up.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import contextlib
import io
import os
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchcpu import MachineCpu  # noqa: E402
from fabfile import lab  # noqa: E402
from fabfile.core.inventory import load  # noqa: E402
from fabfile.core.shell import APT_UPDATE  # noqa: E402
from fabfile.core.tasks import DEFAULT_INVENTORY, PROJECT_ROOT  # noqa: E402

RECAP = re.compile(r"(\d+) ok, (\d+) (?:would )?change[d]?, (\d+) failed on (\d+) hosts")


def deploy(inventory: Path, *args: str) -> tuple[float, str]:
    env = {**os.environ, "INVOKE_INVENTORY": str(inventory)}
    start = time.monotonic()
    out = subprocess.run([str(PROJECT_ROOT / ".venv/bin/inv"), "deploy.all", *args],
                         cwd=PROJECT_ROOT, env=env, capture_output=True, text=True)
    seconds = time.monotonic() - start
    if out.returncode != 0:
        sys.exit(f"inv deploy.all {' '.join(args)} failed:\n{out.stdout[-4000:]}\n{out.stderr[-2000:]}")
    m = RECAP.findall(out.stdout)
    return seconds, "%s ok, %s changed, %s failed on %s hosts" % m[-1] if m else "no recap"


def package_sets(inv) -> dict[str, list[str]]:
    """Each host's manually installed packages (what the deploy asked for, with the root's own)."""
    def one(host):
        out = subprocess.run([*lab.ssh_command(inv, host, batch=True), "apt-mark showmanual"],
                             capture_output=True, text=True, timeout=120)
        return host, out.stdout.split()
    with concurrent.futures.ThreadPoolExecutor(len(inv.hosts)) as pool:
        return dict(pool.map(one, inv.hosts))


def floor(inv, sets: dict[str, list[str]]) -> tuple[float, MachineCpu]:
    """Fresh hosts, then every host's package set at once (one apt-get install per host, in parallel)."""
    with contextlib.redirect_stdout(io.StringIO()):
        lab.lab_down(inv, disks=True)
        lab.lab_up(inv)
    def one(host):
        # What HostSession.packages runs: install, and when the lists are stale, a
        # bounded, retried apt-get update first.
        install = ("DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends "
                   "-o Dpkg::Options::=--force-confold " + " ".join(sets[host]))
        cmd = [*lab.ssh_command(inv, host, batch=True), f"{install} || ({APT_UPDATE} && {install})"]
        return subprocess.run(cmd, capture_output=True, text=True, timeout=3600).returncode
    start = time.monotonic()
    with MachineCpu(every=10) as cpu, concurrent.futures.ThreadPoolExecutor(len(inv.hosts)) as pool:
        codes = list(pool.map(one, inv.hosts))
    seconds = time.monotonic() - start
    if any(codes):
        sys.exit(f"the floor's apt-get install failed on {sum(1 for c in codes if c)} hosts")
    return seconds, cpu


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--inventory", default=str(PROJECT_ROOT / DEFAULT_INVENTORY))
    ap.add_argument("--keep-disks", action="store_true", help="do not start from fresh host disks")
    ap.add_argument("--leave-up", action="store_true", help="leave the lab running at the end")
    ap.add_argument("--floor", action="store_true", help="also measure the package-install floor (fresh hosts)")
    ap.add_argument("--rounds", type=int, default=5,
                    help="no-op and dry runs, alternating; their medians are printed (default 5)")
    args = ap.parse_args()

    lab.require_root("scripts/bench_deploy.py")
    inventory = Path(args.inventory).resolve()
    inv = load(inventory)
    print(f"lab {inventory}: {len(inv.hosts)} hosts; {os.cpu_count()} CPUs on this machine")
    with contextlib.redirect_stdout(io.StringIO()):
        if not args.keep_disks:
            lab.lab_down(inv, disks=True)
        lab.lab_up(inv)

    with MachineCpu(every=10) as first_cpu:
        figures = [("first deploy" if not args.keep_disks else "deploy", deploy(inventory))]
    runs: dict[str, list[tuple[float, str]]] = {"no-op": [], "check": []}
    for _ in range(max(1, args.rounds)):  # alternating, so that a slow moment of the machine hits both
        runs["no-op"].append(deploy(inventory))
        runs["check"].append(deploy(inventory, "--check"))
    for label, key in (("second deploy (no-op)", "no-op"), ("dry run (--check)", "check")):
        times = [t for t, _ in runs[key]]
        figures.append((label, (statistics.median(times), runs[key][-1][1])))
    for label, (seconds, counts) in figures:
        print(f"{label:<24} {seconds:7.1f} s   {counts}")
    print(f"  ({figures[0][0]}: {first_cpu}; busy every 10 s, in tenths: {first_cpu.timeline_text()})")
    print(f"  (no-op and dry run: medians of {len(runs['no-op'])} runs each; no-op runs "
          f"{', '.join(f'{t:.1f}' for t, _ in runs['no-op'])} s, dry runs "
          f"{', '.join(f'{t:.1f}' for t, _ in runs['check'])} s)")
    if args.floor:
        sets = package_sets(inv)
        seconds, floor_cpu = floor(inv, sets)
        print(f"{'package floor':<24} {seconds:7.1f} s   {sum(map(len, sets.values()))} packages on {len(sets)} hosts"
              f"; first deploy = {figures[0][1][0] / seconds:.2f}x the floor")
        print(f"  (the floor: {floor_cpu}; busy every 10 s: {floor_cpu.timeline_text()}; "
              f"the first deploy took {first_cpu.busy / floor_cpu.busy:.2f}x its CPU time)")

    if not args.leave_up:
        with contextlib.redirect_stdout(io.StringIO()):
            # the floor's hosts hold packages installed with their defaults (ejabberd ran under
            # Debian's node name): no deploy should start from those disks
            lab.lab_down(inv, disks=args.floor)
    if not all(re.search(r" 0 changed, 0 failed", counts) for _, counts in runs["no-op"]):
        print("the second deploy changed something: not idempotent")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
