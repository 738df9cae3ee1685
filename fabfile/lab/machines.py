"""The machines: one systemd-nspawn container per inventory host.

A host's disk is an overlay on a cached Debian root (built once with
mmdebstrap or debootstrap, shared read-only), its identity (machine-id, SSH
host keys, name) is made on its first start, and it boots in its own network
namespace and cgroups. The lab's SSH key and known_hosts file are how the
tiers (and `inv lab.ssh`) reach it.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
import socket
import subprocess
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING

from ..core import UserError
from ..core.report import Report
from ..core.wait import TimedOut, poll
from . import vm
from .apt_proxy import APT_PROXY_CONF
from .networks import NETNS_DIR
from .plan import DEBOOTSTRAP_ARGS, MIRROR, SECURITY_MIRROR, SUITE, Plan
from .system import fs_type, is_mount, processes, root_builder, run, stop_pids, tail, umount, write

if TYPE_CHECKING:
    from ..core.inventory import Inventory

CGROUP_ROOT = Path("/sys/fs/cgroup")
# Each container gets a cgroup of its own in these hierarchies (those that
# exist): nspawn puts its payload/supervisor cgroups below the caller's, so
# without this every container would share one payload cgroup.
CGROUP_HIERARCHIES = ("systemd", "unified", "memory")
NSPAWN_TMPFS = Path("/run/systemd/nspawn")
# The machine's defaults (128 instances per user) run out at about a dozen booted
# containers with their services: systemd in a container then fails with
# "Failed to create inotify object: Too many open files".
INOTIFY_LIMITS = {"max_user_instances": 1024, "max_user_watches": 524288}


# --------------------------------------------------------------------------
# This machine, for containers
# --------------------------------------------------------------------------


def ensure_run_mounts(plan: Plan) -> None:
    """nspawn needs a tmpfs for its runtime files when /run is not one."""
    if fs_type(Path("/run")) != "tmpfs" and not is_mount(NSPAWN_TMPFS):
        NSPAWN_TMPFS.mkdir(parents=True, exist_ok=True)
        run(["mount", "-t", "tmpfs", "-o", "mode=0755", "hastack-lab", str(NSPAWN_TMPFS)])
        (plan.state_dir / "made-nspawn-tmpfs").touch()


def ensure_inotify_limits() -> list[str]:
    """Raise fs.inotify limits that are below what the lab needs; never lowers them."""
    raised = []
    for name, wanted in INOTIFY_LIMITS.items():
        path = Path("/proc/sys/fs/inotify") / name
        with contextlib.suppress(OSError, ValueError):
            if int(path.read_text()) < wanted:
                path.write_text(f"{wanted}\n")
                raised.append(f"fs.inotify.{name} to {wanted}")
    return raised


# --------------------------------------------------------------------------
# The lab's SSH key and the hosts' keys
# --------------------------------------------------------------------------


def ensure_key(inv: Inventory) -> bool:
    key = inv.key_file
    pub = key.with_name(key.name + ".pub")
    made = False
    if not key.exists():
        key.parent.mkdir(parents=True, exist_ok=True)
        run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", f"hastack-lab@{inv.site.name}", "-f", str(key)])
        made = True
    key.chmod(0o600)
    if not pub.exists():
        pub.write_text(run(["ssh-keygen", "-y", "-f", str(key)]))
    return made


def public_key(inv: Inventory) -> str:
    return inv.key_file.with_name(inv.key_file.name + ".pub").read_text().strip()


def host_key(plan: Plan, host: str) -> str | None:
    """The host's ed25519 public key ("ssh-ed25519 AAAA..."), from its disk."""
    for base in (plan.merged(host), plan.host_dir(host) / "upper"):
        pub = base / "etc/ssh/ssh_host_ed25519_key.pub"
        if pub.exists():
            return " ".join(pub.read_text().split()[:2])
    return None


def update_known_hosts(plan: Plan, hosts: list[str]) -> list[str]:
    """One line per host keyed by its management address; changed keys are replaced."""
    path = plan.inv.known_hosts_file
    lines = path.read_text().splitlines() if path.exists() else []
    wanted: dict[str, str] = {}
    for host in hosts:
        key = host_key(plan, host)
        if key:
            wanted[plan.inv.management_address(host)] = f"{plan.inv.management_address(host)} {key}"
    changed = [addr for addr, line in wanted.items() if line not in lines]
    new, placed = [], set()
    for ln in lines:  # a host's line stays where it was, with its current key
        addr = ln.split()[0] if ln.split() else None
        if addr in wanted:
            if addr not in placed:
                new.append(wanted[addr])
                placed.add(addr)
        else:
            new.append(ln)
    new += [line for addr, line in wanted.items() if addr not in placed]
    if new != lines:
        path.parent.mkdir(parents=True, exist_ok=True)
        write(path, "\n".join(new) + "\n")
    return changed


