"""The apt proxy: apt-cacher-ng on the management bridge's address, the lab
hosts' only way to the Debian archive (and the cached root's builder's)."""

from __future__ import annotations

import contextlib
import socket
import subprocess
import time

from ..core import UserError
from ..core.wait import TimedOut, poll
from .plan import MIRROR, SECURITY_MIRROR, Plan
from .system import find, tail, write

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
# the way") and fail the request, again on the clients' retries. Index files
# fetched in the last 10 minutes are meant to be served without asking upstream
# again (3.7 still revalidated InRelease on each request here). What keeps a
# deploy going is the hosts' side: `apt-get update` tries with a short first
# timeout, after a pause that differs per host, without the partial downloads
# of a failed try (APT_UPDATE in fabfile/core/shell.py), and apt retries
# (APT_PROXY_CONF).
# (Passing Release files through uncached is no cure: on pass-through 3.7 sends
# the client's Host and User-Agent headers twice, and an HTTP proxy between here
# and the archive may answer 400.)
FreshIndexMaxAge: 600
"""

# What each host's apt is told (machines.prepare_disk writes it on every start).
APT_PROXY_CONF = """\
// Written by inv lab.up: the lab reaches the Debian archive only through this proxy.
Acquire::http::Proxy "{url}";
// A dropped, failed or stalled download is retried rather than fatal or hung.
Acquire::Retries "3";
Acquire::http::Timeout "30";
"""


def acng_pids(plan: Plan) -> list[int]:
    return find("apt-cacher-ng", str(plan.acng_dir))


def listening(address: tuple[str, int]) -> bool:
    """Whether something accepts TCP connections on `address`."""
    with contextlib.suppress(OSError), socket.create_connection(address, timeout=0.5):
        return True
    return False


def ensure_apt_proxy(plan: Plan) -> bool:
    """apt-cacher-ng on the management bridge address, detached; True if started now."""
    if acng_pids(plan):
        return False
    conf = plan.acng_dir
    for sub in ("log",):
        (conf / sub).mkdir(parents=True, exist_ok=True)
    plan.apt_cache.mkdir(parents=True, exist_ok=True)
    write(conf / "backends_debian", MIRROR + "/\n")
    write(
        conf / "acng.conf",
        ACNG_CONF.format(
            cache=plan.apt_cache, logs=conf / "log", pidfile=conf / "apt-cacher-ng.pid",
            socket=conf / "socket", port=plan.proxy_port, address=plan.bridge_interface.ip,
            security=SECURITY_MIRROR.split("://", 1)[1],
        ),
    )
    address = (str(plan.bridge_interface.ip), plan.proxy_port)
    for _attempt in (1, 2):  # a just-stopped instance may still hold the port for a moment
        with open(conf / "log" / "stdout.log", "ab") as out:
            proc = subprocess.Popen(
                ["apt-cacher-ng", "-c", str(conf), "ForeGround=1"],
                stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                start_new_session=True, cwd="/", close_fds=True,
            )
        try:
            poll(lambda: listening(address), bool, timeout=15, interval=0.1,
                 what=f"apt-cacher-ng on {address[0]}:{address[1]}",
                 give_up=lambda _up, _s: "it exited" if proc.poll() is not None else None)
            return True
        except TimedOut:
            if proc.poll() is None:
                break
        time.sleep(1)
    status = "still not listening" if proc.poll() is None else f"exited with status {proc.returncode}"
    log = tail(conf / "log" / "stdout.log") or tail(conf / "log" / "apt-cacher.err", 5)
    raise UserError(f"apt-cacher-ng did not start listening on {address[0]}:{address[1]} ({status})\n{log}")
