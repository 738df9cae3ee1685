"""keepalived tier without hosts: keepalived.conf for every VIP holder of every
shipped inventory (one instance per VIP the host serves: unicast peers, VIP,
password length, track script), the check scripts, router ids, which hosts a
converge of one VIP touches, `keepalived.status`, and `--vip` refused when it
names no VIP; the configs are checked with `keepalived -t` when the machine has
keepalived (and root)."""

from __future__ import annotations

import copy
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml
from invoke import Program

import tasks
from fabfile import keepalived
from fabfile.core import Result, UserError, remote, templates
from fabfile.core.inventory import load, parse
from fabfile.core.testing import RecordingRun, files_present
from tests.unit.shipped import INVENTORIES

ROOT = Path(__file__).resolve().parents[2]
LAB = ROOT / "inventory/lab.yml"
CONF = "keepalived/etc/keepalived/keepalived.conf.j2"
CHECK = "keepalived/usr/local/lib/hastack/check-ejabberd.j2"
CHECK_WEBMAIL = "keepalived/usr/local/lib/hastack/check-webmail.j2"
SECRETS = {"keepalived_xmpp_auth": "abcdefghijklmnop", "keepalived_webmail_auth": "qrstuvwxyzABCDEF"}


def secret(name):
    return SECRETS[name]


def render(name, inv, host, nics=None, **extra):
    tvars = keepalived.template_vars(inv, host, secret)
    if nics:
        tvars = keepalived.with_interfaces(tvars, nics)
    return templates.render(name, inv, host, secret, **tvars, **extra)


def lab_data() -> dict:
    return yaml.safe_load(LAB.read_text())


def both_roles_data() -> dict:
    """The lab with e1server and e2server also webmail hosts (addresses on the mail network)."""
    data = lab_data()
    for host, addr in (("e1server", "10.200.11.131"), ("e2server", "10.200.11.132")):
        data["hosts"][host]["roles"] = ["ejabberd", "webmail"]
        data["hosts"][host]["addresses"]["mail"] = addr
    return data


def inventory(data: dict):
    return parse(yaml.safe_dump(data, sort_keys=False), "site.yml")


@pytest.fixture(scope="module")
def lab():
    return load(LAB)


@pytest.fixture(scope="module")
def both():
    return inventory(both_roles_data())


def instances(text: str) -> dict[str, str]:
    """vrrp_instance name -> its block."""
    return dict(re.findall(r"^vrrp_instance (\w+) \{\n(.*?)^\}\n", text, re.M | re.S))


# --- the config of every holder of every shipped inventory ---------------------------------------


@pytest.mark.parametrize("inventory_file", INVENTORIES, ids=lambda p: p.name)
@pytest.mark.parametrize("name, script", [("xmpp", "chk_ejabberd"), ("webmail", "chk_webmail")])
def test_each_node_peers_with_the_others_by_unicast(inventory_file, name, script):
    inv = load(inventory_file)
    if name not in inv.vips:
        pytest.skip(f"no {name} VIP")
    vip = inv.vips[name]
    holders = inv.with_role(vip.role)
    assert holders
    for host in holders:
        block = instances(render(CONF, inv, host))[name]
        me = str(inv.hosts[host].addresses[vip.network])
        assert f"unicast_src_ip {me}\n" in block
        for other in holders:
            addr = str(inv.hosts[other].addresses[vip.network])
            assert (f"        {addr}\n" in block) == (other != host)
        assert f"{vip.address}/{inv.networks[vip.network].cidr.prefixlen} dev {vip.network}\n" in block
        assert f"auth_pass {SECRETS[keepalived.VIPS[name].secret][:8]}\n" in block  # VRRP PASS auth: 8 characters
        assert f"        {script}\n" in block and "nopreempt" in block and "state BACKUP" in block


def test_a_webmail_host_gets_the_webmail_instance_only(lab):
    text = render(CONF, lab, "ngx01")
    assert list(instances(text)) == ["webmail"]
    block = instances(text)["webmail"]
    assert "virtual_router_id 101\n" in block and "priority 150\n" in block
    assert "unicast_src_ip 10.200.11.111\n" in block and "        10.200.11.112\n" in block
    assert "10.200.11.100/24 dev mail\n" in block and "auth_pass qrstuvwx\n" in block
    assert 'vrrp_script chk_webmail {\n    script "/usr/local/lib/hastack/check-webmail"\n' in text
    assert "ejabberd" not in text and "10.200.1.4" not in text
    assert "priority 140\n" in render(CONF, lab, "ngx02")