def ssh_command(inv: Inventory, host: str, *, batch: bool = True, tty: bool = False) -> list[str]:
    """ssh to a lab host with the lab key, checking its key against the inventory's known_hosts."""
    cmd = [
        "ssh", "-F", "/dev/null",
        "-i", str(inv.key_file),
        "-o", "IdentitiesOnly=yes",
        "-o", f"UserKnownHostsFile={inv.known_hosts_file}",
        "-o", "GlobalKnownHostsFile=/dev/null",
        "-o", "StrictHostKeyChecking=yes",
        "-o", f"ConnectTimeout={int(max(1, inv.ssh.connect_timeout))}",
        "-o", "LogLevel=ERROR",
        "-p", str(inv.ssh.port),
    ]  # fmt: skip
    if batch:
        cmd += ["-o", "BatchMode=yes"]
    if tty:
        cmd.append("-t")
    return [*cmd, f"{inv.ssh.user}@{inv.management_address(host)}"]


# --------------------------------------------------------------------------
# The cached root
# --------------------------------------------------------------------------


def ensure_root(plan: Plan, report: Report) -> float | None:
    """The cached Debian root, built once with debootstrap; returns the build time if built now."""
    if plan.root.is_dir():
        return None
    plan.roots_dir.mkdir(parents=True, exist_ok=True)
    for stale in plan.roots_dir.glob(".building-*"):
        shutil.rmtree(stale, ignore_errors=True)
    tmp = plan.roots_dir / f".building-{plan.root.name}"
    builder = root_builder() or "debootstrap"
    log = plan.roots_dir / f"{plan.root.name}.build.log"
    report.note(f"building the cached Debian root with {builder} (about a minute; log {log}) ...")
    start = time.monotonic()
    # Through the lab's apt-cacher-ng: a rebuild after --purge is served from its cache.
    env = {**os.environ, "http_proxy": plan.proxy_url, "DEBIAN_FRONTEND": "noninteractive"}
    *opts, suite, mirror = DEBOOTSTRAP_ARGS
    if builder == "mmdebstrap":
        cmd = ["mmdebstrap", "--mode=root", f"--aptopt=Acquire::http::Proxy \"{plan.proxy_url}\"", *opts, suite, str(tmp), mirror]
    else:
        cmd = ["debootstrap", *opts, suite, str(tmp), mirror]
    with open(log, "w") as out:
        proc = subprocess.run(cmd, stdout=out, stderr=subprocess.STDOUT, env=env, stdin=subprocess.DEVNULL)
    if proc.returncode != 0:
        shutil.rmtree(tmp, ignore_errors=True)
        raise UserError(f"{builder} failed (exit status {proc.returncode}); last lines of {log}:\n{tail(log)}")
    _finalize_root(tmp)
    tmp.rename(plan.root)
    return time.monotonic() - start


SOURCES_LIST = f"""\
deb {MIRROR} {SUITE} main
deb {MIRROR} {SUITE}-updates main
deb {SECURITY_MIRROR} {SUITE}-security main
"""


def _finalize_root(root: Path) -> None:
    """What every host shares; per-host identity (machine-id, host keys, name) is added per disk."""
    for key in (root / "etc/ssh").glob("ssh_host_*"):
        key.unlink()
    (root / "etc/machine-id").write_text("")
    (root / "etc/hostname").write_text("localhost\n")
    write(root / "etc/resolv.conf", "# Lab hosts have no DNS: lab names are in /etc/hosts, apt goes through the proxy.\n")
    write(root / "etc/apt/sources.list", SOURCES_LIST)
    # apt's daily timers would take the dpkg lock in the middle of a deploy.
    for unit in ("apt-daily.timer", "apt-daily-upgrade.timer"):
        (root / "etc/systemd/system/timers.target.wants" / unit).unlink(missing_ok=True)
    (root / "etc/apt/apt.conf.d/99mmdebstrap").unlink(missing_ok=True)  # the build's proxy option
    for deb in (root / "var/cache/apt/archives").glob("*.deb"):
        deb.unlink()
    (root / "root/.ssh").mkdir(mode=0o700, exist_ok=True)


# --------------------------------------------------------------------------
# Per host: disk, container, power
# --------------------------------------------------------------------------


