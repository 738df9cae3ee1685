"""The roles file beside an inventory (<stem>.roles.yml), which rescue tasks write
(`inv postgres.promote`): load() puts it over the hosts' roles and says which hosts
it changed; a broken one is refused naming that file; save_roles() merges changes,
drops hosts whose roles are the inventory's again and removes the file when none
differs. Every case works on a copy of inventory/lab.yml in a temporary folder (a
lab run may have written inventory/lab.roles.yml beside the real one)."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from fabfile.core import topology
from fabfile.core.inventory import ROLES_FILE_HEADER, InventoryError, load, parse, read_roles_file, save_roles

ROOT = Path(__file__).resolve().parents[2]
LAB_TEXT = (ROOT / "inventory/lab.yml").read_text()
SWAP = "hosts:\n  psql1server: [postgres_replica]\n  psql2server: [postgres_primary]\n"


@pytest.fixture
def site(tmp_path) -> Path:
    """A copy of the lab inventory; its roles file would be lab.roles.yml beside it."""
    path = tmp_path / "lab.yml"
    path.write_text(LAB_TEXT)
    return path


def roles_file(site: Path) -> Path:
    return site.with_name("lab.roles.yml")


def write_roles(site: Path, text: str | bytes) -> Path:
    path = roles_file(site)
    if isinstance(text, bytes):
        path.write_bytes(text)
    else:
        path.write_text(text)
    return path


def refused(site: Path) -> InventoryError:
    with pytest.raises(InventoryError) as info:
        load(site)
    return info.value


# --- load() ---------------------------------------------------------------------------------


def test_without_a_roles_file_the_inventory_roles_stand(site):
    inv = load(site)
    assert inv.overridden == {}
    assert inv.roles_file == roles_file(site)
    assert topology.pg_primary(inv) == "psql1server" and topology.pg_replicas(inv) == ["psql2server"]


def test_the_roles_file_is_named_after_the_inventory(tmp_path):
    site = tmp_path / "prod.yml"
    site.write_text(LAB_TEXT)
    (tmp_path / "lab.roles.yml").write_text(SWAP)  # another site's: not read
    inv = load(site)
    assert inv.roles_file == tmp_path / "prod.roles.yml"
    assert inv.overridden == {} and topology.pg_primary(inv) == "psql1server"
    (tmp_path / "prod.roles.yml").write_text(SWAP)
    assert topology.pg_primary(load(site)) == "psql2server"


def test_load_puts_the_roles_file_over_the_hosts_roles(site):
    write_roles(site, SWAP)
    inv = load(site)
    assert topology.pg_primary(inv) == "psql2server"
    assert topology.pg_replicas(inv) == ["psql1server"]
    assert inv.hosts["psql2server"].roles == ["postgres_primary"]
    # overridden: each changed host with the roles the inventory itself gives it
    assert inv.overridden == {"psql1server": ["postgres_primary"], "psql2server": ["postgres_replica"]}
    # only the roles change: addresses and every other host stay the inventory's
    assert inv.service_address("psql2server") == "10.200.1.11"
    assert inv.hosts["e1server"].roles == ["ejabberd"] and inv.hosts["r1server"].roles == ["spare"]
    assert inv.with_role("galera") == ["pxc1", "pxc2", "pxc3"]


def test_a_host_the_roles_file_names_alone_is_the_only_one_overridden(site):
    write_roles(site, "# a spare became a replica\nhosts:\n  r1server: [postgres_replica]\n")
    inv = load(site)
    assert inv.overridden == {"r1server": ["spare"]}
    assert topology.pg_replicas(inv) == ["psql2server", "r1server"]
    assert inv.with_role("spare") == []


def test_a_host_may_be_given_several_roles_or_none(site):
    write_roles(site, "hosts:\n  r1server: [postgres_replica, backup]\n  bk1server: []\n")
    inv = load(site)
    assert inv.hosts["r1server"].roles == ["postgres_replica", "backup"]
    assert inv.hosts["bk1server"].roles == []
    assert inv.overridden == {"r1server": ["spare"], "bk1server": ["backup"]}


@pytest.mark.parametrize("text", ["", "# nothing recorded\n", "hosts: {}\n"], ids=["empty", "comments", "no hosts"])
def test_an_empty_roles_file_changes_nothing(site, text):
    write_roles(site, text)
    inv = load(site)
    assert inv.overridden == {} and topology.pg_primary(inv) == "psql1server"


def test_parse_with_roles_overrides_without_a_file():
    inv = parse(LAB_TEXT, "lab.yml", roles={"psql1server": ["postgres_replica"], "psql2server": ["postgres_primary"]})
    assert topology.pg_primary(inv) == "psql2server"
    assert inv.overridden == {"psql1server": ["postgres_primary"], "psql2server": ["postgres_replica"]}
    plain = parse(LAB_TEXT, "lab.yml")
    assert plain.overridden == {} and topology.pg_primary(plain) == "psql1server"


def test_overridden_is_not_part_of_the_inventory_data(site):
    write_roles(site, SWAP)
    dumped = load(site).model_dump()
    assert "overridden" not in dumped and "path" not in dumped


# --- a broken roles file: refused, naming it --------------------------------------------------


@pytest.mark.parametrize("text,where,what", [
    ("hosts:\n  nosuchhost: [postgres_replica]\n", "hosts.nosuchhost", "not a host of the inventory"),
    ("hosts:\n  psql2server: [postgres_master]\n", "hosts.psql2server", "must be a list of roles (known: webmail,"),
    ("hosts:\n  psql2server: postgres_primary\n", "hosts.psql2server", "must be a list of roles"),
    ("hosts:\n  psql2server: [[postgres_primary]]\n", "hosts.psql2server", "must be a list of roles"),
    ("hosts:\n  psql2server: {roles: [postgres_primary]}\n", "hosts.psql2server", "must be a list of roles"),
    ("hosts:\n  psql2server: [5]\n", "hosts.psql2server", "must be a list of roles"),
], ids=["unknown host", "unknown role", "roles a string", "nested list", "roles a mapping", "role a number"])
def test_a_wrong_entry_is_refused_naming_the_roles_file_and_the_host(site, text, where, what):
    path = write_roles(site, text)
    err = refused(site)
    assert err.path == str(path)
    [(loc, msg)] = err.problems
    assert loc == where and what in msg
    assert str(err).startswith("invalid inventory\n")
    assert f"{path}: {where}: " in str(err)


def test_every_wrong_entry_is_listed(site):
    path = write_roles(site, "hosts:\n  ghost: [spare]\n  psql2server: [primary]\n  r1server: [postgres_replica]\n")
    err = refused(site)
    assert err.path == str(path)
    assert [where for where, _ in err.problems] == ["hosts.ghost", "hosts.psql2server"]


@pytest.mark.parametrize("text", [
    "- psql2server\n",
    "psql2server: [postgres_primary]\n",
    "hosts:\n  - psql2server: [postgres_primary]\n",
    "hosts: psql2server\n",
    "hosts:\n",
    "hosts: {psql2server: [postgres_primary]}\nroles: {}\n",
    "just a sentence\n",
], ids=["a list", "hosts key missing", "hosts a list", "hosts a string", "hosts null", "extra key", "a scalar"])
def test_a_roles_file_of_the_wrong_shape_is_refused(site, text):
    path = write_roles(site, text)
    err = refused(site)
    assert err.path == str(path)
    [(loc, msg)] = err.problems
    assert loc == "" and msg.startswith("a roles file ") and "'hosts:' (host name -> list of roles)" in msg
    assert str(path) in str(err)


@pytest.mark.parametrize("text,what", [
    ("hosts:\n  psql2server: [postgres_primary\n", "malformed YAML"),
    ("hosts:\n\tpsql2server: [postgres_primary]\n", "malformed YAML"),
    ("hosts:\n  psql2server: [postgres_primary]\n  psql2server: [postgres_replica]\n", "duplicate key 'psql2server'"),
], ids=["unclosed list", "tab", "duplicate host"])
def test_malformed_yaml_in_the_roles_file_is_refused(site, text, what):
    path = write_roles(site, text)
    err = refused(site)
    assert err.path == str(path) and what in str(err)
    assert str(err).startswith(f"invalid inventory\n  {path}: ")


def test_a_roles_file_not_utf8_or_unreadable_is_refused(site):
    path = write_roles(site, b"hosts:\n  psql2server: [postgres_primary]\xff\n")
    err = refused(site)
    assert err.path == str(path) and "cannot read the roles file" in str(err)
    path.unlink()
    path.mkdir()
    err = refused(site)
    assert err.path == str(path) and "cannot read the roles file" in str(err)


def test_a_broken_roles_file_is_refused_even_when_no_host_changes(site):
    """The roles file is checked as a whole, not only the entries that apply."""
    write_roles(site, "hosts:\n  psql1server: [postgres_primary]\n  nosuchhost: []\n")
    assert refused(site).problems == [("hosts.nosuchhost", "not a host of the inventory")]


@pytest.mark.parametrize("text,found", [
    ("hosts:\n  psql2server: [postgres_primary]\n", 2),
    ("hosts:\n  psql1server: [postgres_replica]\n", 0),
], ids=["two primaries", "no primary"])
def test_an_override_that_breaks_the_inventory_rules_is_an_invalid_inventory(site, text, found):
    write_roles(site, text)
    err = refused(site)
    assert str(err).startswith("invalid inventory\n")
    assert ("hosts", f"role postgres_primary needs exactly 1 host (found {found})") in err.problems


def test_read_roles_file_without_a_file_is_nothing(tmp_path):
    assert read_roles_file(tmp_path / "lab.roles.yml", LAB_TEXT) == (None, [])


def test_read_roles_file_returns_the_checked_roles(site):
    path = write_roles(site, SWAP)
    assert read_roles_file(path, LAB_TEXT) == (
        {"psql1server": ["postgres_replica"], "psql2server": ["postgres_primary"]}, [])
    with pytest.raises(InventoryError, match="not a host of the inventory"):
        read_roles_file(path, "hosts:\n  a: {}\n")


# --- save_roles() -------------------------------------------------------------------------------


def test_save_roles_writes_a_file_load_reads_back(site):
    inv = load(site)
    written = save_roles(inv, {"psql1server": ["postgres_replica"], "psql2server": ["postgres_primary"]})
    assert written == roles_file(site) and written.exists()
    text = written.read_text()
    assert text.startswith(ROLES_FILE_HEADER.format(inventory="lab.yml"))
    assert yaml.safe_load(text) == {"hosts": {"psql1server": ["postgres_replica"], "psql2server": ["postgres_primary"]}}
    assert not written.with_name("lab.roles.yml.tmp").exists()
    assert set(site.parent.iterdir()) == {site, written}
    again = load(site)
    assert topology.pg_primary(again) == "psql2server" and topology.pg_replicas(again) == ["psql1server"]
    assert again.overridden == {"psql1server": ["postgres_primary"], "psql2server": ["postgres_replica"]}


def test_save_roles_back_to_the_inventory_removes_the_file(site):
    save_roles(load(site), {"psql1server": ["postgres_replica"], "psql2server": ["postgres_primary"]})
    swapped = load(site)
    assert swapped.overridden
    assert save_roles(swapped, {"psql1server": ["postgres_primary"], "psql2server": ["postgres_replica"]}) is None
    assert not roles_file(site).exists()
    back = load(site)
    assert back.overridden == {} and topology.pg_primary(back) == "psql1server"


def test_save_roles_keeps_earlier_changes_and_drops_only_reverted_hosts(site):
    save_roles(load(site), {"r1server": ["postgres_replica"]})
    save_roles(load(site), {"psql1server": ["postgres_replica"], "psql2server": ["postgres_primary"]})
    inv = load(site)
    assert inv.overridden == {"r1server": ["spare"], "psql1server": ["postgres_primary"],
                              "psql2server": ["postgres_replica"]}
    assert topology.pg_replicas(inv) == ["psql1server", "r1server"]
    # the primary moves back; the spare stays a replica
    path = save_roles(inv, {"psql1server": ["postgres_primary"], "psql2server": ["postgres_replica"]})
    assert path == roles_file(site)
    assert yaml.safe_load(path.read_text()) == {"hosts": {"r1server": ["postgres_replica"]}}
    assert load(site).overridden == {"r1server": ["spare"]}


def test_save_roles_compares_roles_regardless_of_order(tmp_path):
    data = yaml.safe_load(LAB_TEXT)
    data["hosts"]["r1server"]["roles"] = ["spare", "ejabberd"]
    site = tmp_path / "lab.yml"
    site.write_text(yaml.safe_dump(data, sort_keys=False))
    assert save_roles(load(site), {"r1server": ["ejabberd", "spare"]}) is None
    assert not roles_file(site).exists()
    assert save_roles(load(site), {"r1server": ["ejabberd"]}) == roles_file(site)


def test_save_roles_without_a_difference_writes_nothing(site):
    assert save_roles(load(site), {"psql2server": ["postgres_replica"]}) is None
    assert save_roles(load(site), {}) is None
    assert list(site.parent.iterdir()) == [site]


def test_save_roles_replaces_a_stale_file_as_a_whole(site):
    path = write_roles(site, "# hand-written\nhosts:\n  r1server: [postgres_replica]\n")
    save_roles(load(site), {"r1server": ["postgres_replica", "backup"]})
    assert yaml.safe_load(path.read_text()) == {"hosts": {"r1server": ["postgres_replica", "backup"]}}
    assert "hand-written" not in path.read_text()


# --- retired hosts (a host replaced by the spare) -------------------------------------------------


def test_a_retired_host_is_left_out_and_kept_aside(site):
    write_roles(site, "hosts:\n  r1server: [ejabberd]\nretired: [e2server]\n")
    inv = load(site)
    assert "e2server" not in inv.hosts and inv.with_role("ejabberd") == ["e1server", "r1server"]
    assert set(inv.retired) == {"e2server"} and inv.retired["e2server"]["roles"] == ["ejabberd"]
    assert inv.overridden == {"r1server": ["spare"]}


@pytest.mark.parametrize("text,where,what", [
    ("retired: [ghost]\n", "retired.0", "'ghost' is not a host of the inventory"),
    ("hosts:\n  r1server: [ejabberd]\nretired: [r1server]\n", "retired.0", "r1server is retired and has roles"),
], ids=["unknown host", "retired with roles"])
def test_a_wrong_retired_entry_is_refused_naming_the_roles_file(site, text, where, what):
    path = write_roles(site, text)
    err = refused(site)
    assert err.path == str(path)
    [(loc, msg)] = err.problems
    assert loc == where and what in msg


def test_save_roles_records_a_retired_host_and_keeps_it(site):
    path = save_roles(load(site), {"r1server": ["ejabberd"]}, retire=["e2server"])
    assert yaml.safe_load(path.read_text()) == {"hosts": {"r1server": ["ejabberd"]}, "retired": ["e2server"]}
    inv = load(site)
    assert "e2server" not in inv.hosts
    # a later change keeps the retired host out
    save_roles(inv, {"psql1server": ["postgres_replica"], "psql2server": ["postgres_primary"]})
    again = load(site)
    assert "e2server" not in again.hosts and topology.pg_primary(again) == "psql2server"


@pytest.mark.parametrize("hosts", ["5", "[{a: 1}]"], ids=["a number", "a list of mappings"])
def test_a_broken_hosts_section_is_the_inventorys_error_even_with_a_roles_file(tmp_path, hosts):
    site = tmp_path / "lab.yml"
    site.write_text(f"site: {{name: lab, domain: lab.test}}\nhosts: {hosts}\n")
    write_roles(site, SWAP)
    with pytest.raises(InventoryError, match="hosts: Input should be a valid dictionary"):
        load(site)
