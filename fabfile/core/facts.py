"""Facts read from a host in one command instead of one command each.

- Files: every path the earlier runs put or made a directory of on a host is
  listed in ``inventory/<site>.paths.json`` (git-ignored; local state, like the
  known_hosts file). At a host's first file operation of a run, one command reads
  owner:group:mode and SHA-256 of all of them; ``HostSession.put`` and
  ``directory`` answer from that table until anything changes on the host in
  this run, and probe path by path from then on (a change may have written
  any file). A path the table does not know is probed as before.
- Packages: one ``dpkg-query -W`` lists the state of every package on the host;
  ``HostSession.installed``/``packages`` answer from it, and read it again after
  an install (dependencies came with it).

A no-op run changes nothing, so it asks each host once where it used to ask once
per file and once per package set.
"""

from __future__ import annotations

import json
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

from .shell import q

# A path that could break the table's lines is never listed (probed as before).
_UNSAFE = ("\t", "\n", "\r")


@dataclass(frozen=True)
class FileFact:
    exists: bool
    meta: str | None = None  # owner:group:mode as `stat -c '%U:%G:%a'` prints it
    sha256: str | None = None  # None for a directory


ABSENT = FileFact(False)


def listable(path: str) -> bool:
    return path.startswith("/") and not any(c in path for c in _UNSAFE)


def read_command(paths: list[str]) -> str:
    """One shell command printing `path<TAB>meta<TAB>sha256` (``-`` for a directory)
    for each of ``paths`` that exists (nothing for one that does not)."""
    words = " ".join(q(p) for p in paths)
    return ("for p in " + words + "; do "
            "if [ -d \"$p\" ]; then printf '%s\\t%s\\t-\\n' \"$p\" \"$(stat -c '%U:%G:%a' \"$p\")\"; "
            "elif [ -e \"$p\" ]; then printf '%s\\t%s\\t%s\\n' \"$p\" \"$(stat -c '%U:%G:%a' \"$p\")\" "
            "\"$(sha256sum < \"$p\" | cut -d' ' -f1)\"; fi; done")


def parse(paths: list[str], stdout: str) -> dict[str, FileFact]:
    """The table ``read_command`` printed: every asked path, absent unless listed."""
    table = {p: ABSENT for p in paths}
    for line in stdout.splitlines():
        parts = line.split("\t")
        if len(parts) != 3 or parts[0] not in table or not parts[1]:
            continue
        table[parts[0]] = FileFact(True, parts[1], None if parts[2] == "-" else parts[2])
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


class KnownPaths:
    """The paths each host's runs managed, kept in a JSON file beside the inventory."""

    def __init__(self, path: Path | None, *, persist: bool = True):
        self.path = path
        self.persist = persist
        self._old: dict[str, list[str]] = {}
        self._touched: dict[str, set[str]] = {}
        self._existing: dict[str, set[str]] = {}
        if path is not None:
            try:
                data = json.loads(path.read_text())
                if isinstance(data, dict):
                    self._old = {h: [p for p in ps if isinstance(p, str) and listable(p)]
                                 for h, ps in data.items() if isinstance(ps, list)}
            except (OSError, ValueError):
                self._old = {}  # no state yet, or unreadable: every path is probed as before

    def of(self, host: str) -> list[str]:
        return list(self._old.get(host, []))

    def touched(self, host: str, path: str) -> None:
        if listable(path):
            self._touched.setdefault(host, set()).add(path)

    def seen(self, host: str, table: dict[str, FileFact]) -> None:
        self._existing[host] = {p for p, f in table.items() if f.exists}

    def save(self) -> None:
        """This run's paths and the earlier ones that still exist (a path that was
        neither managed now nor found on the host is dropped)."""
        if self.path is None or not self.persist or not self._touched:
            return
        data = dict(self._old)
        for host, paths in self._touched.items():
            kept = self._existing.get(host, set(self._old.get(host, [])))
            data[host] = sorted(paths | (set(self._old.get(host, [])) & kept))
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
