"""VM hosts: a host whose inventory entry lists `kernel_modules` (drbd, nfsd)
boots as a qemu VM instead of a container, so that it has a kernel of its own.

- **Image.** A second cached root, `roots/<root>-vm-<hash>`: the containers'
  cached root plus Debian 12's kernel (`linux-image-amd64`, an initramfs with
  the virtio and ext4 modules), drbd-utils, lvm2, and a head start of the
  packages the VM hosts' roles install (put in by chroot, at container speed;
  the tiers still install whatever is missing). Built once through the lab's
  apt proxy, keyed by its package list.
- **Disk.** The host's identity (machine-id, SSH host keys, name, the lab key,
  its NICs' addresses as systemd-networkd files, each NIC named after its
  network and matched by MAC) is made on an overlay of that root, as for a
  container, then copied into `hosts/<host>/disk.img` (`mkfs.ext4 -d`) once.
  From then on the image is the host's disk. `disks_gb` in the inventory adds
  raw disks (`disk1.img`, ...): /dev/vdb, ... in the guest.
- **Wires.** One tap per NIC on its network's bridge, named like a
  container's veth.
- **Power.** `qemu-system-x86_64` with the kernel booted directly; power off is
  SIGKILL of qemu (the VM stops at once, as after a power cut), power on a
  fresh boot.
- **Accelerator.** KVM when it can run a guest, else TCG (emulation). /dev/kvm
  is not enough: under PVM (`kvm_pvm`, no vmx/svm in the CPU flags) it opens,
  but only kernels built for PVM boot, and Debian's is not. So TCG is chosen
  up front there; with KVM, a guest that prints nothing on its serial console
  within KVM_GRACE seconds is started again under TCG. `hosts/<host>/accel`
  records which one ran (`inv lab.status` shows it).
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import signal
import subprocess
import time
from pathlib import Path
from typing import TYPE_CHECKING

from ..core import UserError
from ..core.wait import TimedOut, poll
from .networks import link_exists
from .plan import Plan
from .system import processes, run, tail, write

if TYPE_CHECKING:
    from ..core.report import Report

QEMU = "qemu-system-x86_64"
TOOLS = {QEMU: "qemu-system-x86", "qemu-img": "qemu-utils", "mkfs.ext4": "e2fsprogs", "unshare": "util-linux"}
ROOT_DISK_GB = 4  # sparse: a deployed back end uses about 1.5 GB
# TCG's translation cache is 1 GiB by default in qemu 7.2: a 1 GiB guest then holds 2 GiB of this machine.
ACCEL_OPTIONS = {"kvm": "kvm", "tcg": "tcg,tb-size=128"}
KVM_GRACE = 15  # seconds a KVM guest has to print its first line
# Bump when ensure_vm_root changes what it puts into the image (e2scrub masked: a
# minute of an emulated CPU at every boot, for a check the lab's disks never need; pcs's request timeout).
VM_LAYOUT = 3
# What every VM has: a kernel and its initramfs, DRBD's and LVM's tools.
VM_PACKAGES = ("linux-image-amd64", "initramfs-tools", "zstd", "drbd-utils", "lvm2", "kmod", "udev")
# A head start for the VM hosts' roles: what their tiers install from Debian,
# installed into the image by chroot instead of by apt inside an emulated CPU
# (5-10x slower). Only a head start: each tier still installs what is missing.
COMMON_PACKAGES = (  # the base, firewall and pki tiers' packages, on every host
    "ca-certificates", "curl", "gnupg", "iproute2", "iptables", "netcat-openbsd", "openssl", "procps", "python3",
    "rsync", "systemd-timesyncd", "tzdata", "iptables-persistent", "netfilter-persistent", "netbase", "ssl-cert",
)
ROLE_PACKAGES = {
    "mail_backend": (
        "pacemaker", "pacemaker-cli-utils", "corosync", "pcs", "resource-agents",
        "postfix", "postfix-mysql", "dovecot-core", "dovecot-imapd", "dovecot-lmtpd", "dovecot-mysql",
        "dovecot-sieve", "dovecot-managesieved", "nginx", "php-fpm", "php-cli", "php-mysql", "php-mbstring",
        "php-imap", "postfixadmin", "mariadb-client", "haproxy",
    ),
    "backup": ("nfs-kernel-server",),
}  # fmt: skip
# The answers the tiers preseed (their packages are configured by their templates afterwards).
DEBCONF = (
    "postfixadmin postfixadmin/dbconfig-install boolean false",
    "postfix postfix/main_mailer_type select No configuration",
    "iptables-persistent iptables-persistent/autosave_v4 boolean false",
    "iptables-persistent iptables-persistent/autosave_v6 boolean false",
)
INITRAMFS_MODULES = ("virtio_pci", "virtio_blk", "virtio_net", "ext4")


# --------------------------------------------------------------------------
# Which hosts, which accelerator
# --------------------------------------------------------------------------


def is_vm(plan: Plan, host: str) -> bool:
    """A host of the inventory that loads kernel modules (not a name the power listener was asked about)."""
    spec = plan.inv.hosts.get(host)
    return bool(spec and spec.kernel_modules)


def vm_hosts(plan: Plan, hosts: list[str]) -> list[str]:
    return [h for h in hosts if is_vm(plan, h)]


def cpu_flags() -> set[str]:
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return set(line.split(":", 1)[1].split())
    return set()


def kvm_usable() -> tuple[bool, str]:
    """(KVM worth trying, why not when not)."""
    if not os.access("/dev/kvm", os.R_OK | os.W_OK):
        return False, "no usable /dev/kvm"
    if Path("/sys/module/kvm_pvm").exists():
        return False, "/dev/kvm is PVM (kvm_pvm), which boots only PVM-built kernels"
    if not cpu_flags() & {"vmx", "svm"}:
        return False, "the CPU has neither vmx nor svm"
    return True, ""


# --------------------------------------------------------------------------
# The VM image's root
# --------------------------------------------------------------------------


def packages(plan: Plan, hosts: list[str]) -> list[str]:
    wanted = list(VM_PACKAGES) + list(COMMON_PACKAGES)
    for host in hosts:
        for role in plan.inv.hosts[host].roles:
            wanted += ROLE_PACKAGES.get(role, ())
    return sorted(set(wanted))


def vm_root(plan: Plan, pkgs: list[str]) -> Path:
    digest = hashlib.sha256(repr((pkgs, DEBCONF, INITRAMFS_MODULES, VM_LAYOUT)).encode()).hexdigest()[:10]
    return plan.roots_dir / f"{plan.root.name}-vm-{digest}"


CHROOT_SCRIPT = """\
set -e
mount -t proc proc "$ROOT/proc"
mount --rbind /dev "$ROOT/dev"
mount -t sysfs sys "$ROOT/sys"
chroot "$ROOT" apt-get update -q
printf '%s\\n' "$DEBCONF" | chroot "$ROOT" debconf-set-selections
chroot "$ROOT" apt-get install -y -q --no-install-recommends -o Dpkg::Options::=--force-confold $PACKAGES
chroot "$ROOT" apt-get clean
chroot "$ROOT" systemctl enable systemd-networkd
chroot "$ROOT" systemctl mask e2scrub_reap.service e2scrub_all.timer
# An emulated CPU starts pcs (Python) in about 12 s: pcsd's answer to `pcs cluster setup`
# (which destroys any old cluster on each node first) takes longer than pcs's 60 s
# request timeout, and `cluster setup` takes no --request-timeout. The lab's VMs wait longer.
if [ -f "$ROOT$PCS_SETTINGS" ]; then
  sed -i 's/^default_request_timeout = 60$/default_request_timeout = 600/' "$ROOT$PCS_SETTINGS"
  grep -q '^default_request_timeout = 600$' "$ROOT$PCS_SETTINGS"
  chroot "$ROOT" python3 -m py_compile "$PCS_SETTINGS"
