"""Cluster tier decisions over canned evidence: the desired resource tree from
each inventory, the CIB parsed, the commands a difference needs (none when
converged, never a delete), Debian's default corosync.conf recognised, the
standby guard's view of crm_mon, the fence_lab agent's protocol, and the steps
on recording hosts (facts in, commands out; none when converged)."""

from __future__ import annotations

import importlib.machinery
import importlib.util
import io
import os
import shutil
import socket
import subprocess
import tempfile
import threading
from pathlib import Path

import pytest

from fabfile import cluster
from fabfile.core import HostFailed, Result, UserError, templates, topology
from fabfile.core.inventory import load
from fabfile.core.secrets import Secrets
from fabfile.core.tasks import PROJECT_ROOT
from fabfile.core.testing import RecordingRun, files_present, packages_present
from fabfile.lab import fence
from tests.unit.shipped import INVENTORIES

LAB = load(PROJECT_ROOT / "inventory/lab.yml")
CIB = (Path(__file__).parent / "cluster_cib.xml").read_text()  # captured from a converged lab cluster


def _with_mail(inv, **changes):
    return inv.model_copy(update={"mail": inv.mail.model_copy(update=changes)})


def _load_agent():
    path = PROJECT_ROOT / "configs/cluster/usr/sbin/fence_lab"
    loader = importlib.machinery.SourceFileLoader("fence_lab_agent", str(path))
    spec = importlib.util.spec_from_loader("fence_lab_agent", loader)
    mod = importlib.util.module_from_spec(spec)
    loader.exec_module(mod)
    return mod


AGENT = _load_agent()


# --- the tree ----------------------------------------------------------------


def test_lab_tree_without_storage():
    t = cluster.desired_tree(LAB)
    assert t.groups == {"mail": ["virtual_ip", "postfix", "dovecot"], "dbproxy": ["dbproxy_ip", "haproxy"]}
    ids = {p.id: p for p in t.primitives}
    assert ids["virtual_ip"].params == (("ip", "10.200.11.110"), ("cidr_netmask", "24"))
    assert ids["postfix"].agent == "systemd:postfix@-" and ids["postfix"].unit == "postfix@-"
    assert ids["haproxy"].agent == "systemd:haproxy"
    assert not t.promotable and not t.colocations and not t.orders
    assert [s.agent for s in t.stonith] == ["stonith:fence_lab"]
    assert dict(t.stonith[0].params)["pcmk_host_list"] == "postfix01,postfix02,postfix03"


def test_drbd_tree_puts_storage_under_the_group():
    t = cluster.desired_tree(_with_mail(LAB, storage="drbd", db_proxy="proxysql"))
    assert t.groups["mail"] == ["DrbdFS", "PostfixSpool", "virtual_ip", "postfix", "dovecot"]
    assert t.groups["dbproxy"] == ["dbproxy_ip", "proxysql"]
    assert t.promotable == {"DrbdData": "DrbdData-clone"}
    assert t.colocations == [("mail", "DrbdData-clone", "Promoted")]
    assert t.orders == [("DrbdData-clone", "promote", "mail", "start")]
    cmds = [c for c, _ in cluster.plan_changes(t, cluster.Actual(), {}, 3)]
    assert cmds[0] == ("pcs resource create DrbdData ocf:linbit:drbd drbd_resource=mail unfence_if_all_uptodate=true "
                       "op monitor interval=29s role=Promoted op monitor interval=31s role=Unpromoted promotable "
                       "promoted-max=1 promoted-node-max=1 clone-max=2 clone-node-max=1 notify=true")
    # DrbdFS first in the mail group, which runs with the promoted clone, after its promotion
    assert cmds[1].startswith("pcs resource create DrbdFS ocf:heartbeat:Filesystem device=/dev/drbd0 "
                              "directory=/var/vmail fstype=ext4 ")
    assert cmds[1].endswith(" --group mail")
    # postfix's queue on the store: what it acknowledged moves with the group
    assert cmds[2].startswith("pcs resource create PostfixSpool ocf:heartbeat:Filesystem "
                              "device=/var/vmail/postfix-spool directory=/var/spool/postfix fstype=none options=bind ")
    assert "pcs constraint colocation add mail with Promoted DrbdData-clone INFINITY" in cmds
    assert "pcs constraint order promote DrbdData-clone then start mail" in cmds