def running_pid(plan: Plan, host: str) -> int | None:
    """The host's systemd-nspawn (or, for a moment after the start, the shell that
    execs it); for a VM host its qemu."""
    if vm.is_vm(plan, host):
        return vm.running_pid(plan, host)
    needle = f"--directory={plan.merged(host)}"
    for pid, argv in processes():
        if needle in argv and any(os.path.basename(a) == "systemd-nspawn" for a in argv[:5]):
            return pid
    return None


def prepare_disk(plan: Plan, host: str, lower: Path | None = None) -> bool:
    """Mount the host's overlay on `lower` (the cached root); give a new disk its
    identity. Returns True for a new disk. A VM host's overlay is only where its
    image is made (vm.make_disks); its disk is then the image."""
    lower = lower or plan.root
    hdir = plan.host_dir(host)
    upper, work, merged = hdir / "upper", hdir / "work", hdir / "root"
    lower_file = hdir / "lower"
    new = not upper.exists()
    if vm.is_vm(plan, host) and vm.disk(plan, host).exists():
        return False  # the image is the disk now, booted with the kernel of the root it was made from
    if not new and lower_file.exists() and lower_file.read_text().strip() != lower.name:
        raise UserError(
            f"the disk of {host} was made from another cached root ({lower_file.read_text().strip()}, "
            f"now {lower.name}); run inv lab.down --disks to give the lab fresh disks"
        )
    for d in (upper, work, merged):
        d.mkdir(parents=True, exist_ok=True)
    lower_file.write_text(lower.name + "\n")
    if not is_mount(merged):
        run(["mount", "-t", "overlay", "overlay", "-o",
             f"lowerdir={lower},upperdir={upper},workdir={work}", str(merged)])
    etc = merged / "etc"
    if new or not (etc / "ssh/ssh_host_ed25519_key").exists():
        run(["ssh-keygen", "-A", "-f", str(merged)])
    if new:
        write(etc / "machine-id", secrets.token_hex(16) + "\n", 0o444)
        write(etc / "hostname", host + "\n")
        write(etc / "hosts", _hosts_file(plan))
    # Ensured on every start: the lab's key and the apt proxy.
    auth = merged / "root/.ssh/authorized_keys"
    key = public_key(plan.inv)
    lines = auth.read_text().splitlines() if auth.exists() else []
    if key not in lines:
        (merged / "root/.ssh").mkdir(mode=0o700, exist_ok=True)
        write(auth, "\n".join([*lines, key]) + "\n", 0o600)
    write(etc / "apt/apt.conf.d/01lab-proxy", APT_PROXY_CONF.format(url=plan.proxy_url))
    # No apt of its own at boot: sixteen apt-daily runs at once through the proxy
    # race the deploy for dpkg's lock and for the same index files.
    for timer in ("apt-daily.timer", "apt-daily-upgrade.timer"):
        link = etc / "systemd/system" / timer
        if not link.is_symlink():
            link.parent.mkdir(parents=True, exist_ok=True)
            link.symlink_to("/dev/null")
    if vm.is_vm(plan, host):
        vm.make_disks(plan, host, merged)
        umount(merged)  # the image holds the disk from now on; host_key() reads upper/
    return new


def _hosts_file(plan: Plan) -> str:
    lines = [
        "127.0.0.1\tlocalhost",
        "::1\tlocalhost ip6-localhost ip6-loopback",
        "ff02::1\tip6-allnodes",
        "ff02::2\tip6-allrouters",
        "",
        "# Lab hosts on the management network (written by inv lab.up)",
    ]
    for host in plan.inv.hosts:
        lines.append(f"{plan.inv.management_address(host)}\t{plan.inv.fqdn(host)} {host}")
    return "\n".join(lines) + "\n"


def cgroup_dirs(plan: Plan, host: str) -> list[Path]:
    return [CGROUP_ROOT / h / plan.cgroup(host) for h in CGROUP_HIERARCHIES if (CGROUP_ROOT / h / "cgroup.procs").exists()]


def cgroup_pids(plan: Plan, host: str) -> list[int]:
    """Every process in the host's cgroups (and their payload/supervisor sub-cgroups)."""
    return [int(p) for cg in cgroup_dirs(plan, host) if cg.is_dir()
            for f in cg.rglob("cgroup.procs") for p in f.read_text().split()]


def rmdir_tree(path: Path) -> None:
    """Remove an (empty) cgroup directory tree, deepest first."""
    if not path.is_dir():
        return
    for sub in sorted((p for p in path.rglob("*") if p.is_dir()), key=lambda p: len(p.parts), reverse=True):
        with contextlib.suppress(OSError):
            sub.rmdir()
    with contextlib.suppress(OSError):
        path.rmdir()