def test_an_ejabberd_host_config_is_what_it_was(lab):
    """The xmpp VIP's config before webmail joined the tier, byte for byte: a
    converged ejabberd node sees no change and keepalived is not reloaded."""
    assert render(CONF, lab, "e1server", {"xmpp": "eth1"}) == f"""\
# Managed by hastack (configs/{CONF}): local edits are overwritten on the next deploy.
# keepalived on e1server: the xmpp VIP 10.200.1.4/29 follows a running ejabberd.

global_defs {{
    router_id e1server
    enable_script_security
    script_user root
}}

vrrp_script chk_ejabberd {{
    script "/usr/local/lib/hastack/check-ejabberd"
    interval 2
    timeout 3
    fall 2
    rise 2
}}

vrrp_instance xmpp {{
    # Every node starts as BACKUP; the highest priority wins the first
    # election, and nopreempt keeps a returning node from taking the VIP back.
    state BACKUP
    nopreempt
    interface eth1
    virtual_router_id 5
    priority 150
    advert_int 1

    unicast_src_ip 10.200.1.2
    unicast_peer {{
        10.200.1.3
    }}

    authentication {{
        auth_type PASS
        auth_pass abcdefgh
    }}

    virtual_ipaddress {{
        10.200.1.4/29 dev eth1
    }}

    track_script {{
        chk_ejabberd
    }}
}}
"""


def test_a_host_without_a_vip_role_gets_no_instance(lab):
    text = render(CONF, lab, "pxc1")
    assert instances(text) == {} and "vrrp_script" not in text


def test_a_host_with_both_roles_gets_both_instances_with_distinct_router_ids(both):
    text = render(CONF, both, "e1server", {"xmpp": "dmz0", "webmail": "mail0"})
    blocks = instances(text)
    assert list(blocks) == ["xmpp", "webmail"]
    ids = [re.search(r"virtual_router_id (\d+)\n", b).group(1) for b in blocks.values()]
    assert ids == ["5", "101"]
    assert "vrrp_script chk_ejabberd {" in text and "vrrp_script chk_webmail {" in text
    assert "        chk_ejabberd\n" in blocks["xmpp"] and "        chk_webmail\n" in blocks["webmail"]
    # Each VIP on its own network's NIC, with that network's peers.
    assert "interface dmz0\n" in blocks["xmpp"] and "10.200.1.4/29 dev dmz0\n" in blocks["xmpp"]
    assert "interface mail0\n" in blocks["webmail"] and "10.200.11.100/24 dev mail0\n" in blocks["webmail"]
    assert "unicast_src_ip 10.200.1.2\n" in blocks["xmpp"] and "unicast_src_ip 10.200.11.131\n" in blocks["webmail"]
    assert re.findall(r"^        (\S+)$", blocks["xmpp"].split("unicast_peer {")[1].split("}")[0], re.M) == ["10.200.1.3"]
    assert re.findall(r"^        (\S+)$", blocks["webmail"].split("unicast_peer {")[1].split("}")[0], re.M) == [
        "10.200.11.111", "10.200.11.112", "10.200.11.132"]
    # Each VIP with its own password and its own priority order.
    assert "auth_pass abcdefgh\n" in blocks["xmpp"] and "auth_pass qrstuvwx\n" in blocks["webmail"]
    assert "priority 150\n" in blocks["xmpp"] and "priority 130\n" in blocks["webmail"]


# --- router ids, priorities, the table -----------------------------------------------------------


def test_priorities_descend_in_inventory_order(lab):
    assert [keepalived.priority(lab, "xmpp", h) for h in lab.with_role("ejabberd")] == [150, 140]
    assert [keepalived.priority(lab, "webmail", h) for h in lab.with_role("webmail")] == [150, 140]


def test_router_ids_are_in_range_stable_and_distinct(lab):
    ids = {name: keepalived.router_id(lab, name) for name in keepalived.VIPS}
    assert ids == {"xmpp": 5, "webmail": 101}  # xmpp's id is the one it always had
    assert all(1 <= i <= 255 for i in ids.values())
    assert keepalived.problems(lab) == []


