#!/usr/bin/env python3
"""Measure the lab against its targets (issue 3) and print the figures.

    sudo .venv/bin/python scripts/bench_lab.py            # everything, from nothing
    sudo .venv/bin/python scripts/bench_lab.py --warm     # skip the from-nothing run
    sudo .venv/bin/python scripts/bench_lab.py --state-dir /tmp/bench-lab   # from nothing, in a scratch state dir

Targets: all hosts up and answering SSH in under 60 s once the cached root
exists, under 2 minutes from nothing (no cached root, empty package cache); an
idle lab host uses under 60 MB of memory. Leaves the lab down unless --leave-up.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import shutil
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from fabfile import lab  # noqa: E402
from fabfile.core.inventory import load  # noqa: E402
from fabfile.core.tasks import DEFAULT_INVENTORY, PROJECT_ROOT  # noqa: E402

TARGETS = {"from nothing": 120.0, "cached root, new disks": 60.0}
MEMORY_TARGET = 60 * 2**20


def timed(label: str, fn, results: list, quiet: bool = True):
    out = io.StringIO()
    start = time.monotonic()
    with contextlib.redirect_stdout(out) if quiet else contextlib.nullcontext():
        value = fn()
    seconds = time.monotonic() - start
    results.append((label, seconds, value))
    target = TARGETS.get(label)
    verdict = "" if target is None else ("  (target < %.0f s: %s)" % (target, "met" if seconds < target else "MISSED"))
    print(f"{label:<28} {seconds:7.1f} s{verdict}", flush=True)
    return value


def process_memory(plan, host: str, field: str) -> int:
    """Sum of one smaps_rollup field over the processes in the host's memory cgroup."""
    cg = lab.CGROUP_ROOT / "memory" / plan.cgroup(host)
    total = 0
    for procs in cg.rglob("cgroup.procs"):
        for pid in procs.read_text().split():
            with contextlib.suppress(OSError):
                for line in open(f"/proc/{pid}/smaps_rollup"):
                    if line.startswith(field):
                        total += int(line.split()[1]) * 1024
    return total


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--inventory", default=str(PROJECT_ROOT / DEFAULT_INVENTORY))
    ap.add_argument("--warm", action="store_true", help="skip the from-nothing run (keep the cached root)")
    ap.add_argument("--keep-package-cache", action="store_true",
                    help="from nothing, but with apt-cacher-ng's cache kept (default: emptied)")
    ap.add_argument("--idle", type=float, default=20, help="seconds to let hosts settle before measuring memory")
    ap.add_argument("--leave-up", action="store_true", help="leave the lab running at the end")
    ap.add_argument("--state-dir", type=Path, default=lab.STATE_DIR,
                    help="the lab's state dir; an empty one measures 'from nothing' without touching "
                         "the cached root and package cache that other labs use (default %(default)s)")
    args = ap.parse_args()

    lab.require_root("scripts/bench_lab.py")
    inv = load(args.inventory)
    plan = lab.Plan(inv, args.state_dir)
    n = len(inv.hosts)
    results: list = []
    print(f"lab {inv.path}: {n} hosts; state dir {plan.state_dir}; root builder {lab.root_builder()}")

    if not args.warm:
        lab.lab_down(inv, purge=True, state_dir=args.state_dir)
        if not args.keep_package_cache:
            shutil.rmtree(plan.apt_cache, ignore_errors=True)
        summary = timed("from nothing", lambda: lab.lab_up(inv, state_dir=args.state_dir), results)
        print(f"  of which the cached root     {summary['root_seconds']:7.1f} s")
    else:
        lab.lab_up(inv, state_dir=args.state_dir)

    timed("down", lambda: lab.lab_down(inv, disks=True, state_dir=args.state_dir), results)
    summary = timed("cached root, new disks", lambda: lab.lab_up(inv, state_dir=args.state_dir), results)
    assert len(summary["new_disks"]) == n, summary
    timed("down", lambda: lab.lab_down(inv, state_dir=args.state_dir), results)
    timed("restart, existing disks", lambda: lab.lab_up(inv, state_dir=args.state_dir), results)
    summary = timed("up again (idempotent)", lambda: lab.lab_up(inv, state_dir=args.state_dir), results)
    assert summary["started"] == [], summary

    time.sleep(args.idle)
    mem = {row["host"]: row["memory"] for row in lab.host_states(plan)}
    values = [v for v in mem.values() if v is not None]
    worst = max(mem, key=lambda h: mem[h] or 0)
    print(f"idle memory per host          mean {statistics.mean(values) / 2**20:.1f} MiB, "
          f"max {mem[worst] / 2**20:.1f} MiB ({worst}), total {sum(values) / 2**20:.0f} MiB"
          f"  (target < 60 MB each: {'met' if max(values) < MEMORY_TARGET else 'MISSED'})")

    # The cgroup charge leaves out shared pages first touched elsewhere; PSS shares
    # them fairly, the RSS sum counts every shared page in full (an upper bound).
    pss = {h: process_memory(plan, h, "Pss:") for h in inv.hosts}
    rss = {h: process_memory(plan, h, "Rss:") for h in inv.hosts}
    print(f"  PSS of its processes        mean {statistics.mean(pss.values()) / 2**20:.1f} MiB, "
          f"max {max(pss.values()) / 2**20:.1f} MiB; RSS sum (upper bound) max {max(rss.values()) / 2**20:.1f} MiB")
    values += list(pss.values())

    if not args.leave_up:
        timed("down", lambda: lab.lab_down(inv, state_dir=args.state_dir), results)
    missed = [label for label, secs, _ in results if label in TARGETS and secs >= TARGETS[label]]
    if max(values) >= MEMORY_TARGET:
        missed.append("memory")
    print("all targets met" if not missed else f"targets missed: {', '.join(missed)}")
    return 1 if missed else 0


if __name__ == "__main__":
    sys.exit(main())