# Moves itself into the host's cgroups, then becomes systemd-nspawn. A constant
# script: the command and the cgroup paths reach it as arguments and environment.
NSPAWN_WRAPPER = 'IFS=:; for cg in $CGROUPS; do echo $$ > "$cg/cgroup.procs" || exit 1; done; unset IFS CGROUPS; exec "$@"'


def start_container(plan: Plan, host: str) -> subprocess.Popen:
    """Boot the host; the returned process is its systemd-nspawn (after the wrapper's exec)."""
    cgroups = cgroup_dirs(plan, host)
    for cg in cgroups:
        rmdir_tree(cg)  # a crashed run's payload/supervisor cgroups
        cg.mkdir(parents=True, exist_ok=True)
    log = plan.console_log(host)
    log.parent.mkdir(parents=True, exist_ok=True)
    cmd = [
        "systemd-nspawn",
        f"--directory={plan.merged(host)}",
        f"--machine={host}",
        "--boot",
        "--register=no",
        "--keep-unit",
        f"--network-namespace-path={NETNS_DIR / plan.netns(host)}",
        "--capability=CAP_NET_ADMIN,CAP_NET_RAW",
        "--console=read-only",
        "--link-journal=no",
        "--resolv-conf=off",
        "--timezone=off",
    ]
    env = {
        "PATH": os.environ.get("PATH", "/usr/sbin:/usr/bin:/sbin:/bin"),
        "SYSTEMD_NSPAWN_UNIFIED_HIERARCHY": "1",
        # /proc/sys/net writable in the container: the gateway sets ip_forward,
        # the firewall tier its conntrack settings.
        "SYSTEMD_NSPAWN_API_VFS_WRITABLE": "network",
        "CGROUPS": ":".join(str(cg) for cg in cgroups),
    }
    with open(log, "ab") as out:
        out.write(f"\n===== inv lab.up: booting {host} at {time.strftime('%Y-%m-%d %H:%M:%S')} =====\n".encode())
        out.flush()
        return subprocess.Popen(
            ["sh", "-c", NSPAWN_WRAPPER, "sh", *cmd],
            env=env, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
            start_new_session=True, cwd="/", close_fds=True,
        )


class _NotBooted(Exception):
    pass


def wait_ready(plan: Plan, started: dict[str, subprocess.Popen], timeout: float) -> dict[str, str]:
    """Wait until each started host answers SSH and systemd has finished booting; return its state.

    A host counts as stopped when its own nspawn process exited: scanning /proc
    for it races with the wrapper's exec (an empty cmdline for a moment)."""
    deadline = time.monotonic() + timeout

    def attempt(host: str) -> str | None:
        """The host's systemd state once it answers SSH; None while it does not yet."""
        try:
            with socket.create_connection((plan.inv.management_address(host), plan.inv.ssh.port), timeout=1):
                pass
        except OSError:
            return None
        left = max(1, deadline - time.monotonic())
        try:
            proc = subprocess.run(
                [*ssh_command(plan.inv, host), "systemctl is-system-running --wait"],
                capture_output=True, text=True, timeout=left, stdin=subprocess.DEVNULL,
            )
        except subprocess.TimeoutExpired:
            return None
        if proc.returncode == 255 and "Host key verification failed" in proc.stderr:
            raise UserError(f"{host}: host key verification failed against {plan.inv.known_hosts_file}")
        return proc.stdout.strip()

    def one(host: str) -> str:
        console = plan.console_log(host)
        try:
            # Booted within the time given: an answer that came after the deadline
            # (a slow first attempt) is not in time.
            return poll(lambda: attempt(host),
                        lambda state: state in ("running", "degraded") and time.monotonic() <= deadline,
                        timeout=max(0.0, deadline - time.monotonic()), interval=0.3,
                        what=f"{host} to boot", error=_NotBooted,
                        give_up=lambda _state, _s: "stopped" if started[host].poll() is not None else None)
        except _NotBooted:
            if started[host].poll() is not None:
                raise UserError(f"{host} stopped while booting; last lines of its console ({console}):\n"
                                f"{tail(console)}") from None
            raise UserError(f"{host} did not boot within {timeout:.0f}s; last lines of its console "
                            f"({console}):\n{tail(console)}") from None

    with ThreadPoolExecutor(max_workers=max(1, len(started))) as pool:
        futures = {host: pool.submit(one, host) for host in started}
        errors, states = [], {}
        for host, fut in futures.items():
            try:
                states[host] = fut.result()
            except UserError as exc:
                errors.append(str(exc))
    if errors:
        raise UserError("\n".join(errors))
    return states


