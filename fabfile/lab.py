"""The embedded lab: real Debian hosts as systemd-nspawn containers on this machine.

`inv lab.up` turns every inventory host into a booted Debian 12 container with
its own network namespace, one NIC per inventory network (named after the
network: mgmt, mail, dmz, internal), joined to one Linux bridge per network.
Only the management bridge has an address on the machine; apt-cacher-ng on that
address is the hosts' only way to the Debian archive.

Everything lives under STATE_DIR (/var/lib/hastack-lab):

    roots/bookworm-<hash>/        cached debootstrap root, shared read-only lower dir
    apt-cache/<prefix>/           apt-cacher-ng's package cache (kept by --purge too)
    labs/<prefix>/hosts/<host>/   upper/ work/ root/ (the overlay: the host's disk)
    labs/<prefix>/console/        each container's console log
    labs/<prefix>/apt-cacher-ng/  its config, logs and pid file

Names on the machine carry the inventory's lab.bridge_prefix: bridges
`<prefix>-<network>`, namespaces `<prefix>-<host>`, veths `<prefix><NN>-<network>`,
cgroups `hastack-lab/<prefix>-<host>`.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import ipaddress
import json
import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlparse

from invoke.exceptions import Exit

from .core import UserError, load_inventory, task
from .core.inventory import Inventory
from .core.inventory import Lab as LabSettings

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
# Bump when _finalize_root changes what it writes: a new cached root is built.
ROOT_LAYOUT = 1
DEBOOTSTRAP_ARGS = ("--variant=minbase", f"--include={','.join(PACKAGES)}", SUITE, MIRROR)

# Tool -> Debian package that provides it.
TOOLS = {
    "systemd-nspawn": "systemd-container",
    "ip": "iproute2",
    "ssh": "openssh-client",
    "ssh-keygen": "openssh-client",
    "apt-cacher-ng": "apt-cacher-ng",
    "mount": "mount",
}
# What builds the cached root: mmdebstrap (apt's resolver, parallel downloads,
# unsafe-io dpkg: about 55 s here) when present, else debootstrap (about 90 s).
# Both make the same minbase root from the same package list.
BUILDERS = ("mmdebstrap", "debootstrap")

CGROUP_ROOT = Path("/sys/fs/cgroup")
# Each container gets a cgroup of its own in these hierarchies (those that
# exist): nspawn puts its payload/supervisor cgroups below the caller's, so
# without this every container would share one payload cgroup.
CGROUP_HIERARCHIES = ("systemd", "unified", "memory")
NSPAWN_TMPFS = Path("/run/systemd/nspawn")
NETNS_DIR = Path("/run/netns")
DEFAULT_PROXY_PORT = 3142
ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")


def root_name() -> str:
    """The cached root's directory name: changes whenever what goes into it changes."""
    digest = hashlib.sha256(repr((DEBOOTSTRAP_ARGS, ROOT_LAYOUT)).encode()).hexdigest()[:12]
    return f"{SUITE}-{digest}"


# --------------------------------------------------------------------------
# The plan: every name and path the lab uses for one inventory
# --------------------------------------------------------------------------


@dataclass
class Plan:
    inv: Inventory
    state_dir: Path = field(default_factory=lambda: STATE_DIR)

    def __post_init__(self):
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

    def select(self, hosts: str | None) -> list[str]:
        if not hosts:
            return list(self.inv.hosts)
        wanted = [h.strip() for h in hosts.split(",") if h.strip()]
        unknown = [h for h in wanted if h not in self.inv.hosts]
        if unknown:
            raise UserError(
                f"unknown host(s) {', '.join(unknown)} in --hosts; "
                f"the inventory {self.inv.path} has: {', '.join(self.inv.hosts)}"
            )
        return [h for h in self.inv.hosts if h in wanted]


# --------------------------------------------------------------------------
# Small helpers: commands, processes, mounts
# --------------------------------------------------------------------------


def _run(cmd: list[str], *, check: bool = True, env: dict | None = None, timeout: float | None = 120) -> str:
    """Run a machine command; a failure is a UserError naming the command and its stderr."""
    try:
        proc = subprocess.run(
            cmd, capture_output=True, text=True, env=env, timeout=timeout, stdin=subprocess.DEVNULL
        )
    except FileNotFoundError:
        raise UserError(f"command not found: {cmd[0]}") from None
    except subprocess.TimeoutExpired:
        raise UserError(f"command timed out after {timeout}s: {' '.join(cmd)}") from None
    if check and proc.returncode != 0:
        raise UserError(
            f"command failed (exit status {proc.returncode}): {' '.join(cmd)}\n{proc.stderr.strip()}"
        )
    return proc.stdout


def _ip_json(*args: str) -> list[dict]:
    out = _run(["ip", "-j", *args], check=False)
    try:
        return json.loads(out) if out.strip() else []
    except json.JSONDecodeError:
        return []