fi
"""
PCS_SETTINGS = "/usr/lib/python3/dist-packages/pcs/settings.py"


def ensure_vm_root(plan: Plan, pkgs: list[str], report: Report) -> tuple[Path, float | None]:
    """The VM image's root (built now if missing); the build time if built now."""
    root = vm_root(plan, pkgs)
    if root.is_dir():
        return root, None
    tmp = plan.roots_dir / f".building-{root.name}"
    shutil.rmtree(tmp, ignore_errors=True)
    log = plan.roots_dir / f"{root.name}.build.log"
    report.note(f"building the VM image's root: kernel, drbd-utils, lvm2 and {len(pkgs)} packages in all "
                f"(a minute or two; log {log}) ...")
    start = time.monotonic()
    run(["cp", "-a", "--reflink=auto", str(plan.root), str(tmp)], timeout=600)
    # No service starts in the chroot; initramfs with the modules a virtio guest boots from.
    write(tmp / "usr/sbin/policy-rc.d", "#!/bin/sh\nexit 101\n", 0o755)
    write(tmp / "etc/initramfs-tools/conf.d/lab", "MODULES=list\nCOMPRESS=zstd\n")
    write(tmp / "etc/initramfs-tools/modules", "\n".join(INITRAMFS_MODULES) + "\n")
    env = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "ROOT": str(tmp), "PACKAGES": " ".join(pkgs), "PCS_SETTINGS": PCS_SETTINGS,
           "DEBCONF": "\n".join(DEBCONF), "http_proxy": plan.proxy_url, "DEBIAN_FRONTEND": "noninteractive"}
    with open(log, "w") as out:
        proc = subprocess.run(["unshare", "--mount", "--propagation", "private", "sh", "-c", CHROOT_SCRIPT],
                              env=env, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    if proc.returncode != 0:
        shutil.rmtree(tmp, ignore_errors=True)
        raise UserError(f"building the VM image's root failed (exit status {proc.returncode}); "
                        f"last lines of {log}:\n{tail(log)}")
    (tmp / "usr/sbin/policy-rc.d").unlink()
    write(tmp / "etc/fstab", "/dev/vda / ext4 defaults,errors=remount-ro 0 1\n")
    kernel_files(tmp)  # present, or the error names what is missing
    tmp.rename(root)
    return root, time.monotonic() - start


def kernel_files(root: Path) -> tuple[Path, Path]:
    kernels = sorted((root / "boot").glob("vmlinuz-*"))
    initrds = sorted((root / "boot").glob("initrd.img-*"))
    if not kernels or not initrds:
        raise UserError(f"the VM root {root} has no kernel or initramfs in /boot; remove it and run lab.up again")
    return kernels[-1], initrds[-1]


# --------------------------------------------------------------------------
# Per host: disks, wires, power
# --------------------------------------------------------------------------


def disk(plan: Plan, host: str, n: int = 0) -> Path:
    return plan.host_dir(host) / ("disk.img" if n == 0 else f"disk{n}.img")


def root_of(plan: Plan, host: str) -> Path:
    """The root the host's disk was made from (its kernel boots it)."""
    return plan.roots_dir / (plan.host_dir(host) / "lower").read_text().strip()


def mac(plan: Plan, host: str, net: str) -> str:
    b = hashlib.sha256(f"{plan.prefix}/{host}/{net}".encode()).digest()
    return f"52:54:00:{b[0]:02x}:{b[1]:02x}:{b[2]:02x}"


def network_files(plan: Plan, host: str) -> dict[str, str]:
    """systemd-networkd files: each NIC named after its network (by MAC), its address."""
    files = {}
    for i, (net, iface) in enumerate(plan.nics(host)):
        files[f"etc/systemd/network/1{i}-{net}.link"] = f"[Match]\nMACAddress={mac(plan, host, net)}\n\n[Link]\nName={net}\n"
        files[f"etc/systemd/network/1{i}-{net}.network"] = (
            f"[Match]\nName={net}\n\n[Network]\nAddress={iface}\nLinkLocalAddressing=no\nIPv6AcceptRA=no\n")
    return files


def make_disks(plan: Plan, host: str, merged: Path) -> None:
    """The root disk from the prepared tree (once), and the inventory's extra disks."""
    for rel, text in network_files(plan, host).items():
        write(merged / rel, text)
    image = disk(plan, host)
    if not image.exists():
        tmp = image.with_name(image.name + ".new")
        tmp.unlink(missing_ok=True)
        run(["mkfs.ext4", "-q", "-F", "-L", "root", "-d", str(merged), str(tmp), f"{ROOT_DISK_GB}G"], timeout=600)
        tmp.rename(image)
    for n, size in enumerate(plan.inv.hosts[host].disks_gb, start=1):
        extra = disk(plan, host, n)
        if not extra.exists():
            with open(extra, "wb") as fh:
                fh.truncate(size * 2**30)


def ensure_taps(plan: Plan, host: str) -> None:
    for net, _iface in plan.nics(host):
        tap = plan.veths[(host, net)]
        if not link_exists(tap):
            run(["ip", "tuntap", "add", "dev", tap, "mode", "tap"])
        run(["ip", "link", "set", "dev", tap, "master", plan.bridges[net], "up"])


def qemu_command(plan: Plan, host: str, accel: str) -> list[str]:
    spec = plan.inv.hosts[host]
    kernel, initrd = kernel_files(root_of(plan, host))
    cmd = [
        QEMU, "-name", f"{plan.prefix}-{host}", "-accel", ACCEL_OPTIONS[accel], "-smp", str(spec.cpus), "-m", str(spec.memory_mb),
        "-nodefaults", "-no-user-config", "-display", "none", "-vga", "none", "-no-reboot",
        "-kernel", str(kernel), "-initrd", str(initrd),
        "-append", "root=/dev/vda rw console=ttyS0 panic=-1",
        "-chardev", f"file,id=ser0,path={plan.console_log(host)},append=on", "-serial", "chardev:ser0",
    ]  # fmt: skip
    if accel == "kvm":
        cmd += ["-cpu", "host"]
    for n in range(1 + len(spec.disks_gb)):
        cmd += ["-drive", f"file={disk(plan, host, n)},format=raw,if=virtio,cache=unsafe"]
    for i, (net, _iface) in enumerate(plan.nics(host)):
        cmd += ["-netdev", f"tap,id=n{i},ifname={plan.veths[(host, net)]},script=no,downscript=no",
                "-device", f"virtio-net-pci,netdev=n{i},mac={mac(plan, host, net)}"]
    return cmd


def start_vm(plan: Plan, host: str) -> subprocess.Popen:
    """Boot the VM; under KVM, fall back to TCG if the guest stays silent."""
    ensure_taps(plan, host)
    log = plan.console_log(host)
    log.parent.mkdir(parents=True, exist_ok=True)
    ok, why = kvm_usable()
    for accel in (["kvm", "tcg"] if ok else ["tcg"]):
        with open(log, "ab") as out:
            out.write(f"\n===== inv lab.up: booting {host} ({accel}) at {time.strftime('%Y-%m-%d %H:%M:%S')} "
                      f"=====\n".encode())
        mark = log.stat().st_size
        (plan.host_dir(host) / "accel").write_text(f"{accel}\n" if ok or accel != "tcg" else f"{accel}\n{why}\n")
        qlog = plan.host_dir(host) / "qemu.log"
        with open(qlog, "ab") as out:
            proc = subprocess.Popen(qemu_command(plan, host, accel), stdin=subprocess.DEVNULL, stdout=out,
                                    stderr=subprocess.STDOUT, start_new_session=True, cwd="/", close_fds=True)
        if accel == "tcg":
            return proc
        try:
            poll(lambda: log.stat().st_size > mark or proc.poll() is not None, bool, timeout=KVM_GRACE,
                 interval=0.5, what=f"{host}'s first console line under KVM")
            if proc.poll() is None:
                return proc
        except TimedOut:
            pass
        with contextlib.suppress(ProcessLookupError):
            os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        ok, why = False, "KVM guest printed nothing"
    raise AssertionError("unreachable")


def running_pid(plan: Plan, host: str) -> int | None:
    needle = f"file={disk(plan, host)},"
    for pid, argv in processes():
        if os.path.basename(argv[0]) == QEMU and needle in " ".join(argv):
            return pid
    return None


def lab_pids(plan: Plan) -> list[int]:
    """Every VM of this lab (hosts no longer in the inventory too)."""
    needle = f"file={plan.dir / 'hosts'}/"
    return [pid for pid, argv in processes() if os.path.basename(argv[0]) == QEMU and needle in " ".join(argv)]


def power_off(plan: Plan, host: str) -> None:
    pid = running_pid(plan, host)
    if pid:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


def memory(pid: int) -> int | None:
    """Bytes qemu holds in RAM (the guest's memory is allocated as it is touched)."""
    with contextlib.suppress(OSError, ValueError, IndexError):
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    return None


def accel(plan: Plan, host: str) -> str:
    """The accelerator the VM last booted with (KVM or TCG); its second line says why not KVM."""
    path = plan.host_dir(host) / "accel"
    return path.read_text().split("\n", 1)[0].upper() if path.exists() else "?"
