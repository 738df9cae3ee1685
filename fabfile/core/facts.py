"""Facts read from a host in one command instead of one command each.

- Files: every path the earlier runs put or made a directory of on a host is
  listed in ``inventory/<site>.paths.json`` (git-ignored; local state, like the
  known_hosts file). At a host's first file operation of a run, one command reads
  owner:group:mode and SHA-256 of all of them; ``HostSession.put`` and
  ``directory`` answer from that table until anything changes in this run (on any
  host: pcs or Pacemaker acting on one host change others), and probe path by
  path from then on. A path the table does not know is probed as before.
- Units: the units earlier runs converged on a host are read by one
  ``systemctl show`` (a block each) at the host's first ``service``; answered
  from it until anything changes in this run.
- Packages: one ``dpkg-query -W`` lists the state of every package on the host;
  ``HostSession.installed``/``packages`` answer from it, and read it again after
  an install (dependencies came with it).

A no-op run changes nothing, so it asks each host once where it used to ask once
per file, per unit and per package set.
"""

from __future__ import annotations

import json
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

from .shell import q

# A path that could break the table's lines is never listed (probed as before).
_UNSAFE = ("\t", "\n", "\r", "\\")  # sha256sum escapes a name with a backslash or newline


@dataclass(frozen=True)
class FileFact:
    exists: bool
    meta: str | None = None  # owner:group:mode as `stat -c '%U:%G:%a'` prints it
    sha256: str | None = None  # None for a directory


ABSENT = FileFact(False)


def listable(path: str) -> bool:
    return path.startswith("/") and not any(c in path for c in _UNSAFE)


def read_command(paths: list[str]) -> str:
    """One shell command, two processes: `stat` of every path (name, meta, type) and
    `sha256sum` of every path (directories and missing paths only complain, on
    stderr, which is dropped)."""
    words = " ".join(q(p) for p in paths)
    return (f"stat --printf='%n\\t%U:%G:%a\\t%F\\n' -- {words} 2>/dev/null; echo ==; "
            f"sha256sum -- {words} 2>/dev/null; true")


def parse(paths: list[str], stdout: str) -> dict[str, FileFact]:
    """The table ``read_command`` printed: every asked path, absent unless listed."""
    table = {p: ABSENT for p in paths}
    stats, _, sums = stdout.partition("==\n")
    hashes: dict[str, str] = {}
    for line in sums.splitlines():
        digest, sep, name = line.partition("  ")
        if sep and len(digest) == 64:
            hashes[name] = digest
    for line in stats.splitlines():
        parts = line.split("\t")
        if len(parts) != 3 or parts[0] not in table or not parts[1]:
            continue
        name, meta, kind = parts
        if kind == "directory":
            table[name] = FileFact(True, meta, None)
        elif name in hashes:
            table[name] = FileFact(True, meta, hashes[name])
        # a path stat sees but sha256sum could not read stays unknown to the table: probed itself
        else:
            table.pop(name)
    return table


def package_states(stdout: str) -> dict[str, bool]:
    """`dpkg-query -W -f='${Package} ${db:Status-Status}\\n'` as {package: installed}."""
    out: dict[str, bool] = {}
    for line in stdout.splitlines():
        name, _, status = line.strip().partition(" ")
        if name:
            out[name] = out.get(name, False) or status == "installed"
    return out


PACKAGES_COMMAND = "dpkg-query -W -f='${Package} ${db:Status-Status}\\n'"


CONDITIONS = "Conditions(now)"  # a unit's conditions evaluated now: "pass" or "fail"
_CONDITIONS_MARK = "==hastack-conditions=="


def units_command(units: list[str], properties: tuple[str, ...], conditions: list[str] = ()) -> str:
    """One `systemctl show` of ``properties`` for every unit (a block each, in order);
    then `systemd-analyze condition` of each unit of ``conditions`` (the units an
    earlier run found skipped by their conditions), in the same round trip."""
    cmd = "systemctl show " + " ".join(f"-p {p}" for p in properties) + " " + " ".join(q(u) for u in units)
    if conditions:
        cmd += f"; echo {_CONDITIONS_MARK}; {conditions_command(conditions)}"
    return cmd


def conditions_command(units: list[str]) -> str:
    """`systemd-analyze condition` of each unit's conditions: a line "UNIT pass" or "UNIT fail" each."""
    return f"for u in {' '.join(q(u) for u in units)}; do {_EVALUATE}; done"