def _processes() -> list[tuple[int, list[str]]]:
    found = []
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            with open(f"/proc/{entry.name}/cmdline", "rb") as fh:
                raw = fh.read()
        except OSError:
            continue
        if raw:
            found.append((int(entry.name), [a.decode(errors="replace") for a in raw.rstrip(b"\0").split(b"\0")]))
    return found


def _find(program: str, needle: str) -> list[int]:
    """PIDs of `program` whose command line contains the argument `needle`."""
    return [
        pid for pid, argv in _processes() if os.path.basename(argv[0]) == program and needle in argv
    ]


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as fh:
            return fh.read().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return False


def _stop_pids(pids: list[int], grace: float) -> None:
    """SIGTERM, wait up to `grace` seconds, then SIGKILL whatever is left."""
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + grace
    while any(_alive(p) for p in pids) and time.monotonic() < deadline:
        time.sleep(0.1)
    for pid in pids:
        if _alive(pid):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)


def _mounts() -> list[str]:
    """Mount points, innermost last (as listed in mountinfo)."""
    points = []
    with open("/proc/self/mountinfo") as fh:
        for line in fh:
            points.append(line.split()[4].encode().decode("unicode_escape"))
    return points


def _is_mount(path: Path) -> bool:
    return str(path) in _mounts()


def _umount(path: Path) -> None:
    if subprocess.run(["umount", str(path)], capture_output=True).returncode != 0:
        subprocess.run(["umount", "-l", str(path)], capture_output=True)


def _write(path: Path, text: str, mode: int = 0o644) -> bool:
    """Write `text` if it differs; return whether the file changed."""
    if path.is_file() and not path.is_symlink() and path.read_text() == text:
        return False
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.is_symlink():
        path.unlink()
    path.write_text(text)
    path.chmod(mode)
    return True


def _say(msg: str) -> None:
    print(msg, flush=True)


@contextlib.contextmanager
def _locked(state_dir: Path):
    """One lab command at a time on this machine."""
    state_dir.mkdir(parents=True, exist_ok=True)
    with open(state_dir / "lock", "w") as fh:
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            _say(f"waiting for another lab command to finish (lock {state_dir / 'lock'}) ...")
            fcntl.flock(fh, fcntl.LOCK_EX)
        yield


# --------------------------------------------------------------------------
# Checks before anything is touched
# --------------------------------------------------------------------------


def require_root(what: str) -> None:
    if os.geteuid() != 0:
        raise UserError(
            f"inv {what} needs root: the lab creates network namespaces, bridges, mounts and "
            f"containers on this machine (run it as root, e.g. sudo .venv/bin/inv {what})"
        )


def root_builder() -> str | None:
    return next((b for b in BUILDERS if shutil.which(b)), None)


def require_tools(tools=TOOLS) -> None:
    missing = [t for t in tools if shutil.which(t) is None]
    pkgs = sorted({TOOLS[t] for t in missing})
    if root_builder() is None:
        missing.insert(0, "debootstrap/mmdebstrap")
        pkgs.insert(0, "debootstrap mmdebstrap")
    if missing:
        raise UserError(
            f"missing tool(s): {', '.join(missing)}; install them with: apt-get install {' '.join(pkgs)}"
        )


def _link(name: str) -> dict | None:
    found = _ip_json("-d", "link", "show", "dev", name) if _link_exists(name) else []
    return found[0] if found else None


def _link_exists(name: str) -> bool:
    return Path("/sys/class/net", name).exists()


def _is_our_bridge(plan: Plan, link: dict) -> bool:
    kind = link.get("linkinfo", {}).get("info_kind")
    return kind == "bridge" and link.get("ifalias") == plan.marker


def check_machine(plan: Plan) -> None:
    """Bridge names free (or ours), no lab address already used on the machine."""
    for net, name in plan.bridges.items():
        link = _link(name)
        if link is not None and not _is_our_bridge(plan, link):
            kind = link.get("linkinfo", {}).get("info_kind") or "device"
            raise UserError(
                f"bridge name {name} (network {net}) is already in use on this machine by a {kind} "
                f"the lab did not make; remove it or choose another lab.bridge_prefix in {plan.inv.path}"
            )
    ours = set(plan.bridges.values())
    lab_nets = [n.cidr for n in plan.inv.networks.values()]
    for link in _ip_json("addr", "show"):
        if link.get("ifname") in ours:
            continue
        for addr in link.get("addr_info", []):
            if addr.get("family") != "inet":
                continue
            ip = ipaddress.IPv4Address(addr["local"])
            if any(ip in net for net in lab_nets):
                raise UserError(
                    f"address {ip} on {link['ifname']} lies inside a lab network; the lab would clash "
                    f"with it (change the networks in {plan.inv.path} or remove that address)"
                )


