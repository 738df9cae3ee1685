"""Jinja2 over configs/: every file we put on a host is rendered from a template
named after the path it lands on (configs/<tier>/<path>.j2)."""

from __future__ import annotations

import importlib
from pathlib import Path
from typing import Any

import jinja2

from .inventory import Inventory

CONFIGS = Path(__file__).resolve().parents[2] / "configs"
HEADER_MARK = "Managed by hastack"


def _managed(comment: str = "#", source: str = "") -> str:
    return f"{comment} {HEADER_MARK} ({source}): local edits are overwritten on the next deploy."


@jinja2.pass_context
def _managed_header(ctx, comment: str = "#") -> str:
    return _managed(comment, f"configs/{ctx.name}" if ctx.name else "")


def environment() -> jinja2.Environment:
    env = jinja2.Environment(
        loader=jinja2.FileSystemLoader(CONFIGS),
        undefined=jinja2.StrictUndefined,
        keep_trailing_newline=True,
        trim_blocks=True,
        lstrip_blocks=True,
        autoescape=False,
    )
    env.globals["managed"] = _managed_header
    return env


_ENV = environment()


def template_names() -> list[str]:
    return sorted(p.relative_to(CONFIGS).as_posix() for p in CONFIGS.rglob("*.j2"))


def tier_vars(tier: str, inv: Inventory, host: str, secret) -> dict[str, Any]:
    """The variables a tier's templates see beyond the standard ones: the tier
    module may define ``template_vars(inv, host, secret) -> dict``."""
    try:
        module = importlib.import_module(f"fabfile.{tier}")
    except ModuleNotFoundError:
        return {}
    fn = getattr(module, "template_vars", None)
    return fn(inv, host, secret) if fn else {}


def context(inv: Inventory, host: str, secret, **extra) -> dict[str, Any]:
    return {
        "inv": inv,
        "site": inv.site,
        "host": host,
        "h": inv.hosts[host],
        "fqdn": inv.fqdn(host),
        "mgmt_address": inv.management_address(host),
        "secret": secret,
        **extra,
    }


def render(name: str, inv: Inventory, host: str, secret, **extra) -> str:
    """Render configs/<name> for ``host`` with the standard context, the tier's
    template_vars, and ``extra``."""
    tier = name.split("/", 1)[0]
    ctx = context(inv, host, secret, **tier_vars(tier, inv, host, secret), **extra)
    return _ENV.get_template(name).render(ctx)