def test_two_vips_of_one_network_sharing_a_router_id_are_refused():
    data = both_roles_data()
    data["networks"]["mail"]["cidr"] = "10.200.8.0/21"  # room for .100 twice
    data["vips"]["xmpp"] = {"address": "10.200.12.100", "network": "mail", "role": "ejabberd"}
    inv = inventory(data)
    with pytest.raises(UserError, match=r"vips\.xmpp \(10\.200\.12\.100\) and vips\.webmail \(10\.200\.11\.100\) "
                                        r"would share VRRP router id 101 on network mail"):
        keepalived.template_vars(inv, "ngx01", secret)
    run = RecordingRun(inv, secrets=SECRETS)
    with pytest.raises(UserError, match="router id 101"):
        keepalived.converge(run, vips=("webmail",))
    with pytest.raises(UserError, match="router id 101"):
        keepalived.preflight(run)
    assert run.connected == []
    # On different networks the same octet is fine.
    data["vips"]["xmpp"] = {"address": "10.200.1.4", "network": "dmz", "role": "ejabberd"}
    assert keepalived.problems(inventory(data)) == []


def test_a_vip_on_another_role_than_its_service_is_refused():
    data = lab_data()
    data["vips"]["webmail"]["role"] = "mail_backend"
    inv = inventory(data)
    assert any("vips.webmail.role is mail_backend" in p and "role webmail" in p for p in keepalived.problems(inv))
    with pytest.raises(UserError, match="vips.webmail.role"):
        keepalived.converge(RecordingRun(inv, secrets=SECRETS))


def test_generated_password_is_8_characters():
    pw = keepalived.vrrp_password()
    assert len(pw) == 8 and pw.isalnum() and pw != keepalived.vrrp_password()


def test_the_table_keeps_the_xmpp_secret_and_names_the_checks_after_their_paths():
    assert keepalived.VIPS["xmpp"].secret == "keepalived_xmpp_auth"
    assert keepalived.VIPS["webmail"].secret == "keepalived_webmail_auth"
    for v in keepalived.VIPS.values():
        assert (templates.CONFIGS / v.template).is_file()
        assert v.template == "keepalived" + v.check + ".j2"


def test_detected_interface_replaces_the_network_name(lab):
    text = render(CONF, lab, "e1server", {"xmpp": "eth1"})
    assert "interface eth1\n" in text and "dev eth1\n" in text and "interface dmz" not in text


# --- the check scripts ---------------------------------------------------------------------------


def test_check_script_tests_the_unit_and_the_c2s_port(lab):
    text = render(CHECK, lab, "e1server")
    assert text.startswith("#!/bin/sh\n")
    assert "systemctl is-active --quiet ejabberd.service" in text
    assert "nc -z -w 2 10.200.1.2 5222" in text


def test_webmail_check_tests_nginx_php_fpm_and_https_on_the_own_address(lab):
    text = render(CHECK_WEBMAIL, lab, "ngx02")
    assert text.startswith("#!/bin/sh\n")
    lines = [line for line in text.splitlines() if line and not line.startswith("#")]
    assert lines == ["systemctl is-active --quiet nginx.service || exit 1",
                     "systemctl is-active --quiet php8.2-fpm.service || exit 1",
                     "exec nc -z -w 2 10.200.11.112 443"]


@pytest.mark.parametrize("inventory_file", INVENTORIES, ids=lambda p: p.name)
def test_the_check_scripts_pass_sh_n(inventory_file, tmp_path):
    inv = load(inventory_file)
    for v in keepalived.served(inv):
        for host in keepalived.holders(inv, v.name):
            script = tmp_path / f"{host}-{v.name}"
            script.write_text(render(v.template, inv, host))
            out = subprocess.run(["sh", "-n", str(script)], capture_output=True, text=True)
            assert out.returncode == 0, f"{script.name}: {out.stderr}"


# --- keepalived's own checker --------------------------------------------------------------------

NEEDS_KEEPALIVED = pytest.mark.skipif(
    not shutil.which("keepalived") or not shutil.which("unshare") or os.geteuid() != 0,
    reason="needs keepalived and root (a network namespace with the host's NIC names)")