# --------------------------------------------------------------------------
# Machine-side pieces: key, bridges, apt proxy, cached root
# --------------------------------------------------------------------------


def ensure_key(inv: Inventory) -> bool:
    key = inv.key_file
    pub = key.with_name(key.name + ".pub")
    made = False
    if not key.exists():
        key.parent.mkdir(parents=True, exist_ok=True)
        _run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", f"hastack-lab@{inv.site.name}", "-f", str(key)])
        made = True
    key.chmod(0o600)
    if not pub.exists():
        pub.write_text(_run(["ssh-keygen", "-y", "-f", str(key)]))
    return made


def public_key(inv: Inventory) -> str:
    return inv.key_file.with_name(inv.key_file.name + ".pub").read_text().strip()


def ensure_bridges(plan: Plan) -> list[str]:
    made = []
    for net, name in plan.bridges.items():
        if not _link_exists(name):
            _run(["ip", "link", "add", name, "type", "bridge", "mcast_snooping", "0"])
            _run(["ip", "link", "set", "dev", name, "alias", plan.marker])
            made.append(name)
            # The bridges are the lab's wires; the machine takes no part in IPv6 on them.
            with contextlib.suppress(OSError):
                Path(f"/proc/sys/net/ipv6/conf/{name}/disable_ipv6").write_text("1")
        if net == plan.mgmt:
            iface = str(plan.bridge_interface)
            have = {f"{a['local']}/{a['prefixlen']}" for link in _ip_json("addr", "show", "dev", name)
                    for a in link.get("addr_info", []) if a.get("family") == "inet"}
            if iface not in have:
                _run(["ip", "addr", "add", iface, "dev", name])
        _run(["ip", "link", "set", "dev", name, "up"])
    return made


ACNG_CONF = """\
# Written by inv lab.up; apt-cacher-ng for the lab hosts (and the cached root's debootstrap).
CacheDir: {cache}
LogDir: {logs}
SupportDir: /usr/lib/apt-cacher-ng
PidFile: {pidfile}
SocketPath: {socket}
Port: {port}
BindAddress: {address}
ForeGround: 1
# The Debian archive as this machine reaches it; without this apt-cacher-ng
# remaps to mirrors that cannot be reached here.
Remap-debrep: file:deb_mirror*.gz /debian ; file:backends_debian
Remap-secdeb: security.debian.org security.debian.org/debian-security deb.debian.org/debian-security /debian-security ; {security}
ExThreshold: 4
# Sixteen hosts asking for the same InRelease at once can make apt-cacher-ng 3.7
# replace its cache entry twice in one second ("Failure to move file ... out of
# the way") and fail the request. Index files fetched in the last 10 minutes are
# served without asking upstream again, so a deploy's many `apt-get update`s do
# not refresh at once; the hosts' apt retries with a timeout (APT_PROXY_CONF).
# (Passing Release files through uncached is no cure: on pass-through 3.7 sends
# the client's Host and User-Agent headers twice, and an HTTP proxy between here
# and the archive may answer 400.)
FreshIndexMaxAge: 600
"""


def _acng_pids(plan: Plan) -> list[int]:
    return _find("apt-cacher-ng", str(plan.acng_dir))


# The machine's defaults (128 instances per user) run out at about a dozen booted
# containers with their services: systemd in a container then fails with
# "Failed to create inotify object: Too many open files".
INOTIFY_LIMITS = {"max_user_instances": 1024, "max_user_watches": 524288}


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


def ensure_apt_proxy(plan: Plan) -> bool:
    """apt-cacher-ng on the management bridge address, detached; True if started now."""
    if _acng_pids(plan):
        return False
    conf = plan.acng_dir
    for sub in ("log",):
        (conf / sub).mkdir(parents=True, exist_ok=True)
    plan.apt_cache.mkdir(parents=True, exist_ok=True)
    _write(conf / "backends_debian", MIRROR + "/\n")
    _write(
        conf / "acng.conf",
        ACNG_CONF.format(
            cache=plan.apt_cache, logs=conf / "log", pidfile=conf / "apt-cacher-ng.pid",
            socket=conf / "socket", port=plan.proxy_port, address=plan.bridge_interface.ip,
            security=SECURITY_MIRROR.split("://", 1)[1],
        ),
    )
    address = (str(plan.bridge_interface.ip), plan.proxy_port)
    for attempt in (1, 2):  # a just-stopped instance may still hold the port for a moment
        with open(conf / "log" / "stdout.log", "ab") as out:
            proc = subprocess.Popen(
                ["apt-cacher-ng", "-c", str(conf), "ForeGround=1"],
                stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                start_new_session=True, cwd="/", close_fds=True,
            )
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline and proc.poll() is None:
            with contextlib.suppress(OSError), socket.create_connection(address, timeout=0.5):
                return True
            time.sleep(0.1)
        if proc.poll() is None:
            break
        time.sleep(1)
    status = "still not listening" if proc.poll() is None else f"exited with status {proc.returncode}"
    tail = _tail(conf / "log" / "stdout.log") or _tail(conf / "log" / "apt-cacher.err", 5)
    raise UserError(f"apt-cacher-ng did not start listening on {address[0]}:{address[1]} ({status})\n{tail}")