def power_state(plan: Plan, host: str) -> str:
    return "on" if running_pid(plan, host) else "off"


def power_off(plan: Plan, host: str, timeout: float = 30) -> None:
    """Pull the plug: SIGKILL every process of the container, no shutdown, and
    drop its network namespace: what a host holds only while it runs (a VIP
    that Pacemaker or keepalived added, live firewall rules, routes) is gone,
    as after a real power cut; power on makes the NICs anew. A VM: SIGKILL of
    its qemu. The caller reads the state afterwards (still "on" if it did not
    go in time)."""
    if vm.is_vm(plan, host):
        vm.power_off(plan, host)
    else:
        stop_pids(cgroup_pids(plan, host), grace=0)
    with contextlib.suppress(TimedOut):
        poll(lambda: running_pid(plan, host), lambda pid: pid is None, timeout=timeout, interval=0.2,
             what=f"{host} to power off")
    if running_pid(plan, host) is None and (NETNS_DIR / plan.netns(host)).exists():
        run(["ip", "netns", "del", plan.netns(host)], check=False)


def remove_cgroups(plan: Plan, host: str) -> None:
    """Kill whatever is still in the host's cgroups (nothing, normally) and remove them."""
    for cg in cgroup_dirs(plan, host):
        clear_cgroup_tree(cg)


def clear_cgroup_tree(path: Path, timeout: float = 10) -> None:
    """Empty a cgroup tree and remove it. A killed process stays in its cgroup
    until it has exited, and rmdir answers EBUSY until then: so kill, try the
    rmdir, and poll until the tree is gone (or the time is up)."""
    def gone() -> bool:
        if not path.is_dir():
            return True
        left = [int(p) for f in path.rglob("cgroup.procs") for p in f.read_text().split()]
        if left:
            stop_pids(left, grace=0)
        rmdir_tree(path)
        return not path.is_dir()

    with contextlib.suppress(TimedOut):
        poll(gone, bool, timeout=timeout, interval=0.1, what=f"cgroup {path} to be removed")


def remove_stray_cgroups(plan: Plan) -> None:
    """This lab's cgroups of hosts no longer known (a crashed run, a host taken
    out of the inventory): only those named with this lab's prefix."""
    for hierarchy in CGROUP_HIERARCHIES:
        parent = CGROUP_ROOT / hierarchy / "hastack-lab"
        for cg in sorted(parent.glob(f"{plan.prefix}-*")) if parent.is_dir() else ():
            clear_cgroup_tree(cg)


def remove_cgroup_parent() -> None:
    """The parent cgroup all labs share, once no lab has a host below it (another
    lab, with its own bridge prefix, may still be running there: never touched)."""
    for hierarchy in CGROUP_HIERARCHIES:
        parent = CGROUP_ROOT / hierarchy / "hastack-lab"
        if parent.is_dir() and not any(p.is_dir() for p in parent.iterdir()):
            with contextlib.suppress(OSError):
                parent.rmdir()


# --------------------------------------------------------------------------
# What lab.status shows
# --------------------------------------------------------------------------


def host_memory(plan: Plan, host: str) -> int | None:
    """Bytes in use by the container: its memory cgroup's usage without inactive file cache."""
    cg = CGROUP_ROOT / "memory" / plan.cgroup(host)
    try:
        usage = int((cg / "memory.usage_in_bytes").read_text())
        stat = dict(line.split() for line in (cg / "memory.stat").read_text().splitlines())
    except (OSError, ValueError):
        return None
    return max(0, usage - int(stat.get("total_inactive_file", 0)))


def host_states(plan: Plan) -> list[dict]:
    rows = []
    for host in plan.inv.hosts:
        pid = running_pid(plan, host)
        if pid:
            state = "running"
        elif (plan.host_dir(host) / "upper").exists() or vm.disk(plan, host).exists():
            state = "stopped"
        else:
            state = "absent"
        is_vm = vm.is_vm(plan, host)
        rows.append({
            "host": host,
            "state": state,
            "kind": f"VM, {vm.accel(plan, host)}" if is_vm else "container",
            "addresses": plan.nics(host),
            "memory": (vm.memory(pid) if is_vm else host_memory(plan, host)) if pid else None,
            "memory_max": plan.inv.hosts[host].memory_mb * 2**20 if is_vm else None,
            "roles": plan.inv.hosts[host].roles,
        })
    return rows
