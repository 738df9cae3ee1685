"""Site secrets: generated on first use, kept beside the inventory (mode 0600,
git-ignored), reused on every later run. Nothing secret lives in the repo."""

from __future__ import annotations

import functools
import os
import secrets as _random
import stat
import threading
from pathlib import Path
from typing import Callable

import yaml

from .errors import UserError


def token(length: int = 32) -> str:
    """A password made of letters and digits only, safe inside any config syntax."""
    alphabet = "abcdefghijkmnopqrstuvwxyzABCDEFGHJKLMNPQRSTUVWXYZ23456789"
    return "".join(_random.choice(alphabet) for _ in range(length))


_BCRYPT_ALPHABET = "./ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789"


@functools.lru_cache(maxsize=256)
@functools.lru_cache(maxsize=64)  # bcrypt is slow on purpose: each host's template asks for the same hash
def stable_bcrypt(password: str, purpose: str, rounds: int = 10) -> str:
    """A bcrypt hash ($2b$) of ``password`` whose salt is derived from the
    password and ``purpose``: the file it lands in renders the same on every run
    (a random salt would rewrite it each time). Fine for generated secrets,
    which are random themselves; never for passwords people choose."""
    import base64
    import hashlib

    import bcrypt  # here, not at the top: `inv --list` hashes nothing

    seed = hashlib.sha256(f"{purpose}:".encode() + password.encode()).digest()
    raw = base64.b64encode(seed[:16]).decode().rstrip("=")
    std = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/"
    salt = raw.translate(str.maketrans(std, _BCRYPT_ALPHABET))[:22]
    # the last character carries only 2 bits: keep it canonical
    salt = salt[:21] + _BCRYPT_ALPHABET[_BCRYPT_ALPHABET.index(salt[21]) & 0x30]
    return bcrypt.hashpw(password.encode(), f"$2b${rounds:02d}${salt}".encode()).decode()


class Secrets:
    def __init__(self, path: Path, *, persist: bool = True):
        self.path = Path(path)
        self.persist = persist
        self._lock = threading.Lock()
        self._values: dict[str, str] = self._read()

    def _read(self) -> dict[str, str]:
        if not self.path.exists():
            return {}
        if not self.path.is_file():
            raise UserError(f"{self.path}: the secrets file is not a file")
        mode = stat.S_IMODE(self.path.stat().st_mode)
        if mode & 0o077:
            raise UserError(
                f"{self.path}: secrets file is readable by others (mode {mode:04o}); "
                f"run `chmod 600 {self.path}` and check who has seen it"
            )
        try:
            data = yaml.load(self.path.read_bytes().decode("utf-8"),
                             Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader)) or {}
        except OSError as exc:
            raise UserError(f"{self.path}: cannot read the secrets file ({exc.strerror or exc})") from None
        except UnicodeDecodeError:
            raise UserError(f"{self.path}: the secrets file is not UTF-8 text") from None
        except yaml.YAMLError as exc:
            mark = getattr(exc, "problem_mark", None)
            where = f" at line {mark.line + 1}" if mark else ""
            raise UserError(f"{self.path}: secrets file is not valid YAML{where}: "
                            f"{getattr(exc, 'problem', None) or exc}") from None
        if not isinstance(data, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in data.items()):
            raise UserError(f"{self.path}: secrets file must map names to strings")
        return data

    def get(self, name: str, generate: Callable[[], str] = token) -> str:
        """The secret called ``name``, generated (and saved) the first time it is asked for."""
        with self._lock:
            if name not in self._values:
                self._values[name] = generate()
                self._write()
            return self._values[name]

    def require(self, name: str, hint: str = "") -> str:
        """A secret the operator must provide (e.g. a BMC password): never generated."""
        if name not in self._values:
            raise UserError(f"{self.path}: missing secret '{name}'" + (f" ({hint})" if hint else ""))
        return self._values[name]

    def __contains__(self, name: str) -> bool:
        return name in self._values

    def values(self) -> list[str]:
        return list(self._values.values())

    def mask(self, text: str) -> str:
        """``text`` with every known secret replaced by ***, for logs and diffs."""
        for value in sorted(self._values.values(), key=len, reverse=True):
            if len(value) >= 8:
                text = text.replace(value, "***")
        return text

    def _write(self) -> None:
        if not self.persist:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_name(self.path.name + ".tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write("# Generated by hastack: the site's secrets. Keep out of git; mode 0600.\n")
            yaml.safe_dump(self._values, f, default_flow_style=False, sort_keys=True)
        os.chmod(tmp, 0o600)
        os.replace(tmp, self.path)