def ensure_root(plan: Plan) -> float | None:
    """The cached Debian root, built once with debootstrap; returns the build time if built now."""
    if plan.root.is_dir():
        return None
    plan.roots_dir.mkdir(parents=True, exist_ok=True)
    for stale in plan.roots_dir.glob(".building-*"):
        shutil.rmtree(stale, ignore_errors=True)
    tmp = plan.roots_dir / f".building-{plan.root.name}"
    builder = root_builder() or "debootstrap"
    log = plan.roots_dir / f"{plan.root.name}.build.log"
    _say(f"building the cached Debian root with {builder} (about a minute; log {log}) ...")
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
        raise UserError(f"{builder} failed (exit status {proc.returncode}); last lines of {log}:\n{_tail(log)}")
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
    _write(root / "etc/resolv.conf", "# Lab hosts have no DNS: lab names are in /etc/hosts, apt goes through the proxy.\n")
    _write(root / "etc/apt/sources.list", SOURCES_LIST)
    # apt's daily timers would take the dpkg lock in the middle of a deploy.
    for unit in ("apt-daily.timer", "apt-daily-upgrade.timer"):
        (root / "etc/systemd/system/timers.target.wants" / unit).unlink(missing_ok=True)
    (root / "etc/apt/apt.conf.d/99mmdebstrap").unlink(missing_ok=True)  # the build's proxy option
    for deb in (root / "var/cache/apt/archives").glob("*.deb"):
        deb.unlink()
    (root / "root/.ssh").mkdir(mode=0o700, exist_ok=True)


# --------------------------------------------------------------------------
# Per host: disk, network namespace, container
# --------------------------------------------------------------------------


def running_pid(plan: Plan, host: str) -> int | None:
    """The host's systemd-nspawn (or, for a moment after the start, the shell that execs it)."""
    needle = f"--directory={plan.merged(host)}"
    for pid, argv in _processes():
        if needle in argv and any(os.path.basename(a) == "systemd-nspawn" for a in argv[:5]):
            return pid
    return None


def prepare_disk(plan: Plan, host: str) -> bool:
    """Mount the host's overlay; give a new disk its identity. Returns True for a new disk."""
    hdir = plan.host_dir(host)
    upper, work, merged = hdir / "upper", hdir / "work", hdir / "root"
    lower_file = hdir / "lower"
    new = not upper.exists()
    if not new and lower_file.exists() and lower_file.read_text().strip() != plan.root.name:
        raise UserError(
            f"the disk of {host} was made from another cached root ({lower_file.read_text().strip()}, "
            f"now {plan.root.name}); run inv lab.down --purge to start the lab afresh"
        )
    for d in (upper, work, merged):
        d.mkdir(parents=True, exist_ok=True)
    lower_file.write_text(plan.root.name + "\n")
    if not _is_mount(merged):
        _run(["mount", "-t", "overlay", "overlay", "-o",
              f"lowerdir={plan.root},upperdir={upper},workdir={work}", str(merged)])
    etc = merged / "etc"
    if new or not (etc / "ssh/ssh_host_ed25519_key").exists():
        _run(["ssh-keygen", "-A", "-f", str(merged)])
    if new:
        _write(etc / "machine-id", secrets.token_hex(16) + "\n", 0o444)
        _write(etc / "hostname", host + "\n")
        _write(etc / "hosts", _hosts_file(plan))
    # Ensured on every start: the lab's key and the apt proxy.
    auth = merged / "root/.ssh/authorized_keys"
    key = public_key(plan.inv)
    lines = auth.read_text().splitlines() if auth.exists() else []
    if key not in lines:
        (merged / "root/.ssh").mkdir(mode=0o700, exist_ok=True)
        _write(auth, "\n".join([*lines, key]) + "\n", 0o600)
    _write(etc / "apt/apt.conf.d/01lab-proxy", APT_PROXY_CONF.format(url=plan.proxy_url))
    return new


APT_PROXY_CONF = """\
// Written by inv lab.up: the lab reaches the Debian archive only through this proxy.
Acquire::http::Proxy "{url}";
// A dropped, failed or stalled download is retried rather than fatal or hung.
Acquire::Retries "3";
Acquire::http::Timeout "30";
"""


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