def test_drbd_clone_max_follows_the_drbd_version():
    """8.4: one instance on each of the two nodes of the resource; 9: one on every back end."""
    def create(version, n_nodes=3):
        t = cluster.desired_tree(_with_mail(LAB, storage="drbd", drbd_version=version))
        return next(c for c, _ in cluster.plan_changes(t, cluster.Actual(), {}, n_nodes) if "DrbdData " in c)
    assert "promoted-max=1 promoted-node-max=1 clone-max=2 clone-node-max=1 notify=true" in create(8)
    assert "promoted-max=1 promoted-node-max=1 clone-max=3 clone-node-max=1 notify=true" in create(9)


def test_drbd_resource_gets_the_unfence_parameter_when_it_lacks_it():
    """A DrbdData created before unfence_if_all_uptodate is updated in place, not recreated."""
    t = cluster.desired_tree(_with_mail(LAB, storage="drbd"))
    old = cluster.Actual(primitives={"DrbdData": cluster.Primitive(
        "DrbdData", "ocf:linbit:drbd", (("drbd_resource", "mail"),))})
    cmds = [c for c, _ in cluster.plan_changes(t, old, {}, 2)]
    assert "pcs resource update DrbdData unfence_if_all_uptodate=true" in cmds
    assert not any(c.startswith("pcs resource create DrbdData ") for c in cmds)


@pytest.mark.parametrize("inventory", INVENTORIES, ids=lambda p: p.name)
def test_every_shipped_inventory_has_a_tree(inventory, tmp_path):
    inv = load(inventory)
    if inv.mail is None:
        assert cluster.desired_tree(inv).primitives == []
        return
    secrets = Secrets(tmp_path / "s.yml")
    for name in ("fence_virsh_ip", "fence_virsh_username", "fence_virsh_password", "fence_vbox_ip",
                 "fence_vbox_username", "fence_vbox_password", "fence_ipmilan_username", "fence_ipmilan_password",
                 *(f"fence_ipmilan_ip_{n}" for n in topology.cluster_nodes(inv))):
        secrets.get(name)
    t = cluster.desired_tree(inv, secrets.require)
    assert t.groups["mail"][-3:] == ["virtual_ip", "postfix", "dovecot"]
    assert t.stonith or inv.mail.fence_agent == "none"


def test_real_fence_agent_needs_its_credentials(tmp_path):
    inv = _with_mail(LAB, fence_agent="fence_virsh")
    with pytest.raises(UserError, match="missing secret 'fence_virsh_username'.*fence_virsh credentials"):
        cluster.desired_tree(inv, Secrets(tmp_path / "s.yml").require)
    secrets = Secrets(tmp_path / "s.yml")
    for k, v in (("fence_virsh_ip", "192.0.2.1"), ("fence_virsh_username", "fencer"),
                 ("fence_virsh_password", "pw-123456789")):
        secrets.get(k, lambda v=v: v)
    (dev,) = cluster.fence_devices(inv, secrets.require)
    assert dev.agent == "stonith:fence_virsh"
    assert dict(dev.params) == {"ip": "192.0.2.1", "username": "fencer", "password": "pw-123456789",
                                "pcmk_host_list": "postfix01,postfix02,postfix03", "secure": "1"}


def test_ipmilan_has_one_device_per_node(tmp_path):
    inv = _with_mail(LAB, fence_agent="fence_ipmilan")
    secrets = Secrets(tmp_path / "s.yml")
    devs = cluster.fence_devices(inv, lambda n, h="": secrets.get(n))
    assert [d.id for d in devs] == ["fence_postfix01", "fence_postfix02", "fence_postfix03"]
    assert dict(devs[1].params)["pcmk_host_list"] == "postfix02"


# --- the CIB and the difference ------------------------------------------------


def test_parse_cib_of_a_converged_cluster():
    a = cluster.parse_cib(CIB)
    assert a.groups == {"mail": ["virtual_ip", "postfix", "dovecot"], "dbproxy": ["dbproxy_ip", "haproxy"]}
    assert a.primitives["postfix"].agent == "systemd:postfix@-"
    assert a.primitives["fence_lab"].agent == "stonith:fence_lab"
    assert a.properties["crm_config"]["stonith-enabled"] == "true"
    assert a.properties["rsc_defaults"]["resource-stickiness"] == "100"


def test_converged_cib_needs_no_command():
    changes = cluster.plan_changes(cluster.desired_tree(LAB), cluster.parse_cib(CIB),
                                   cluster.desired_properties(LAB), 3)
    assert changes == []