def keepalived_t(inv, host, tmp_path):
    """keepalived -t on ``host``'s config in a scratch network namespace with a NIC
    named like each network the host's VIPs are on; the track scripts as on the
    host, but in a scratch folder."""
    tmp_path.chmod(0o755)
    text = render(CONF, inv, host)
    nics = []
    for v in keepalived.vips_of(inv, host):
        script = tmp_path / v.check.rsplit("/", 1)[1]
        script.write_text("#!/bin/sh\nexit 0\n")
        script.chmod(0o755)
        text = text.replace(f'script "{v.check}"', f'script "{script}"')
        nics.append(inv.vips[v.name].network)
    conf = tmp_path / "keepalived.conf"
    conf.write_text(text)
    links = " && ".join(f"ip link add {n} type veth peer name {n}-peer && ip link set {n} up" for n in nics)
    out = subprocess.run(["unshare", "--net", "sh", "-c", f"{links} && keepalived -t -f {conf}"],
                         capture_output=True, text=True)
    assert out.returncode == 0, out.stdout + out.stderr
    return text


@NEEDS_KEEPALIVED
def test_keepalived_accepts_the_ejabberd_config(lab, tmp_path):
    keepalived_t(lab, "e1server", tmp_path)


@NEEDS_KEEPALIVED
def test_keepalived_accepts_the_webmail_config(lab, tmp_path):
    assert "vrrp_instance webmail {" in keepalived_t(lab, "ngx01", tmp_path)


@NEEDS_KEEPALIVED
def test_keepalived_accepts_the_config_of_a_host_with_both_vips(both, tmp_path):
    text = keepalived_t(both, "e2server", tmp_path)
    assert "vrrp_instance xmpp {" in text and "vrrp_instance webmail {" in text


# --- the runbook on the recording host -------------------------------------------------------


def nic_for(address: str, nic: str):
    return (rf"^ip -o -4 addr show to {re.escape(address)}/32$", Result(f"3: {nic}@if7    inet {address}/24 brd x\n"))


INTERFACE = nic_for("10.200.1.2", "eth1")
FILE_OPS = [(r"^(mkdir -p|chown|mv -f|rm -f|cp -a|sh -n|keepalived -t -f) ", Result())]
NICS = {"*": [nic_for(a, n) for a, n in (("10.200.1.2", "eth1"), ("10.200.1.3", "eth1"), ("10.200.11.111", "mail"),
                                          ("10.200.11.112", "mail"), ("10.200.11.131", "eth2"),
                                          ("10.200.11.132", "eth2"))] + FILE_OPS}


def test_a_fresh_node_gets_the_check_and_the_config_on_its_real_interface(lab):
    run = RecordingRun(lab, secrets=SECRETS, answers={"*": [INTERFACE, *FILE_OPS]})
    h = run.session("e1server")
    keepalived._keepalived(h)
    assert h.uploads[keepalived.CONFIG + ".hastack-new"] == render(CONF, lab, "e1server", {"xmpp": "eth1"})
    assert h.uploads["/usr/local/lib/hastack/check-ejabberd.hastack-new"] == render(CHECK, lab, "e1server")
    assert "/usr/local/lib/hastack/check-webmail.hastack-new" not in h.uploads
    assert "keepalived -t -f /etc/keepalived/keepalived.conf.hastack-new" in h.commands
    assert h.changes[-2:] == ["systemctl enable keepalived", "systemctl start keepalived"]


def test_a_fresh_webmail_node_gets_its_check_and_config(lab):
    run = RecordingRun(lab, secrets=SECRETS, answers=NICS)
    h = run.session("ngx01")
    keepalived._keepalived(h)
    assert h.uploads["/usr/local/lib/hastack/check-webmail.hastack-new"] == render(CHECK_WEBMAIL, lab, "ngx01")
    assert "sh -n /usr/local/lib/hastack/check-webmail.hastack-new" in h.commands
    assert h.uploads[keepalived.CONFIG + ".hastack-new"] == render(CONF, lab, "ngx01", {"webmail": "mail"})
    assert "/usr/local/lib/hastack/check-ejabberd.hastack-new" not in h.uploads


def converged(inv, host, nics):
    listed = "".join(f"{p} installed\n" for p in keepalived.PACKAGES)
    present = {"/usr/local/lib/hastack": ("root:root:755", None),
               keepalived.CONFIG: ("root:root:640", render(CONF, inv, host, nics))}
    for v in keepalived.vips_of(inv, host):
        present[v.check] = ("root:root:755", render(v.template, inv, host))
    return [(r"^dpkg-query", Result(listed)), files_present(present),
            (r"^systemctl is-enabled", Result("enabled\n")), (r"^systemctl is-active", Result("active\n"))]