def host_key(plan: Plan, host: str) -> str | None:
    """The host's ed25519 public key ("ssh-ed25519 AAAA..."), from its disk."""
    for base in (plan.merged(host), plan.host_dir(host) / "upper"):
        pub = base / "etc/ssh/ssh_host_ed25519_key.pub"
        if pub.exists():
            return " ".join(pub.read_text().split()[:2])
    return None


def ensure_netns(plan: Plan, host: str) -> None:
    ns = plan.netns(host)
    if not (NETNS_DIR / ns).exists():
        if not _is_mount(NETNS_DIR):
            (plan.state_dir / "made-run-netns").touch()
        _run(["ip", "netns", "add", ns])
        # A new netns inherits the machine's IPv4 settings (devconf_inherit_init_net=0
        # means "inherit" for IPv4); a fresh host does not forward until the gateway tier says so.
        _run(["ip", "netns", "exec", ns, "sysctl", "-q", "-w", "net.ipv4.ip_forward=0", "net.ipv6.conf.all.forwarding=0"])
    _run(["ip", "-n", ns, "link", "set", "lo", "up"])
    inside = {link["ifname"]: link for link in _ip_json("-n", ns, "addr", "show")}
    for net, iface in plan.nics(host):
        if net not in inside:
            veth = plan.veths[(host, net)]
            if _link_exists(veth):
                _run(["ip", "link", "del", veth])
            _run(["ip", "link", "add", veth, "type", "veth", "peer", "name", net, "netns", ns])
            _run(["ip", "link", "set", "dev", veth, "master", plan.bridges[net], "up"])
            have = set()
        else:
            have = {f"{a['local']}/{a['prefixlen']}" for a in inside[net].get("addr_info", [])}
        if str(iface) not in have:
            _run(["ip", "-n", ns, "addr", "add", str(iface), "dev", net])
        _run(["ip", "-n", ns, "link", "set", "dev", net, "up"])


def _cgroup_dirs(plan: Plan, host: str) -> list[Path]:
    return [CGROUP_ROOT / h / plan.cgroup(host) for h in CGROUP_HIERARCHIES if (CGROUP_ROOT / h / "cgroup.procs").exists()]


def _rmdir_tree(path: Path) -> None:
    """Remove an (empty) cgroup directory tree, deepest first."""
    if not path.is_dir():
        return
    for sub in sorted((p for p in path.rglob("*") if p.is_dir()), key=lambda p: len(p.parts), reverse=True):
        with contextlib.suppress(OSError):
            sub.rmdir()
    with contextlib.suppress(OSError):
        path.rmdir()


# Moves itself into the host's cgroups, then becomes systemd-nspawn.
NSPAWN_WRAPPER = 'IFS=:; for cg in $CGROUPS; do echo $$ > "$cg/cgroup.procs" || exit 1; done; unset IFS CGROUPS; exec "$@"'


def start_container(plan: Plan, host: str) -> subprocess.Popen:
    """Boot the host; the returned process is its systemd-nspawn (after the wrapper's exec)."""
    cgroups = _cgroup_dirs(plan, host)
    for cg in cgroups:
        _rmdir_tree(cg)  # a crashed run's payload/supervisor cgroups
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


def _tail(path: Path, lines: int = 20) -> str:
    try:
        text = ANSI.sub("", path.read_text(errors="replace")).replace("\r", "")
    except OSError:
        return ""
    kept = [line for line in text.split("\n") if line.strip()]
    return "\n".join("    " + line for line in kept[-lines:])


# --------------------------------------------------------------------------
# SSH
# --------------------------------------------------------------------------


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
        _write(path, "\n".join(new) + "\n")
    return changed


def wait_ready(plan: Plan, started: dict[str, subprocess.Popen], timeout: float) -> dict[str, str]:
    """Wait until each started host answers SSH and systemd has finished booting; return its state.

    A host counts as stopped when its own nspawn process exited: scanning /proc
    for it races with the wrapper's exec (an empty cmdline for a moment)."""
    deadline = time.monotonic() + timeout

    def one(host: str) -> str:
        addr = (plan.inv.management_address(host), plan.inv.ssh.port)
        while True:
            if started[host].poll() is not None:
                raise UserError(f"{host} stopped while booting; last lines of its console ({plan.console_log(host)}):\n"
                                f"{_tail(plan.console_log(host))}")
            if time.monotonic() > deadline:
                raise UserError(f"{host} did not boot within {timeout:.0f}s; last lines of its console "
                                f"({plan.console_log(host)}):\n{_tail(plan.console_log(host))}")
            try:
                with socket.create_connection(addr, timeout=1):
                    pass
            except OSError:
                time.sleep(0.3)
                continue
            left = max(1, deadline - time.monotonic())
            try:
                proc = subprocess.run(
                    [*ssh_command(plan.inv, host), "systemctl is-system-running --wait"],
                    capture_output=True, text=True, timeout=left, stdin=subprocess.DEVNULL,
                )
            except subprocess.TimeoutExpired:
                continue
            state = proc.stdout.strip()
            if state in ("running", "degraded"):
                return state
            if proc.returncode == 255 and "Host key verification failed" in proc.stderr:
                raise UserError(f"{host}: host key verification failed against {plan.inv.known_hosts_file}")
            time.sleep(0.3)

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