def test_empty_cib_creates_everything_in_group_order():
    cmds = [c for c, _ in cluster.plan_changes(cluster.desired_tree(LAB), cluster.Actual(),
                                                cluster.desired_properties(LAB), 3)]
    assert cmds[:5] == [
        "crm_attribute --type crm_config --name stonith-enabled --update true",
        "crm_attribute --type crm_config --name stonith-action --update off",
        "crm_attribute --type crm_config --name no-quorum-policy --update stop",
        "crm_attribute --type rsc_defaults --name resource-stickiness --update 100",
        "crm_attribute --type op_defaults --name timeout --update 60s",
    ]
    assert cmds[5] == ("pcs resource create virtual_ip ocf:heartbeat:IPaddr2 ip=10.200.11.110 cidr_netmask=24 "
                       "op monitor interval=30s op start timeout=60s op stop timeout=60s --group mail")
    assert cmds[6] == "pcs resource create postfix systemd:postfix@- op monitor interval=30s --group mail"
    assert cmds[-1] == ("pcs stonith create fence_lab fence_lab pcmk_host_list=postfix01,postfix02,postfix03 "
                        "op monitor interval=60s")
    assert not any("delete" in c for c in cmds)


def test_changed_vip_is_updated_in_place_and_missing_member_is_placed():
    cib = CIB.replace('value="10.200.11.110"', 'value="10.200.11.99"')
    start = cib.index('<primitive id="postfix"')
    cib = cib[:start] + cib[cib.index("</primitive>", start) + len("</primitive>"):]
    changes = cluster.plan_changes(cluster.desired_tree(LAB), cluster.parse_cib(cib),
                                   cluster.desired_properties(LAB), 3)
    assert [c for c, _ in changes] == [
        "pcs resource update virtual_ip ip=10.200.11.110",
        "pcs resource create postfix systemd:postfix@- op monitor interval=30s --group mail --after virtual_ip",
    ]


def test_other_agent_under_our_name_is_refused_not_recreated():
    cib = CIB.replace('<primitive id="dovecot" class="systemd" type="dovecot">',
                      '<primitive id="dovecot" class="lsb" type="dovecot">')
    with pytest.raises(UserError, match="dovecot is lsb:dovecot.*refusing to delete and recreate"):
        cluster.plan_changes(cluster.desired_tree(LAB), cluster.parse_cib(cib), {}, 3)


# --- corosync.conf, crm_mon ----------------------------------------------------


DEBIAN_DEFAULT = """totem {
\tversion: 2
\tcluster_name: debian
}
nodelist {
\tnode {
\t\tname: node1
\t\tnodeid: 1
\t\tring0_addr: 127.0.0.1
\t}
}
"""


def test_debian_default_corosync_conf_is_recognised():
    ours = ["postfix01", "postfix02", "10.200.11.113"]
    assert cluster.is_standalone_default(DEBIAN_DEFAULT, ours)
    other = DEBIAN_DEFAULT.replace("name: node1", "name: postfix01")
    assert not cluster.is_standalone_default(other, ours)


CRM_MON = """<pacemaker-result api-version="2.30" request="crm_mon --output-as=xml">
  <nodes>
    <node name="postfix01" id="1" online="true" standby="false" type="member"/>
    <node name="postfix02" id="2" online="true" standby="true" type="member"/>
    <node name="postfix03" id="3" online="false" standby="false" type="member"/>
  </nodes>
  <resources><resource id="virtual_ip" role="Started" active="true"><node name="postfix01" id="1"/></resource></resources>
</pacemaker-result>"""


def test_online_nodes_exclude_standby_offline_and_resource_entries():
    assert cluster.online_nodes(CRM_MON) == ["postfix01"]


def test_ring_addresses_on_the_mail_network():
    assert [topology.ring_address(LAB, n) for n in topology.cluster_nodes(LAB)] == \
        ["10.200.11.113", "10.200.11.114", "10.200.11.115"]
    assert cluster.cluster_name(LAB) == "lab-mail"


# --- fence_lab: the agent's option parsing and the listener's checks ------------


def test_agent_parses_fencer_stdin():
    opts = AGENT.options([], "action=off\nport=postfix02\nnodename=postfix02\n# c\n\nipaddr=10.200.0.1\n",
                         {"ipport": "1229", "password": "s3cret"})
    assert opts["action"] == "off" and opts["plug"] == "postfix02"
    assert opts["ip"] == "10.200.0.1" and opts["ipport"] == "1229" and opts["password"] == "s3cret"