@pytest.mark.parametrize("host, nics", [("e1server", {"xmpp": "eth1"}), ("ngx01", {"webmail": "mail"})])
def test_an_already_converged_node_changes_nothing(lab, host, nics):
    run = RecordingRun(lab, secrets=SECRETS, answers={"*": [*NICS["*"][:-1], *converged(lab, host, nics)]})
    h = run.session(host)
    keepalived._keepalived(h)
    assert h.changes == [] and h.uploads == {}


def test_converging_the_webmail_vip_touches_only_the_webmail_hosts(lab):
    run = RecordingRun(lab, secrets={}, answers=NICS)
    keepalived.converge(run, vips=("webmail",))
    assert sorted(set(run.connected)) == ["ngx01", "ngx02"]
    assert "keepalived_webmail_auth" in run.secrets and "keepalived_xmpp_auth" not in run.secrets
    assert len(run.secrets.get("keepalived_webmail_auth")) == 8
    for host in ("ngx01", "ngx02"):
        uploads = run.session(host).uploads
        assert set(uploads) == {keepalived.CONFIG + ".hastack-new", "/usr/local/lib/hastack/check-webmail.hastack-new"}
        assert list(instances(uploads[keepalived.CONFIG + ".hastack-new"])) == ["webmail"]


def test_converging_the_xmpp_vip_touches_only_the_ejabberd_hosts(lab):
    run = RecordingRun(lab, secrets=SECRETS, answers=NICS)
    keepalived.converge(run, vips=("xmpp",))
    assert sorted(set(run.connected)) == ["e1server", "e2server"]


def test_converging_every_vip_by_default(lab):
    run = RecordingRun(lab, secrets={}, answers=NICS)
    keepalived.converge(run)
    assert sorted(set(run.connected)) == ["e1server", "e2server", "ngx01", "ngx02"]
    assert "keepalived_webmail_auth" in run.secrets and "keepalived_xmpp_auth" in run.secrets


def test_converging_one_vip_keeps_the_other_on_a_host_with_both(both):
    run = RecordingRun(both, secrets={}, answers=NICS)
    keepalived.converge(run, vips=("xmpp",))
    assert sorted(set(run.connected)) == ["e1server", "e2server"]  # the ngx hosts do not hold xmpp
    h = run.session("e1server")
    conf = h.uploads[keepalived.CONFIG + ".hastack-new"]
    assert list(instances(conf)) == ["xmpp", "webmail"]
    assert "interface eth1\n" in instances(conf)["xmpp"] and "interface eth2\n" in instances(conf)["webmail"]
    assert {"/usr/local/lib/hastack/check-ejabberd.hastack-new",
            "/usr/local/lib/hastack/check-webmail.hastack-new"} <= set(h.uploads)
    assert "keepalived_webmail_auth" in run.secrets  # its config needs both passwords


def test_a_vip_the_inventory_lacks_is_nothing_to_do():
    data = lab_data()
    del data["vips"]["webmail"]
    run = RecordingRun(inventory(data), secrets=SECRETS, answers=NICS)
    keepalived.converge(run, vips=("webmail",))
    assert run.connected == [] and "no vips.webmail; nothing to do" in run.output


def test_converge_refuses_an_unknown_vip(lab):
    run = RecordingRun(lab, secrets=SECRETS)
    with pytest.raises(UserError, match=r"no VIP 'mail' \(known: xmpp, webmail\)"):
        keepalived.converge(run, vips=("webmail", "mail"))
    assert run.connected == []


def test_deploy_with_vip_converges_that_vip_only(lab):
    run = RecordingRun(lab, secrets=SECRETS, answers=NICS)
    keepalived.deploy.body.runbook(run, vip="webmail")
    assert sorted(set(run.connected)) == ["ngx01", "ngx02"]


# --- status ------------------------------------------------------------------------------------


