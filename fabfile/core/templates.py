"""Jinja2 over configs/: every file we put on a host is rendered from a template
named after the path it lands on (configs/<tier>/<path>.j2)."""

from __future__ import annotations

import functools
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import jinja2

    from .inventory import Inventory

CONFIGS = Path(__file__).resolve().parents[2] / "configs"
HEADER_MARK = "Managed by hastack"


def _managed(comment: str = "#", source: str = "") -> str:
    return f"{comment} {HEADER_MARK} ({source}): local edits are overwritten on the next deploy."


def _managed_header(ctx, comment: str = "#") -> str:
    return _managed(comment, f"configs/{ctx.name}" if ctx.name else "")


def php_literal(value) -> str:
    """A PHP single-quoted string literal of ``value`` (the `php` filter): inside
    one, only a backslash and the quote itself are special."""
    return "'" + str(value).replace("\\", "\\\\").replace("'", "\\'") + "'"


def environment() -> jinja2.Environment:
    import jinja2  # here, not at the top: `inv --list` does not render templates

    env = jinja2.Environment(
        loader=jinja2.FileSystemLoader(CONFIGS),
        undefined=jinja2.StrictUndefined,
        keep_trailing_newline=True,
        trim_blocks=True,
        lstrip_blocks=True,
        autoescape=False,
    )
    env.globals["managed"] = jinja2.pass_context(_managed_header)
    env.filters["php"] = php_literal
    return env


@functools.cache
def _env() -> jinja2.Environment:
    """The environment every render uses, made on the first one."""
    return environment()


def template_names() -> list[str]:
    return sorted(p.relative_to(CONFIGS).as_posix() for p in CONFIGS.rglob("*.j2"))


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


def render(name: str, inv: Inventory, host: str, secret, **vars) -> str:
    """Render configs/<name> for ``host`` with the standard context and the
    variables the tier hands over (``vars``): templates see nothing else."""
    return _env().get_template(name).render(context(inv, host, secret, **vars))


def static(name: str) -> str:
    """configs/<name>: a file that lands on hosts as it is (no template)."""
    path = CONFIGS / name
    if not path.is_file() or path.suffix == ".j2":
        raise FileNotFoundError(f"configs/{name}: no such static file")
    return path.read_text()
