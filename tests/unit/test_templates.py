"""Every template renders for every host of every shipped inventory with
StrictUndefined, and starts with the managed-file header."""

import importlib
import re
from pathlib import Path

import jinja2
import pytest

from fabfile.core import templates
from fabfile.core.inventory import load
from fabfile.core.secrets import Secrets
from tests.unit.shipped import INVENTORIES

ROOT = Path(__file__).resolve().parents[2]

NAMES = templates.template_names()


def tier_vars(name, inv, host, secret) -> dict:
    """What the tier that owns configs/<tier>/... hands its templates (explicitly: the
    core looks nothing up by itself)."""
    module = importlib.import_module(f"fabfile.{name.split('/', 1)[0]}")
    return module.template_vars(inv, host, secret)


def test_every_template_belongs_to_a_tier_with_template_vars():
    for name in NAMES:
        module = importlib.import_module(f"fabfile.{name.split('/', 1)[0]}")
        assert callable(getattr(module, "template_vars", None)), name


def test_there_are_templates():
    assert "base/etc/hosts.j2" in NAMES


@pytest.mark.parametrize("inventory", INVENTORIES, ids=lambda p: p.name)
@pytest.mark.parametrize("name", NAMES)
def test_template_renders_for_every_host(name, inventory, tmp_path):
    inv = load(inventory)
    secrets = Secrets(tmp_path / "secrets.yml")
    for host in inv.hosts:
        text = templates.render(name, inv, host, secrets.get, **tier_vars(name, inv, host, secrets.get))
        assert text.strip(), f"{name} rendered empty for {host}"
        # Go templates of Prometheus's rules ({{ $labels.x }}, {{ .Value }}) are the file's own
        assert not re.search(r"\{\{(?!\s*[$.])", text) and "{%" not in text


@pytest.mark.parametrize("name", NAMES)
def test_template_has_managed_header(name):
    source = (templates.CONFIGS / name).read_text()
    first = source.splitlines()[0]
    if first.startswith("{# no-header:"):
        return  # the file format allows no comment; the reason is on that line
    assert "{{ managed(" in first, f"{name}: first line must be the managed() header"


def test_strict_undefined_fails_loudly(tmp_path):
    (tmp_path / "t.j2").write_text("{{ missing }}")
    env = templates.environment()
    env.loader = jinja2.FileSystemLoader(tmp_path)
    with pytest.raises(jinja2.UndefinedError):
        env.get_template("t.j2").render()


def test_hosts_file_lists_every_host_at_its_service_address(tmp_path):
    inv = load(ROOT / "inventory/lab.yml")
    secret = Secrets(tmp_path / "s.yml").get
    text = templates.render("base/etc/hosts.j2", inv, "e1server", secret, **tier_vars("base/", inv, "e1server", secret))
    assert "10.200.1.10\tpsql1server.lab.test psql1server" in text
    assert "10.200.0.111\tngx01" not in text and "10.200.11.111\tngx01.lab.test ngx01" in text
    assert "10.200.1.4\txmpp.lab.test" in text
    assert text.startswith("# Managed by hastack (configs/base/etc/hosts.j2)")
