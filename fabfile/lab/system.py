"""This machine: commands (argument lists, never a shell), processes, mounts,
files, the lab's lock, and the checks made before anything is touched."""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import re
import shutil
import signal
import subprocess
from pathlib import Path

from ..core import UserError
from ..core.report import Report
from ..core.wait import TimedOut, poll

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
ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")


# --- commands ----------------------------------------------------------------


def run(cmd: list[str], *, check: bool = True, env: dict | None = None, timeout: float | None = 120) -> str:
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


def ip_json(*args: str) -> list[dict]:
    out = run(["ip", "-j", *args], check=False)
    try:
        return json.loads(out) if out.strip() else []
    except json.JSONDecodeError:
        return []


# --- processes ---------------------------------------------------------------


def processes() -> list[tuple[int, list[str]]]:
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


def find(program: str, needle: str) -> list[int]:
    """PIDs of `program` whose command line contains the argument `needle`."""
    return [
        pid for pid, argv in processes() if os.path.basename(argv[0]) == program and needle in argv
    ]


def alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as fh:
            return fh.read().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return False


def stop_pids(pids: list[int], grace: float) -> None:
    """SIGTERM, wait up to `grace` seconds, then SIGKILL whatever is left."""
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGTERM)
    with contextlib.suppress(TimedOut):
        poll(lambda: [p for p in pids if alive(p)], lambda left: not left, timeout=grace, interval=0.1,
             what=f"processes {pids} to end")
    for pid in pids:
        if alive(pid):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)


# --- mounts and files --------------------------------------------------------


def mounts() -> list[str]:
    """Mount points, innermost last (as listed in mountinfo)."""
    points = []
    with open("/proc/self/mountinfo") as fh:
        for line in fh:
            points.append(line.split()[4].encode().decode("unicode_escape"))
    return points


def is_mount(path: Path) -> bool:
    return str(path) in mounts()


def umount(path: Path) -> None:
    if subprocess.run(["umount", str(path)], capture_output=True).returncode != 0:
        subprocess.run(["umount", "-l", str(path)], capture_output=True)


def fs_type(path: Path) -> str:
    best, kind = "", ""
    with open("/proc/self/mountinfo") as fh:
        for line in fh:
            left, right = line.split(" - ", 1)
            point = left.split()[4]
            if (str(path) == point or str(path).startswith(point.rstrip("/") + "/")) and len(point) >= len(best):
                best, kind = point, right.split()[0]
    return kind


def write(path: Path, text: str, mode: int = 0o644) -> bool:
    """Write `text` if it differs; return whether the file changed."""
    if path.is_file() and not path.is_symlink() and path.read_text() == text:
        return False
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.is_symlink():
        path.unlink()
    path.write_text(text)
    path.chmod(mode)
    return True


def tail(path: Path, lines: int = 20) -> str:
    """The last non-empty lines of a log, indented, without terminal escapes."""
    try:
        text = ANSI.sub("", path.read_text(errors="replace")).replace("\r", "")
    except OSError:
        return ""
    kept = [line for line in text.split("\n") if line.strip()]
    return "\n".join("    " + line for line in kept[-lines:])


def escape(text: str) -> str:
    """``text`` printed as it is, not read as rich markup."""
    from rich.markup import escape as rich_escape  # here, not at the top: `inv --list` stays fast without rich

    return rich_escape(text)


def say(report: Report, message: str) -> None:
    """A plain line for the operator (and the run's log)."""
    report.console.print(escape(message))
    report.log(message)


@contextlib.contextmanager
def locked(state_dir: Path, report: Report):
    """One lab command at a time on this machine."""
    state_dir.mkdir(parents=True, exist_ok=True)
    with open(state_dir / "lock", "w") as fh:
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            report.note(escape(f"waiting for another lab command to finish (lock {state_dir / 'lock'}) ..."))
            fcntl.flock(fh, fcntl.LOCK_EX)
        yield


# --- checks before anything is touched ---------------------------------------


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