# --------------------------------------------------------------------------
# up / down / status
# --------------------------------------------------------------------------


def ensure_run_mounts(plan: Plan) -> None:
    """nspawn needs a tmpfs for its runtime files when /run is not one."""
    if _fs_type(Path("/run")) != "tmpfs" and not _is_mount(NSPAWN_TMPFS):
        NSPAWN_TMPFS.mkdir(parents=True, exist_ok=True)
        _run(["mount", "-t", "tmpfs", "-o", "mode=0755", "hastack-lab", str(NSPAWN_TMPFS)])
        (plan.state_dir / "made-nspawn-tmpfs").touch()


def _fs_type(path: Path) -> str:
    best, kind = "", ""
    with open("/proc/self/mountinfo") as fh:
        for line in fh:
            left, right = line.split(" - ", 1)
            point = left.split()[4]
            if (str(path) == point or str(path).startswith(point.rstrip("/") + "/")) and len(point) >= len(best):
                best, kind = point, right.split()[0]
    return kind


def lab_up(inv: Inventory, hosts: str | None = None, timeout: float = 180, state_dir: Path | None = None) -> dict:
    """Bring the lab (or the chosen hosts) up; return a summary dict."""
    plan = Plan(inv, state_dir or STATE_DIR)
    require_root("lab.up")
    require_tools()
    selected = plan.select(hosts)
    t0 = time.monotonic()
    with _locked(plan.state_dir):
        check_machine(plan)
        with_modules = [f"{h} ({', '.join(inv.hosts[h].kernel_modules)})" for h in selected if inv.hosts[h].kernel_modules]
        if with_modules:
            _say(f"note: {', '.join(with_modules)} want kernel modules; a container cannot load them, "
                 "so these hosts run as containers without them (see the README's fidelity table)")
        if ensure_key(inv):
            _say(f"made the lab's SSH key {inv.key_file}")
        ensure_run_mounts(plan)
        raised = ensure_inotify_limits()
        if raised:
            _say(f"raised {', '.join(raised)} (every container's systemd takes inotify instances)")
        made = ensure_bridges(plan)
        if made:
            _say(f"made bridges {', '.join(made)}; {plan.bridges[plan.mgmt]} has {plan.bridge_interface}")
        if ensure_apt_proxy(plan):
            _say(f"started apt-cacher-ng on {plan.proxy_url} (cache {plan.apt_cache})")
        if ensure_fence_listener(plan):  # before the hosts boot: their cluster monitors it at once
            _say(f"started the fence_lab power listener on {plan.bridge_interface.ip}")
        built = ensure_root(plan)
        _say(f"cached root {plan.root}: " + (f"built in {built:.0f}s" if built is not None else "reused"))

        running = [h for h in selected if running_pid(plan, h)]
        to_start = [h for h in selected if h not in running]
        with ThreadPoolExecutor(max_workers=4) as pool:
            new_disks = [h for h, new in zip(to_start, pool.map(lambda h: prepare_disk(plan, h), to_start)) if new]
        replaced = update_known_hosts(plan, selected)
        started = {}
        for host in to_start:
            ensure_netns(plan, host)
            started[host] = start_container(plan, host)
        states = wait_ready(plan, started, timeout) if started else {}
    elapsed = time.monotonic() - t0
    degraded = sorted(h for h, s in states.items() if s == "degraded")
    msg = f"{len(running)} hosts already running, {len(to_start)} started"
    if new_disks:
        msg += f" ({len(new_disks)} with new disks)"
    if replaced and new_disks:
        msg += f"; {len(replaced)} host keys written to {inv.known_hosts_file}"
    _say(f"{msg} in {elapsed:.1f}s")
    if degraded:
        _say(f"note: systemd reports 'degraded' on {', '.join(degraded)} (see: inv lab.ssh HOST -c 'systemctl --failed')")
    return {"running": running, "started": to_start, "new_disks": new_disks, "seconds": elapsed,
            "root_seconds": built, "states": states}


