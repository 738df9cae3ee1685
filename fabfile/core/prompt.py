"""Asking the operator: a hidden password prompt and a yes/no confirmation,
both refusing clearly when there is no terminal to ask on."""

from __future__ import annotations

import getpass
import sys
from pathlib import Path
from typing import Callable

from .errors import UserError


def _terminal() -> bool:
    return bool(sys.stdin) and sys.stdin.isatty()


def password(given: str | None = None, *, file: str | None = None, confirm: bool = True,
             check: Callable[[str], str] | None = None, what: str = "password") -> str:
    """The password from ``--password``, from ``--password-file`` (a path, or ``-``
    for standard input: its first line), or asked for (hidden, twice) on a
    terminal. ``check`` validates it (raising UserError). Without any of them
    and without a terminal: a UserError that says how to pass it."""
    if given is not None and file is not None:
        raise UserError("give --password or --password-file, not both; nothing was changed")
    if file is not None:
        value = _read_password_file(file)
    elif given is not None:
        value = given
    elif _terminal():
        value = getpass.getpass(f"{what}: ")
        if confirm and getpass.getpass(f"{what} again: ") != value:
            raise UserError("the passwords differ; nothing was changed")
    else:
        raise UserError(f"no {what} given and no terminal to ask on: pass --password-file FILE "
                        "(- reads it from standard input) or --password; nothing was changed")
    return check(value) if check else value


def _read_password_file(file: str) -> str:
    try:
        if file == "-":
            text = sys.stdin.readline()
        else:
            text = Path(file).expanduser().read_text(encoding="utf-8")
    except OSError as exc:
        raise UserError(f"--password-file {file}: cannot read it ({exc.strerror or exc}); nothing was changed") \
            from None
    except UnicodeDecodeError:
        raise UserError(f"--password-file {file}: not UTF-8 text; nothing was changed") from None
    lines = text.splitlines()
    return lines[0] if lines else ""


def confirm(question: str, *, yes: bool = False) -> None:
    """Go on only when the operator types 'yes' (or passed --yes); a UserError otherwise."""
    if yes:
        return
    if not _terminal():
        raise UserError("no terminal to confirm on: re-run with --yes after reading the evidence above")
    answer = input(f"{question}? type 'yes' to proceed: ")
    if answer.strip().lower() != "yes":
        raise UserError("not confirmed; nothing was changed")