# The unit's Condition*= lines (unit file and drop-ins, from `systemctl cat`) given to
# `systemd-analyze condition` as expressions: a third of the CPU of `--unit=`, which
# loads every unit file; a unit that resets a condition (an empty `ConditionX=`) is
# evaluated with `--unit=` as it is.
_EVALUATE = (
    "f=$(systemctl cat -- \"$u\" 2>/dev/null); "
    "if printf '%s\\n' \"$f\" | grep -q '^[[:space:]]*Condition[A-Za-z]*=[[:space:]]*$'; then "
    "systemd-analyze condition --unit=\"$u\" >/dev/null 2>&1; "
    "else printf '%s\\n' \"$f\" | sed -n 's/^[[:space:]]*\\(Condition[A-Za-z]*=.*[^[:space:]]\\)[[:space:]]*$/\\1/p' "
    "| tr '\\n' '\\0' | xargs -0 -r systemd-analyze condition >/dev/null 2>&1; fi "
    "&& echo \"$u pass\" || echo \"$u fail\""
)


def parse_units(units: list[str], stdout: str) -> dict[str, dict[str, str]] | None:
    """The blocks of ``units_command`` by unit (with CONDITIONS where they were
    evaluated); None when they do not line up."""
    shown, _, evaluated = stdout.partition(f"\n{_CONDITIONS_MARK}\n")
    blocks = [b for b in shown.strip("\n").split("\n\n")]
    if len(blocks) != len(units):
        return None
    table = {u: dict(line.split("=", 1) for line in b.splitlines() if "=" in line) for u, b in zip(units, blocks)}
    for line in evaluated.splitlines():
        unit, _, result = line.rpartition(" ")
        if unit in table and result in ("pass", "fail"):
            table[unit][CONDITIONS] = result
    return table


UNIT_NAME = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789@._:-\\"


class Known:
    """The paths and units each host's runs managed, kept in a JSON file beside the
    inventory: {host: {"paths": [...], "units": [...], "skipped": [...]}} (skipped:
    the units found skipped by their conditions, evaluated again with the table)."""

    def __init__(self, path: Path | None, *, persist: bool = True):
        self.path = path
        self.persist = persist
        self._old: dict[str, dict[str, list[str]]] = {}
        self._touched: dict[str, dict[str, set[str]]] = {}
        self._existing: dict[str, set[str]] = {}
        if path is not None:
            try:
                data = json.loads(path.read_text())
            except (OSError, ValueError):
                data = {}  # no state yet, or unreadable: every path is probed as before
            for host, entry in (data.items() if isinstance(data, dict) else ()):
                if isinstance(entry, dict):
                    self._old[host] = {
                        "paths": [p for p in entry.get("paths", []) if isinstance(p, str) and listable(p)],
                        "units": [u for u in entry.get("units", []) if isinstance(u, str) and unit_name(u)],
                    }
                    skipped = [u for u in entry.get("skipped", []) if isinstance(u, str) and unit_name(u)]
                    if skipped:
                        self._old[host]["skipped"] = skipped

    def paths_of(self, host: str) -> list[str]:
        return list(self._old.get(host, {}).get("paths", []))

    def units_of(self, host: str) -> list[str]:
        return list(self._old.get(host, {}).get("units", []))

    def skipped_of(self, host: str) -> list[str]:
        """The units of ``host`` an earlier run found skipped by their conditions."""
        return list(self._old.get(host, {}).get("skipped", []))

    def touched(self, host: str, path: str) -> None:
        if listable(path):
            self._touched.setdefault(host, {}).setdefault("paths", set()).add(path)

    def touched_unit(self, host: str, unit: str) -> None:
        if unit_name(unit):
            self._touched.setdefault(host, {}).setdefault("units", set()).add(unit)

    def skipped(self, host: str, unit: str) -> None:
        """``unit`` is skipped by its conditions on ``host`` (evaluated in this run)."""
        if unit_name(unit):
            self._touched.setdefault(host, {}).setdefault("skipped", set()).add(unit)

    def seen(self, host: str, table: dict[str, FileFact]) -> None:
        self._existing[host] = {p for p, f in table.items() if f.exists}

    def save(self) -> None:
        """This run's paths and units, and the earlier ones (paths only while they
        still exist: a path neither managed now nor found on the host is dropped)."""
        if self.path is None or not self.persist or not self._touched:
            return
        data = {h: {k: list(v) for k, v in e.items()} for h, e in self._old.items()}
        for host, touched in self._touched.items():
            old = {"paths": [], "units": [], "skipped": [], **self._old.get(host, {})}
            kept = self._existing.get(host, set(old["paths"]))
            units = touched.get("units", set())
            data[host] = {"paths": sorted(touched.get("paths", set()) | (set(old["paths"]) & kept)),
                          "units": sorted(units | set(old["units"]))}
            # a unit this run looked at is skipped only when this run found it so
            skipped = touched.get("skipped", set()) | (set(old["skipped"]) - units)
            if skipped:
                data[host]["skipped"] = sorted(skipped)
        if data == self._old:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{self.path.name}.", dir=self.path.parent)
        try:
            with os.fdopen(fd, "w") as f:
                json.dump(data, f, indent=0, sort_keys=True)
            os.replace(tmp, self.path)
        except OSError:
            Path(tmp).unlink(missing_ok=True)


def unit_name(name: str) -> bool:
    return bool(name) and all(c in UNIT_NAME for c in name)
