"""What the mail ops accept: domains, addresses, owners' names and passwords,
each checked whole (``re.fullmatch``) before anything connects. A refused
value is a UserError that says which value and what is wrong with it."""

from __future__ import annotations

import re

from ..core import UserError

LOCAL_RE = re.compile(r"[a-z0-9!#$%&*+/=?^_`{|}~-]+(\.[a-z0-9!#$%&*+/=?^_`{|}~-]+)*")
LABEL_RE = re.compile(r"[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?")
SAFE_LOCAL_RE = re.compile(r"[a-z0-9._+-]+")  # what we accept (a subset: no quoting in SQL or shells)


def check_domain(domain: str) -> str:
    """The domain in lower case (a trailing dot dropped); a UserError says what is wrong with it."""
    d = (domain or "").lower().rstrip(".")
    if not d:
        raise UserError("empty domain name; nothing was changed")
    labels = d.split(".")
    if len(d) > 253 or len(labels) < 2 or not all(LABEL_RE.fullmatch(x) for x in labels) or labels[-1].isdigit():
        raise UserError(f"{domain!r} is not a valid domain name (labels of letters, digits and '-', "
                        "separated by dots, e.g. example.org); nothing was changed")
    return d


def parse_address(address: str) -> tuple[str, str]:
    """(local part, domain) of a mailbox or alias address, lower case; a
    UserError names what is wrong."""
    a = address or ""
    if a.count("@") != 1:
        raise UserError(f"{address!r} is not an e-mail address (LOCAL@DOMAIN); nothing was changed")
    local, domain = a.lower().split("@")
    if not local or len(local) > 64 or not SAFE_LOCAL_RE.fullmatch(local) or not LOCAL_RE.fullmatch(local):
        raise UserError(f"{address!r}: the part before '@' must be letters, digits and . _ + -, "
                        "not starting or ending with a dot nor holding '..'; nothing was changed")
    try:
        domain = check_domain(domain)
    except UserError:
        raise UserError(f"{address!r}: {domain!r} is not a valid domain name; nothing was changed") from None
    return local, domain


def check_name(name: str) -> str:
    """An owner's name for Postfixadmin (free text on one line)."""
    if "'" in name or "\\" in name or "\n" in name or "\r" in name:
        raise UserError("the name may not hold quotes, backslashes or newlines; nothing was changed")
    return name


def check_password(password: str | None) -> str:
    if not password:
        raise UserError("empty password refused; nothing was changed")
    if password != password.strip() or "\n" in password or "\r" in password:
        raise UserError("the password may not start or end with white space or hold a newline; nothing was changed")
    if len(password) < 8:
        raise UserError("the password needs at least 8 characters; nothing was changed")
    return password