def lab_down(inv: Inventory, purge: bool = False, disks: bool = False, state_dir: Path | None = None) -> list[str]:
    """Stop every host of this lab and remove what the lab made; return what was removed."""
    plan = Plan(inv, state_dir or STATE_DIR)
    require_root("lab.down")
    done: list[str] = []
    with _locked(plan.state_dir):
        hosts_dir = plan.dir / "hosts"
        on_disk = [p.name for p in hosts_dir.iterdir() if p.is_dir()] if hosts_dir.is_dir() else []
        known = list(dict.fromkeys([*inv.hosts, *on_disk]))
        # 1. containers: SIGTERM asks nspawn for an orderly poweroff.
        needle = str(hosts_dir) + "/"
        pids = [pid for pid, argv in _processes()
                if os.path.basename(argv[0]) == "systemd-nspawn"
                and any(a.startswith("--directory=" + needle) for a in argv)]
        if pids:
            _stop_pids(pids, grace=30)
            done.append(f"{len(pids)} containers")
        # Anything still in the hosts' cgroups (nothing, normally).
        for host in known:
            for cg in _cgroup_dirs(plan, host):
                left = [int(p) for f in cg.rglob("cgroup.procs") for p in f.read_text().split()] if cg.is_dir() else []
                if left:
                    _stop_pids(left, grace=0)
                _rmdir_tree(cg)
        for hierarchy in CGROUP_HIERARCHIES:
            with contextlib.suppress(OSError):
                (CGROUP_ROOT / hierarchy / "hastack-lab").rmdir()
        # 2. the apt proxy and the fence listener
        fence = _fence_pids(plan)
        if fence:
            _stop_pids(fence, grace=5)
            done.append("fence listener")
        acng = _acng_pids(plan)
        if acng:
            _stop_pids(acng, grace=10)
            done.append("apt-cacher-ng")
        # 3. mounts: the hosts' overlays
        ours = [Path(p) for p in _mounts() if p.startswith(str(plan.dir) + "/")]
        for point in reversed(ours):
            _umount(point)
        if ours:
            done.append(f"{len(ours)} mounts")
        # 4. namespaces (their veth ends go with them), stray veths, bridges
        namespaces = [host for host in known if (NETNS_DIR / plan.netns(host)).exists()]
        for host in namespaces:
            _run(["ip", "netns", "del", plan.netns(host)], check=False)
        if namespaces:
            done.append(f"{len(namespaces)} namespaces")
        bridges = [link["ifname"] for link in _ip_json("-d", "link", "show") if _is_our_bridge(plan, link)]
        veth_re = re.compile(rf"^{re.escape(plan.prefix)}\d+-")
        stray = [link["ifname"] for link in _ip_json("-d", "link", "show")
                 if link.get("linkinfo", {}).get("info_kind") == "veth"
                 and (link.get("master") in bridges or veth_re.match(link["ifname"]))]
        for name in stray:
            _run(["ip", "link", "del", name], check=False)
        if stray:
            done.append(f"{len(stray)} veths")
        for name in bridges:
            _run(["ip", "link", "del", name], check=False)
        if bridges:
            done.append(f"{len(bridges)} bridges")
        # 5. machine-wide mounts the lab made, once no lab is left using them
        if not _find_any_nspawn(plan.state_dir):
            marker = plan.state_dir / "made-nspawn-tmpfs"
            if marker.exists() and _is_mount(NSPAWN_TMPFS):
                _umount(NSPAWN_TMPFS)
                done.append(str(NSPAWN_TMPFS))
            marker.unlink(missing_ok=True)
        marker = plan.state_dir / "made-run-netns"
        if marker.exists() and _is_mount(NETNS_DIR) and not any(NETNS_DIR.iterdir()):
            _umount(NETNS_DIR)
            marker.unlink(missing_ok=True)
            done.append(str(NETNS_DIR))
        if disks and not purge:
            hosts_dir = plan.dir / "hosts"
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


# --- power control for the lab fence agent (fabfile/labfence.py) -----------


def power_state(plan: Plan, host: str) -> str:
    return "on" if running_pid(plan, host) else "off"


def power_off(plan: Plan, host: str, timeout: float = 30) -> None:
    """Pull the plug: SIGKILL every process of the container, no shutdown."""
    pids = [int(p) for cg in _cgroup_dirs(plan, host) if cg.is_dir()
            for f in cg.rglob("cgroup.procs") for p in f.read_text().split()]
    _stop_pids(pids, grace=0)
    deadline = time.monotonic() + timeout
    while running_pid(plan, host) and time.monotonic() < deadline:
        time.sleep(0.2)


def _fence_pids(plan: Plan) -> list[int]:
    return [pid for pid, argv in _processes()
            if "fabfile.labfence" in argv and str(Path(plan.inv.path).resolve()) in argv]