def test_agent_parses_command_line_over_stdin_and_conf():
    opts = AGENT.options(["-o", "status", "-n", "postfix03", "--ip=10.1.1.1"], None, {"ip": "10.9.9.9"})
    assert (opts["action"], opts["plug"], opts["ip"]) == ("status", "postfix03", "10.1.1.1")
    with pytest.raises(AGENT.FenceError):
        AGENT.parse_argv(["--bogus"])
    assert AGENT.options([], "nodename=postfix01\n", {})["plug"] == "postfix01"
    assert AGENT.options([], "", {})["action"] == "reboot"  # Pacemaker's default action


def test_agent_metadata_lists_standard_actions():
    out = io.StringIO()
    assert AGENT.run({"action": "metadata"}, out) == 0
    import xml.etree.ElementTree as ET

    root = ET.fromstring(out.getvalue())
    actions = {a.get("name") for a in root.iter("action")}
    assert {"on", "off", "reboot", "status", "monitor", "list", "metadata"} <= actions
    assert {p.get("name") for p in root.iter("parameter")} >= {"plug", "port", "ip", "ipport", "password"}


def test_agent_metadata_needs_no_config_it_cannot_read():
    """pacemaker-controld asks for `metadata` as hacluster; the config is root's, mode 0600."""
    with tempfile.TemporaryDirectory() as folder:
        folder = Path(folder)
        folder.chmod(0o755)
        agent = folder / "fence_lab"
        shutil.copy(PROJECT_ROOT / "configs/cluster/usr/sbin/fence_lab", agent)
        agent.chmod(0o755)
        conf = folder / "fence_lab.conf"
        conf.write_text("ip=10.200.0.1\npassword=k\n")
        conf.chmod(0o600 if os.geteuid() == 0 else 0o000)  # root reads any mode: it runs the agent as nobody
        as_other = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups"] if os.geteuid() == 0 else []
        code = ("import importlib.machinery as m, sys; a = m.SourceFileLoader('a', sys.argv[1]).load_module(); "
                "sys.exit(a.main(sys.argv[3:], None, sys.argv[2]))")

        def agent_run(*args):
            return subprocess.run([*as_other, "/usr/bin/python3", "-c", code, str(agent), str(conf), *args],
                                  capture_output=True, text=True, stdin=subprocess.DEVNULL, timeout=30)

        meta = agent_run("-o", "metadata")
        assert meta.returncode == 0 and '<resource-agent name="fence_lab"' in meta.stdout, meta.stderr
        status = agent_run("-o", "status", "-n", "postfix01")
        assert status.returncode == 1 and "Permission denied" in status.stderr, status.stderr


def test_agent_and_listener_agree_on_the_signature():
    assert AGENT.sign("k", "n1", "off", "h") == fence.sign("k", "n1", "off", "h")
    hosts = {"postfix01": None}
    good = f"off postfix01 {fence.sign('k', 'n1', 'off', 'postfix01')}"
    assert fence.check_request(good, "n1", "k", hosts) == ("off", "postfix01")
    with pytest.raises(ValueError, match="bad signature"):
        fence.check_request(good, "n2", "k", hosts)  # replayed against a new nonce
    with pytest.raises(ValueError, match="not a host of this lab"):
        fence.check_request(f"off pxc9 {fence.sign('k', 'n1', 'off', 'pxc9')}", "n1", "k", hosts)
    with pytest.raises(ValueError, match="unknown action"):
        fence.check_request(f"rm postfix01 {fence.sign('k', 'n1', 'rm', 'postfix01')}", "n1", "k", hosts)


def test_agent_talks_to_a_listener(monkeypatch):
    """The agent against a stand-in listener on loopback: off then status until off."""
    state = {"postfix02": "on"}
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen()
    port = srv.getsockname()[1]

    def serve():
        for _ in range(3):
            conn, _ = srv.accept()
            with conn, conn.makefile("rw") as f:
                f.write("fence_lab 1 abc\n")
                f.flush()
                action, host, _mac = fence.check_request(f.readline(), "abc", "k", state) + ("",)
                if action == "off":
                    state[host] = "off"
                f.write(f"ok {state[host]}\n")
                f.flush()

    t = threading.Thread(target=serve, daemon=True)
    t.start()
    out = io.StringIO()
    opts = {"action": "off", "plug": "postfix02", "ip": "127.0.0.1", "ipport": str(port), "password": "k"}
    assert AGENT.run(opts, out) == 0
    assert "Powered OFF" in out.getvalue() and state["postfix02"] == "off"
    assert AGENT.run({**opts, "action": "status"}, io.StringIO()) == 2
    t.join(5)
    srv.close()


