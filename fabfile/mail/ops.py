"""Day-2 operations on Postfixadmin's schema (`mail.add-domain`, `add-mailbox`,
`add-alias`, `set-password`, `list`): the same rows its web UI writes,
passwords as dovecot `{BLF-CRYPT}` hashes, on the back end that holds the mail
VIP (or the first one that answers when no VIP is up). Every input is checked,
and a password asked for, before anything connects; a refused command changes
nothing."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from ..core import UserError, q, runbook, topology
from ..core import prompt
from ..core.sql import my_literal
from .addresses import check_domain, check_name, check_password, parse_address
from .postfixadmin import alias_sql, domain_exists, domain_sql, mailbox_hash, mailbox_sql, password_sql, query, write

if TYPE_CHECKING:
    from ..core import HostSession, Run

PASSWORD_HELP = {
    "password": "the password (asked for, hidden, when not given; an argument lands in the shell history)",
    "password-file": "read the password from the first line of this file (- = standard input)",
}


def on_mail_host(run: Run, title: str, action) -> None:
    """``action`` on the back end holding the mail VIP; without a VIP up, the first
    one (inventory order, narrowed by --hosts) that is reachable."""
    if run.inv.mail is None:
        raise UserError(f"{run.inv.path}: no 'mail' section: the inventory has no mail cluster")
    vip = run.inv.vips.get("mail")
    prefer = f"ip -o -4 addr show | grep -qw {q(f'inet {vip.address}')}" if vip is not None else None
    h = run.answering(run.hosts(topology.MAIL_BACKEND), what="mail back end", prefer=prefer)
    run.on_one(title, h, action)


def _password(password: str | None, password_file: str | None) -> str:
    return prompt.password(password, file=password_file, check=check_password)


def _refuse_unknown_domain(h: HostSession, domain: str) -> None:
    if not domain_exists(h, domain):
        raise UserError(f"domain {domain} is not served here (add it with `inv mail.add-domain {domain}`); "
                        "nothing was changed")


@runbook(positional=["domain"], help={"domain": "the domain to receive mail for, e.g. example.org",
                                      "description": "a note shown in Postfixadmin"})
def add_domain(run, domain, description=""):
    """Add a mail domain (refuses one that exists)."""
    domain = check_domain(domain)

    def act(h: HostSession) -> None:
        if domain_exists(h, domain):
            raise UserError(f"domain {domain} exists already; nothing was changed")
        write(h, domain_sql(domain, description), f"domain {domain} added")

    on_mail_host(run, f"mail: add domain {domain}", act)


@runbook(positional=["address"],
         help={"address": "LOCAL@DOMAIN; the domain must have been added (mail.add-domain)",
               "name": "the owner's name", **PASSWORD_HELP})
def add_mailbox(run, address, password=None, name="", password_file=None):
    """Add a mailbox (refuses a malformed address, an unknown domain, an existing address)."""
    local, domain = parse_address(address)
    address = f"{local}@{domain}"
    name = check_name(name)
    password = _password(password, password_file)

    def act(h: HostSession) -> None:
        _refuse_unknown_domain(h, domain)
        if query(h, f"SELECT username FROM mailbox WHERE username = {my_literal(address)};"):
            raise UserError(f"mailbox {address} exists already (use mail.set-password); nothing was changed")
        if query(h, f"SELECT address FROM alias WHERE address = {my_literal(address)};"):
            raise UserError(f"{address} is an alias already; nothing was changed")
        write(h, mailbox_sql(local, domain, mailbox_hash(password), name), f"mailbox {address} added")

    on_mail_host(run, f"mail: add mailbox {address}", act)


@runbook(positional=["address", "goto"],
         help={"address": "the alias LOCAL@DOMAIN (its domain must have been added)",
               "goto": "where its mail goes: one address or several separated by commas"})
def add_alias(run, address, goto):
    """Add an alias forwarding ADDRESS to GOTO (refuses an existing address)."""
    local, domain = parse_address(address)
    address = f"{local}@{domain}"
    targets = []
    for t in (goto or "").split(","):
        if t.strip(" "):
            tl, td = parse_address(t.strip(" "))
            targets.append(f"{tl}@{td}")
    if not targets:
        raise UserError("no target address given (GOTO); nothing was changed")

    def act(h: HostSession) -> None:
        _refuse_unknown_domain(h, domain)
        if query(h, f"SELECT address FROM alias WHERE address = {my_literal(address)};"):
            raise UserError(f"{address} exists already (a mailbox or an alias); nothing was changed")
        write(h, alias_sql(address, domain, targets), f"alias {address} -> {', '.join(targets)} added")

    on_mail_host(run, f"mail: add alias {address}", act)


@runbook(positional=["address"], help={"address": "the mailbox LOCAL@DOMAIN", **PASSWORD_HELP})
def set_password(run, address, password=None, password_file=None):
    """Set a mailbox's password (asked for, hidden, when not given)."""
    local, domain = parse_address(address)
    address = f"{local}@{domain}"
    password = _password(password, password_file)

    def act(h: HostSession) -> None:
        if not query(h, f"SELECT username FROM mailbox WHERE username = {my_literal(address)};"):
            raise UserError(f"no mailbox {address}; nothing was changed")
        write(h, password_sql(address, domain, mailbox_hash(password)), f"{address}: password changed")

    on_mail_host(run, f"mail: set password of {address}", act)


@dataclass
class Listing:
    domains: list[list[str]]
    mailboxes: list[list[str]]
    aliases: list[list[str]]


@runbook(name="list", readonly=True)
def list_(run):
    """Domains, mailboxes and aliases in the Postfixadmin database."""
    out: dict[str, Listing] = {}

    def act(h: HostSession) -> None:
        out["l"] = Listing(
            query(h, "SELECT domain, active FROM domain WHERE domain <> 'ALL' ORDER BY domain;"),
            query(h, "SELECT username, active FROM mailbox ORDER BY domain, username;"),
            query(h, "SELECT address, goto, active FROM alias WHERE address <> goto ORDER BY domain, address;"),
        )
        h.ok("read")

    on_mail_host(run, "mail: list", act)
    lst = out["l"]
    con = run.report.console
    for d, active in lst.domains:
        con.print(f"domain  {d}" + ("" if active == "1" else "  (inactive)"), highlight=False, markup=False)
    for m, active in lst.mailboxes:
        con.print(f"mailbox {m}" + ("" if active == "1" else "  (inactive)"), highlight=False, markup=False)
    for a, goto, active in lst.aliases:
        con.print(f"alias   {a} -> {goto}" + ("" if active == "1" else "  (inactive)"), highlight=False, markup=False)