def ensure_fence_listener(plan: Plan) -> bool:
    """The power listener fence_lab talks to, when the inventory fences with fence_lab."""
    if plan.inv.mail is None or plan.inv.mail.fence_agent != "fence_lab" or _fence_pids(plan):
        return False
    from . import labfence
    from .core.secrets import Secrets

    Secrets(plan.inv.site_file("secrets.yml")).get(labfence.SECRET)
    log = plan.dir / "fence-listener.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "ab") as out:
        subprocess.Popen(
            [sys.executable, "-m", "fabfile.labfence", str(Path(plan.inv.path).resolve()), str(plan.state_dir)],
            stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
            start_new_session=True, cwd=str(Path(__file__).resolve().parents[1]), close_fds=True,
        )
    address = (str(plan.bridge_interface.ip), labfence.PORT)
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:
        with contextlib.suppress(OSError), socket.create_connection(address, timeout=0.5):
            return True
        time.sleep(0.2)
    raise UserError(f"the fence listener did not start on {address[0]}:{address[1]}\n{_tail(log)}")


def _find_any_nspawn(state_dir: Path) -> bool:
    needle = "--directory=" + str(state_dir) + "/"
    return any(os.path.basename(argv[0]) == "systemd-nspawn" and any(a.startswith(needle) for a in argv)
               for _, argv in _processes())


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
        elif (plan.host_dir(host) / "upper").exists():
            state = "stopped"
        else:
            state = "absent"
        rows.append({
            "host": host,
            "state": state,
            "addresses": plan.nics(host),
            "memory": host_memory(plan, host) if pid else None,
            "roles": plan.inv.hosts[host].roles,
        })
    return rows


# --------------------------------------------------------------------------
# Tasks
# --------------------------------------------------------------------------


@task(help={
    "hosts": "comma-separated host names to start (default: every inventory host)",
    "timeout": "seconds to wait for the hosts to answer SSH (default 180)",
})
def up(c, hosts=None, timeout=180):
    """Start the lab: one booted Debian container per inventory host (idempotent)."""
    lab_up(load_inventory(c), hosts=hosts, timeout=float(timeout))


@task(help={
    "purge": "also delete the hosts' disks and the cached Debian root (the package cache stays)",
    "disks": "also delete the hosts' disks, keep the cached root (fresh hosts on the next lab.up)",
})
def down(c, purge=False, disks=False):
    """Stop every lab host and remove everything the lab made on this machine."""
    inv = load_inventory(c)
    done = lab_down(inv, purge=purge, disks=disks)
    _say("removed: " + ", ".join(done) if done else "nothing of the lab was running")


@task
def status(c):
    """Show each lab host: state, addresses and memory in use."""
    from rich.console import Console
    from rich.table import Table

    plan = Plan(load_inventory(c))
    table = Table(title=f"lab {plan.inv.site.name} ({plan.inv.path})")
    for col in ("host", "state", "addresses", "memory", "roles"):
        table.add_column(col, justify="right" if col == "memory" else "left")
    colours = {"running": "green", "stopped": "yellow", "absent": "dim"}
    for row in host_states(plan):
        table.add_row(
            row["host"],
            f"[{colours[row['state']]}]{row['state']}[/]",
            ", ".join(f"{net} {iface.ip}" for net, iface in row["addresses"]),
            f"{row['memory'] / 2**20:.0f} MiB" if row["memory"] is not None else "-",
            ", ".join(row["roles"]),
        )
    console = Console()
    console.print(table)
    acng = "running" if _acng_pids(plan) else "not running"
    console.print(f"apt proxy {plan.proxy_url}: {acng}; state dir {plan.state_dir}")


@task(help={"host": "the lab host to log into", "command": "run this command instead of a shell; exit with its status"})
def ssh(c, host, command=None):
    """Open a shell on a lab host over SSH, or run one command (-c) and return its exit status."""
    inv = load_inventory(c)
    if host not in inv.hosts:
        raise UserError(f"unknown host {host}; the inventory {inv.path} has: {', '.join(inv.hosts)}")
    plan = Plan(inv)
    if running_pid(plan, host) is None:
        raise UserError(f"{host} is not running; start it with: inv lab.up --hosts {host}")
    if not inv.key_file.exists():
        raise UserError(f"the lab key {inv.key_file} is missing; inv lab.up makes it")
    interactive = command is None and sys.stdin.isatty()
    cmd = ssh_command(inv, host, batch=not interactive, tty=interactive)
    if command is not None:
        cmd.append(command)
    code = subprocess.run(cmd).returncode
    if code:
        raise Exit(code=code)


@task(help={"host": "the lab host", "action": "off (pull the plug), on (boot it), or status"})
def power(c, host, action):
    """Power one lab host off (hard), on, or show its power state: what fence_lab does."""
    inv = load_inventory(c)
    plan = Plan(inv)
    if host not in inv.hosts:
        raise UserError(f"{inv.path}: no host {host} (hosts: {', '.join(inv.hosts)})")
    if action == "off":
        require_root("lab.power")
        power_off(plan, host)
    elif action == "on":
        if power_state(plan, host) == "off":
            lab_up(inv, hosts=host)
    elif action != "status":
        raise UserError(f"lab.power: action must be on, off or status, not {action!r}")
    _say(f"{host}: {power_state(plan, host)}")