# --- the steps on recording hosts ------------------------------------------------------

SECRET = Secrets(Path("/nonexistent/secrets.yml"), persist=False).get
NODES = topology.cluster_nodes(LAB)
UPLOAD = (r"^(mkdir -p |chown |mv -f |cp -a |rm -f )", Result())
RUNNING = [(r"^systemctl is-enabled", Result(stdout="enabled\n")), (r"^systemctl is-(active|enabled) -q", Result()),
           (r"^systemctl is-active", Result())]


def recording(answers=None, check=False):
    run = RecordingRun(LAB, answers={**(answers or {}), "*": [*(answers or {}).get("*", []), UPLOAD]}, check=check)
    run.secrets.get = lambda name, *a: SECRET(name)
    return run


def test_fence_lab_conf_template():
    v = cluster.template_vars(LAB, "postfix01", SECRET)
    text = templates.render("cluster/etc/hastack/fence_lab.conf.j2", LAB, "postfix01", SECRET, **v)
    assert text.startswith("# Managed by hastack (configs/cluster/etc/hastack/fence_lab.conf.j2)")
    conf = dict(line.split("=", 1) for line in text.splitlines() if line and not line.startswith("#"))
    assert conf == {"ip": "10.200.0.1", "ipport": str(topology.FENCE_LAB_PORT),
                    "password": SECRET(topology.FENCE_LAB_SECRET)}


def test_node_setup_already_converged_runs_no_command():
    conf = templates.render("cluster/etc/hastack/fence_lab.conf.j2", LAB, "postfix01", SECRET,
                            **cluster.template_vars(LAB, "postfix01", SECRET))
    run = recording({"postfix01": [
        packages_present(*cluster.PACKAGES, *cluster.MAIL_PACKAGES),
        (r"^python3 -W ignore -c 'import crypt", Result()),
        files_present({cluster.FENCE_LAB: ("root:root:755", templates.static("cluster/usr/sbin/fence_lab")),
                       cluster.FENCE_LAB_CONF: ("root:root:600", conf), "/etc/hastack": ("root:root:755", None)}),
        *RUNNING]})
    cluster.node_setup(run.session("postfix01"))
    assert run.session("postfix01").changes == []


def test_node_setup_on_a_fresh_node_preseeds_postfix_and_puts_the_fence_agent():
    run = recording()
    h = run.session("postfix01")
    cluster.node_setup(h)
    assert ("debconf-set-selections", "postfix postfix/main_mailer_type select Internet Site\n"
            "postfix postfix/mailname string lab.test\n") in h.stdins
    assert ("chpasswd", f"hacluster:{SECRET('hacluster_password')}\n") in h.stdins
    assert h.uploads[cluster.FENCE_LAB + ".hastack-new"] == templates.static("cluster/usr/sbin/fence_lab")
    assert "password=" + SECRET("fence_lab_secret") in h.uploads[cluster.FENCE_LAB_CONF + ".hastack-new"]
    assert not any(SECRET("hacluster_password") in c for c in h.commands)


def _cib(xml=CIB):
    return (r"^cibadmin --query --scope configuration$", Result(stdout=xml))


def test_properties_and_resources_on_a_converged_cib_run_no_command():
    run = recording({"postfix01": [_cib()]})
    h = run.session("postfix01")
    cib = {}
    cluster._properties(h, cib)
    cluster._resources(h, cluster.desired_tree(LAB), cib["postfix01"])
    assert h.changes == []


def test_resources_on_an_empty_cib_create_the_tree_and_wait_for_it_to_settle():
    run = recording()
    h = run.session("postfix01")
    cluster._resources(h, cluster.desired_tree(LAB), cluster.Actual())
    # one transaction: a copy of the CIB, every change made in it, pushed as one diff
    assert h.changes[0] == "pcs cluster cib /run/hastack-cib.xml && cp /run/hastack-cib.xml /run/hastack-cib.xml.orig"
    assert h.changes[1].startswith("pcs -f /run/hastack-cib.xml resource create virtual_ip ocf:heartbeat:IPaddr2")
    assert all(c.startswith("pcs -f /run/hastack-cib.xml ") for c in h.changes[1:-2])
    assert h.changes[-2] == ("pcs cluster cib-push /run/hastack-cib.xml diff-against=/run/hastack-cib.xml.orig "
                             "&& rm -f /run/hastack-cib.xml /run/hastack-cib.xml.orig")
    assert h.changes[-1] == "crm_resource --wait --timeout=180"