def test_status_shows_each_vip_of_each_host(lab):
    holds = (r"^ip -o -4 addr show to 10\.200\.1\.4/32$", Result("3: eth1    inet 10.200.1.4/29 scope global\n"))
    active = (r"^systemctl is-active keepalived$", Result("active\n"))
    check_ok = (r"^/usr/local/lib/hastack/check-(ejabberd|webmail)$", Result())
    run = RecordingRun(lab, secrets=SECRETS, answers={"e1server": [holds], "*": [active, check_ok]})
    keepalived.status.body.runbook(run)
    assert run.session("e1server").reported("ok") == [
        "xmpp: keepalived active; chk_ejabberd check passes; holds the VIP 10.200.1.4"]
    assert run.session("e2server").reported("ok") == [
        "xmpp: keepalived active; chk_ejabberd check passes; does not hold the VIP 10.200.1.4"]
    assert run.session("ngx01").reported("ok") == [
        "webmail: keepalived active; chk_webmail check passes; does not hold the VIP 10.200.11.100"]
    assert "pxc1" not in run.connected


def test_status_of_a_host_with_both_vips_has_one_line_each(both):
    holds = (r"^ip -o -4 addr show to 10\.200\.11\.100/32$", Result("4: eth2    inet 10.200.11.100/24\n"))
    inactive = (r"^systemctl is-active keepalived$", Result("inactive\n", exited=3))
    run = RecordingRun(both, secrets=SECRETS, answers={"e2server": [holds, inactive]})
    keepalived.status.body.runbook(run)
    assert run.session("e2server").reported("ok") == [
        "xmpp: keepalived inactive; chk_ejabberd check FAILS; does not hold the VIP 10.200.1.4",
        "webmail: keepalived inactive; chk_webmail check FAILS; holds the VIP 10.200.11.100"]


def test_status_with_vip_shows_that_vip_only(both):
    run = RecordingRun(both, secrets=SECRETS)
    keepalived.status.body.runbook(run, vip="webmail")
    assert [m.split(":")[0] for m in run.session("e1server").reported("ok")] == ["webmail"]
    assert "ngx01" in run.connected


# --- bad input through the command line ----------------------------------------------------------


def _all_tasks(coll):
    yield from coll.tasks.values()
    for sub in coll.collections.values():
        yield from _all_tasks(sub)


@pytest.mark.parametrize("argv, expect", [
    (["keepalived.deploy", "--vip", "nosuch"], ["--vip 'nosuch'", "known: xmpp, webmail", "nothing was changed"]),
    (["keepalived.deploy", "--vip", ""], ["--vip ''", "known: xmpp, webmail"]),
    (["keepalived.deploy", "--vip", "mail"], ["--vip 'mail'", "known: xmpp, webmail"]),
    (["keepalived.status", "--vip", "xmpp;id"], ["--vip 'xmpp;id'", "known: xmpp, webmail"]),
    (["keepalived.deploy", "--vip", "webmail", "--check"], ["--vip webmail", "has no vips.webmail"]),
])
def test_bad_vip_is_refused_cleanly(argv, expect, tmp_path, monkeypatch, capsys):
    data = lab_data()
    if "webmail" in argv:
        del data["vips"]["webmail"]
    site = tmp_path / "site.yml"
    site.write_text(yaml.safe_dump(data, sort_keys=False))
    monkeypatch.setenv("INVOKE_INVENTORY", str(site))
    monkeypatch.delenv("INVOKE_CHECK", raising=False)
    tried = []

    def no_ssh(self, *a, **kw):
        tried.append(self.name)
        raise AssertionError(f"connection attempted to {self.name}")

    monkeypatch.setattr(remote.HostSession, "open", no_ssh)
    before = sorted(p.name for p in tmp_path.iterdir())
    helps = [(t, copy.copy(t.help)) for t in _all_tasks(tasks.ns)]  # invoke pops them while parsing
    try:
        with pytest.raises(SystemExit) as exited:
            Program(namespace=tasks.ns, name="hastack", binary="inv").run(["inv", *argv])
    finally:
        for task, help in helps:
            task.help = help
    out = capsys.readouterr()
    text = out.out + out.err
    assert exited.value.code == 1, text
    assert "Traceback" not in text, text
    for want in expect:
        assert want in text, f"{want!r} not in:\n{text}"
    assert tried == []
    assert sorted(p.name for p in tmp_path.iterdir()) == before  # no secrets file written


def test_vip_argument_is_documented():
    assert "vip" in keepalived.deploy.help and "xmpp, webmail" in keepalived.deploy.help["vip"]