def test_unreadable_cib_fails_after_the_deadline(monkeypatch):
    monkeypatch.setattr(cluster, "CIB_TIMEOUT", 0)
    run = recording({"postfix01": [(r"^cibadmin", Result(stderr="Connection to cluster failed", exited=102))]})
    with pytest.raises(HostFailed, match="the CIB .* not reached after 0s .*Connection to cluster failed"):
        cluster._read_cib(run.session("postfix01"))
    assert cluster._read_cib(recording(check=True).session("postfix01")) == cluster.Actual()


def test_owned_units_already_disabled_run_no_command():
    run = recording({"postfix01": [(r"^systemctl is-enabled", Result(stdout="disabled\n"))]})
    cluster._owned_units(run.session("postfix01"), cluster.desired_tree(LAB), cluster.parse_cib(CIB))
    assert run.session("postfix01").changes == []


def test_owned_units_before_their_resource_are_stopped_and_disabled():
    run = recording({"postfix01": RUNNING})
    cluster._owned_units(run.session("postfix01"), cluster.desired_tree(LAB), cluster.Actual())
    assert run.session("postfix01").changes == [
        "systemctl disable --now postfix@-", "systemctl disable --now dovecot", "systemctl disable --now haproxy",
        "systemctl disable postfix"]


def test_formed_running_cluster_runs_no_command():
    run = recording()
    state = {n: {"formed": True, "running": True, "enabled": True} for n in NODES}
    cluster._form(run.session("postfix01"), state)
    assert run.session("postfix01").changes == []


def test_formation_authenticates_with_the_password_on_stdin_and_sets_up_on_ring_addresses():
    run = recording()
    state = {n: {"formed": False, "running": False, "enabled": False} for n in NODES}
    h = run.session("postfix01")
    cluster._form(h, state)
    addrs = " ".join(f"{n} addr={topology.ring_address(LAB, n)}" for n in NODES)
    assert h.changes == [f'pcs host auth {addrs} -u hacluster -p "$(cat)"',
                         f"pcs cluster setup lab-mail {addrs} --start --enable --wait=180"]
    assert h.stdins[0][1] == SECRET("hacluster_password")


def _standby(node, on, answers):
    run = recording({"*": [(r"^crm_mon -1 >/dev/null$", Result()), *answers]})
    (cluster.standby if on else cluster.unstandby).body.runbook(run, node)
    return run


def test_standby_moves_an_online_node_and_refuses_an_unknown_one_before_connecting():
    run = _standby("postfix02", True, [(r"^crm_mon -1 --output-as=xml$", Result(stdout=CRM_MON.replace(
        'name="postfix02" id="2" online="true" standby="true"', 'name="postfix02" id="2" online="true" standby="false"')))])
    assert run.session("postfix01").changes == ["pcs node standby postfix02 --wait=120"]
    run = recording({"*": [(r"^crm_mon -1 >/dev/null$", Result()), (r"^crm_mon -1 --output-as=xml$", Result(
        stdout=CRM_MON.replace('name="postfix02" id="2" online="true" standby="true"',
                               'name="postfix02" id="2" online="true" standby="false"')))]})
    cluster.standby.body.runbook(run, "postfix02", "600")
    assert run.session("postfix01").changes == ["pcs node standby postfix02 --wait=600"]
    for bad in ("0", "3601", "1;id", "-5", "abc"):
        run = recording()
        with pytest.raises(UserError, match="--wait must be a whole number of seconds"):
            cluster.standby.body.runbook(run, "postfix02", bad)
        assert run.connected == []
    for bad in ("postfix02;reboot", "$(id)", "pxc1"):
        run = recording()
        with pytest.raises(UserError, match="is not a cluster node"):
            cluster.standby.body.runbook(run, bad)
        assert run.connected == []


def test_standby_already_in_standby_and_unstandby_of_an_online_node_run_no_command():
    run = _standby("postfix02", True, [(r"^crm_mon -1 --output-as=xml$", Result(stdout=CRM_MON))])
    assert run.session("postfix01").changes == []
    run = _standby("postfix01", False, [(r"^crm_mon -1 --output-as=xml$", Result(stdout=CRM_MON)),
                                        (r"^crm_attribute --node postfix01 --name standby", Result(stdout="off\n"))])
    assert run.session("postfix01").changes == []


def test_no_cluster_node_answering_is_a_clear_error():
    run = recording()
    with pytest.raises(UserError, match="no cluster node .* answers"):
        cluster.status.body.runbook(run)
