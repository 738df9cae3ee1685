"""Bad input, tried as an operator would: broken inventories, secrets files,
invoke configs, wrong task arguments. Every case must end with a non-zero exit,
no traceback, a message naming the file/key/host/argument and the problem,
no SSH connection attempted, no command run on this machine, and no file
changed beside the inventory.

The cases run through invoke's own Program (the `inv` command line) in this
process, so connections and local commands can be watched.
"""

from __future__ import annotations

import copy
import subprocess
from pathlib import Path

import pytest
import yaml
from invoke import Program

import tasks
from fabfile.core import remote
from tests.unit.test_inventory import _delete as delp
from tests.unit.test_inventory import _set as setp

ROOT = Path(__file__).resolve().parents[2]
LAB = yaml.safe_load((ROOT / "inventory/lab.yml").read_text())


def _inv(change=None) -> dict:
    data = copy.deepcopy(LAB)
    if change:
        change(data)
    return data


def rename_host(old: str, new: str):
    def change(data):
        data["hosts"] = {(new if k == old else k): v for k, v in data["hosts"].items()}
    return change


class Case:
    def __init__(self, id, argv, expect, *, inventory=None, raw=None, secrets=None, secrets_mode=0o600,
                 config=None, raw_config=None, stdin=None, env=None, roles=None):
        self.id, self.argv, self.expect = id, argv, expect if isinstance(expect, list) else [expect]
        self.inventory, self.raw, self.secrets, self.secrets_mode = inventory, raw, secrets, secrets_mode
        self.config, self.raw_config, self.stdin, self.env = config, raw_config, stdin, env or {}
        self.roles = roles  # bytes of the roles file beside the inventory (site.roles.yml)


DEPLOY = ["base.deploy", "--check"]
C: list[Case] = []


def inv_case(id, change, expect, argv=DEPLOY):
    C.append(Case(id, argv, expect, inventory=_inv(change)))


# --- broken inventories: the file -------------------------------------------------------
C += [
    Case("inventory missing", DEPLOY, ["nosuch.yml", "cannot read the inventory"], env={"INVOKE_INVENTORY": "{tmp}/nosuch.yml"}),
    Case("inventory is a directory", DEPLOY, ["cannot read the inventory"], env={"INVOKE_INVENTORY": "{tmp}"}),
    Case("inventory not UTF-8", DEPLOY, ["site.yml", "not UTF-8"], raw=b"site: {name: lab}\n\xff\xfe\n"),
    Case("inventory empty", DEPLOY, ["site.yml", "must be a YAML mapping"], raw=b""),
    Case("inventory a list", DEPLOY, ["site.yml", "must be a YAML mapping"], raw=b"- a\n- b\n"),
    Case("inventory a scalar", DEPLOY, ["site.yml", "must be a YAML mapping"], raw=b"hello\n"),
    Case("inventory malformed YAML", DEPLOY, ["site.yml", "malformed YAML at line"], raw=b"site: {name: [lab\n"),
    Case("inventory tab indentation", DEPLOY, ["site.yml", "malformed YAML"], raw=b"site:\n\tname: lab\n"),
    Case("inventory duplicate host", DEPLOY, ["site.yml", "duplicate key 'pxc1'"],
         raw=b"site: {name: lab, domain: lab.test}\nhosts:\n  pxc1: {}\n  pxc1: {}\n"),
    Case("inventory list as mapping key", DEPLOY, ["site.yml", "mapping key must be a plain value"],
         raw=b"site: {name: lab, domain: lab.test}\nhosts:\n  ? [a, b]\n  : {}\n"),
]

# --- broken inventories: keys and values ------------------------------------------------
inv_case("unknown top-level key", setp("sites", {}), ["sites: unknown key"])
inv_case("unknown host key", setp("hosts.pxc1.role", ["galera"]), ["hosts.pxc1.role: unknown key"])
inv_case("missing site", delp("site"), ["site: required key is missing"])
inv_case("missing networks", delp("networks"), ["networks: required key is missing"])
inv_case("missing hosts", delp("hosts"), ["hosts: required key is missing"])
inv_case("site name upper case", setp("site.name", "Lab"), ["site.name", "'Lab' is not valid here"])
inv_case("site name with newline", setp("site.name", "lab\n"), ["site.name", "is not valid here"])
inv_case("site name with semicolon", setp("site.name", "lab;id"), ["site.name", "is not valid here"])
inv_case("site domain with space", setp("site.domain", "lab test"), ["site.domain", "is not valid here"])
inv_case("site domain trailing newline", setp("site.domain", "lab.test\n"), ["site.domain", "is not valid here"])
inv_case("site domain with $()", setp("site.domain", "$(id).test"), ["site.domain", "is not valid here"])
inv_case("timezone unknown", setp("site.timezone", "Mars/Olympus"), ["site.timezone", "does not name a time zone"])
inv_case("timezone injection", setp("site.timezone", "UTC; id"), ["site.timezone", "does not name a time zone"])
inv_case("timezone path", setp("site.timezone", "../../etc/passwd"), ["site.timezone", "does not name a time zone"])
inv_case("timezone newline", setp("site.timezone", "UTC\n"), ["site.timezone", "does not name a time zone"])
inv_case("timezone a number", setp("site.timezone", 5), ["site.timezone", "Input should be a valid string"])
inv_case("apt proxy without scheme", setp("site.apt_proxy", "10.200.0.1:3142"), ["site.apt_proxy", "is not valid here"])
inv_case("apt proxy with quote", setp("site.apt_proxy", 'http://10.200.0.1:3142/";'), ["site.apt_proxy", "is not an http(s)://HOST[:PORT] URL"])
inv_case("ssh port 0", setp("ssh.port", 0), ["ssh.port", "greater than or equal to 1"])
inv_case("ssh port text", setp("ssh.port", "twenty-two"), ["ssh.port", "valid integer"])
inv_case("ssh user injection", setp("ssh.user", "root;id"), ["ssh.user", "is not a user name"])
inv_case("ssh timeout negative", setp("ssh.connect_timeout", -1), ["ssh.connect_timeout", "greater than 0"])
inv_case("host name upper case", rename_host("pxc1", "PXC1"), ["hosts.'PXC1'", "one DNS label"])
inv_case("host name with semicolon", rename_host("pxc1", "pxc1;id"), ["hosts.'pxc1;id'", "one DNS label"])
inv_case("host name with space", rename_host("pxc1", "pxc 1"), ["hosts.'pxc 1'", "one DNS label"])
inv_case("host name with dot", rename_host("pxc1", "pxc1.lab"), ["hosts.'pxc1.lab'", "one DNS label"])
inv_case("host name with $()", rename_host("e1server", "$(id)"), ["hosts.'$(id)'", "one DNS label"])
inv_case("host name leading dash", rename_host("pxc1", "-pxc1"), ["hosts.'-pxc1'", "one DNS label"])
inv_case("host name too long", rename_host("pxc1", "p" * 64), ["one DNS label"])
inv_case("host name newline", rename_host("pxc1", "pxc1\n"), ["one DNS label"])
inv_case("host name a number", rename_host("pxc1", 7), ["hosts.7", "valid string"])
inv_case("network name with dash", lambda d: (d["networks"].__setitem__("mail-net", d["networks"].pop("mail"))),
         ["networks.'mail-net'"])
inv_case("two management networks", setp("networks.mail.management", True), ["networks", "exactly one network"])
inv_case("no management network", setp("networks.mgmt.management", False), ["networks", "exactly one network"])
inv_case("overlapping networks", setp("networks.dmz.cidr", "10.200.0.0/29"), ["networks.dmz.cidr", "overlaps"])
inv_case("cidr with host bits", setp("networks.dmz.cidr", "10.200.1.1/29"), ["networks.dmz.cidr", "not a valid IPv4 network"])
inv_case("cidr garbage", setp("networks.dmz.cidr", "ten/8"), ["networks.dmz.cidr"])
inv_case("network description newline", setp("networks.dmz.description", "a\nb"), ["networks.dmz.description", "control characters"])
inv_case("address outside its network", setp("hosts.pxc1.addresses.mail", "10.200.12.5"), ["hosts.pxc1.addresses.mail", "outside network mail"])
inv_case("address is the network address", setp("hosts.pxc1.addresses.mail", "10.200.11.0"), ["hosts.pxc1.addresses.mail", "network or broadcast"])
inv_case("address is broadcast", setp("hosts.pxc1.addresses.mail", "10.200.11.255"), ["hosts.pxc1.addresses.mail", "network or broadcast"])
inv_case("address used twice", setp("hosts.pxc1.addresses.mail", "10.200.11.121"), ["hosts.pxc2.addresses.mail", "already used by hosts.pxc1"])
inv_case("address not an IP", setp("hosts.pxc1.addresses.mail", "pxc1.lab.test"), ["hosts.pxc1.addresses.mail"])
inv_case("address IPv6", setp("hosts.pxc1.addresses.mail", "::1"), ["hosts.pxc1.addresses.mail"])
inv_case("address on unknown network", setp("hosts.pxc1.addresses.storage", "10.9.9.9"), ["hosts.pxc1.addresses.storage", "unknown network"])
inv_case("host without management address", delp("hosts.pxc1.addresses.mgmt"), ["hosts.pxc1.addresses", "management network"])
inv_case("addresses not a mapping", setp("hosts.pxc1.addresses", ["10.200.0.120"]), ["hosts.pxc1.addresses", "valid dictionary"])
inv_case("unknown role", setp("hosts.pxc1.roles", ["galera", "mysql"]), ["hosts.pxc1.roles", "unknown role 'mysql'"])
inv_case("roles not a list", setp("hosts.pxc1.roles", "galera"), ["hosts.pxc1.roles", "valid list"])
inv_case("cpus zero", setp("hosts.pxc1.cpus", 0), ["hosts.pxc1.cpus"])
inv_case("memory too small", setp("hosts.pxc1.memory_mb", 100), ["hosts.pxc1.memory_mb"])
inv_case("kernel module injection", setp("hosts.postfix01.kernel_modules", ["drbd;id"]), ["hosts.postfix01.kernel_modules", "not a kernel module name"])
inv_case("vip on unknown network", setp("vips.xmpp.network", "nowhere"), ["vips.xmpp.network", "unknown network"])
inv_case("vip outside its network", setp("vips.xmpp.address", "10.200.11.4"), ["vips.xmpp.address", "outside network dmz"])
inv_case("vip role nobody has", setp("vips.webmail.role", "backup"), ["vips.webmail.network", "bk1server"])
inv_case("vip address of a host", setp("vips.xmpp.address", "10.200.1.2"), ["vips.xmpp.address", "already used by hosts.e1server"])
inv_case("vip name not DNS", setp("vips.xmpp.names", ["xmpp lab"]), ["vips.xmpp.names", "not a DNS name"])
inv_case("vip name injection", setp("vips.xmpp.names", ["$(reboot).lab.test"]), ["vips.xmpp.names", "not a DNS name"])
inv_case("vip unknown role", setp("vips.xmpp.role", "xmpp"), ["vips.xmpp.role", "Input should be"])
inv_case("even Galera nodes", setp("hosts.r1server.roles", ["galera"]), ["hosts", "role galera needs an odd number"])
inv_case("one Galera node too few", setp("hosts.pxc3.roles", []), ["hosts", "role galera needs an odd number"])
inv_case("one Pacemaker node", lambda d: [d["hosts"][h].__setitem__("roles", []) for h in ("postfix02", "postfix03")],
         ["hosts", "role mail_backend (Pacemaker) needs at least 2"])
inv_case("two PostgreSQL primaries", setp("hosts.psql2server.roles", ["postgres_primary"]), ["hosts", "role postgres_primary needs exactly 1"])
inv_case("no PostgreSQL primary", setp("hosts.psql1server.roles", []), ["hosts", "role postgres_primary needs exactly 1"])
inv_case("no ejabberd node", lambda d: [d["hosts"][h].__setitem__("roles", []) for h in ("e1server", "e2server")],
         ["role ejabberd needs at least 1"])
inv_case("mail roles without mail section", delp("mail"), ["mail", "no 'mail' section"])
inv_case("xmpp roles without xmpp section", delp("xmpp"), ["xmpp", "no 'xmpp' section"])
inv_case("galera flavour unknown", setp("mail.galera_flavour", "mysql"), ["mail.galera_flavour", "'percona' or 'mariadb'"])
inv_case("db proxy unknown", setp("mail.db_proxy", "maxscale"), ["mail.db_proxy"])
inv_case("storage unknown", setp("mail.storage", "nfs"), ["mail.storage"])
inv_case("drbd version 7", setp("mail.drbd_version", 7), ["mail.drbd_version"])
inv_case("drbd backing disk injection", setp("mail.drbd_backing", {"disk": "/dev/vdb;reboot"}),
         ["mail.drbd_backing.disk", "not a device path", "'/dev/vdb;reboot'"])
inv_case("drbd backing disk not a device", setp("mail.drbd_backing", {"disk": "/srv/disk.img"}),
         ["mail.drbd_backing.disk", "not a device path"])
inv_case("drbd backing volume group injection", setp("mail.drbd_backing", {"volume_group": "vg0 $(id)"}),
         ["mail.drbd_backing.volume_group", "not an LVM name"])
inv_case("drbd backing volume name", setp("mail.drbd_backing", {"volume": "-mail"}),
         ["mail.drbd_backing.volume", "not an LVM name"])
inv_case("drbd backing size", setp("mail.drbd_backing", {"size": "lots"}),
         ["mail.drbd_backing.size", "not a volume size", "100%FREE"])
inv_case("drbd backing unknown key", setp("mail.drbd_backing", {"device": "/dev/vdb"}),
         ["mail.drbd_backing.device: unknown key"])
inv_case("fence agent unknown", setp("mail.fence_agent", "fence_magic"), ["mail.fence_agent"])
inv_case("mail domain invalid", setp("mail.domain", "lab"), ["mail.domain", "not a DNS name"])
inv_case("mail domain injection", setp("mail.domain", "lab.test;id"), ["mail.domain", "not a DNS name"])
inv_case("xmpp domain invalid", setp("xmpp.domain", "xmpp lab"), ["xmpp.domain", "not a DNS name"])
inv_case("xmpp admin with space", setp("xmpp.admins", ["ad min"]), ["xmpp.admins", "'ad min'"])
inv_case("xmpp admin injection", setp("xmpp.admins", ["x;id"]), ["xmpp.admins", "'x;id'"])
inv_case("webmail plugin not shipped", setp("webmail.plugins", ["password", "carddav"]),
         ["webmail.plugins.1", "'carddav' is not a Roundcube plugin Debian ships"])
inv_case("webmail client network unknown", setp("webmail.client_networks", ["internet"]),
         ["webmail.client_networks.0", "unknown network 'internet'"])
inv_case("webmail product name with a newline", setp("webmail.product_name", "Lab\nmail"),
         ["webmail.product_name", "control characters"])
inv_case("mail postmaster not a mailbox", setp("mail.postmaster", "a b"), ["mail.postmaster", "not a mailbox"])
inv_case("webmail without the mail VIP", lambda d: d["vips"].pop("mail"),
         ["vips.mail is missing", "Roundcube reaches IMAP and SMTP on the mail VIP"], argv=["webmail.deploy"])
inv_case("deploy.all without the mail VIP's name", lambda d: d["vips"]["mail"].pop("names"),
         ["vips.mail.names is empty"], argv=["deploy.all"])
inv_case("lab bridge prefix too long", setp("lab.bridge_prefix", "toolongprefix"), ["lab.bridge_prefix", "is not valid here"])
inv_case("a host that is not a mapping", setp("hosts.pxc1", "galera"), ["hosts.pxc1"])
inv_case("networks not a mapping", setp("networks", ["mgmt"]), ["networks", "valid dictionary"])

# --- secrets files ------------------------------------------------------------------------
C += [
    Case("secrets readable by others", DEPLOY, ["site.secrets.yml", "readable by others", "chmod 600"],
         inventory=_inv(), secrets=b"a: b\n", secrets_mode=0o644),
    Case("secrets group readable", DEPLOY, ["site.secrets.yml", "readable by others"],
         inventory=_inv(), secrets=b"a: b\n", secrets_mode=0o640),
    Case("secrets not YAML", DEPLOY, ["site.secrets.yml", "not valid YAML"], inventory=_inv(), secrets=b"a: [b\n"),
    Case("secrets a list", DEPLOY, ["site.secrets.yml", "must map names to strings"], inventory=_inv(), secrets=b"- a\n"),
    Case("secrets a number value", DEPLOY, ["site.secrets.yml", "must map names to strings"], inventory=_inv(), secrets=b"a: 5\n"),
    Case("secrets nested", DEPLOY, ["site.secrets.yml", "must map names to strings"], inventory=_inv(), secrets=b"a: {b: c}\n"),
    Case("secrets null value", DEPLOY, ["site.secrets.yml", "must map names to strings"], inventory=_inv(), secrets=b"a: null\n"),
    Case("secrets not UTF-8", DEPLOY, ["site.secrets.yml", "not UTF-8"], inventory=_inv(), secrets=b"a: \xff\n"),
    Case("secrets a directory", DEPLOY, ["site.secrets.yml", "not a file"], inventory=_inv(), secrets="dir"),
    Case("CA key garbage", ["pki.issue", "--check"], ["site.secrets.yml", "pki_ca_key", "not a PEM key"],
         inventory=_inv(), secrets=b"pki_ca_key: garbage\npki_ca_cert: garbage\n"),
    Case("no CA for pki.issue", ["pki.issue", "--check"], ["site.secrets.yml", "no CA yet", "pki.init"], inventory=_inv()),
    Case("no CA for export-ca", ["pki.export-ca"], ["no CA yet"], inventory=_inv()),
    Case("fence credentials missing", ["cluster.deploy", "--check"], ["site.secrets.yml", "missing secret 'fence_virsh_"],
         inventory=_inv(setp("mail.fence_agent", "fence_virsh"))),
    Case("fence credentials missing for deploy.all", ["deploy.all"], ["site.secrets.yml", "missing secret 'fence_virsh_"],
         inventory=_inv(setp("mail.fence_agent", "fence_virsh"))),
    Case("deploy.all --hosts part of the Galera cluster", ["deploy.all", "--hosts", "pxc1,e1server"],
         ["--hosts must name all of pxc1, pxc2, pxc3"], inventory=_inv()),
    Case("DRBD 8.4 with three back ends", ["deploy.all"], ["DRBD 8.4", "two nodes"],
         inventory=_inv(lambda d: (d["mail"].__setitem__("storage", "drbd"), d["mail"].__setitem__("drbd_version", 8)))),
]

# --- the roles file a rescue wrote beside the inventory (site.roles.yml) --------------------
SWAPPED = b"hosts:\n  psql1server: [postgres_replica]\n  psql2server: [postgres_primary]\n"
C += [Case(id, argv, expect, inventory=_inv(), roles=roles) for id, argv, expect, roles in [
    ("roles file unknown host", DEPLOY, ["site.roles.yml", "hosts.nosuchhost: not a host of the inventory"],
     b"hosts:\n  nosuchhost: [postgres_replica]\n"),
    ("roles file unknown role", DEPLOY, ["site.roles.yml", "hosts.psql2server: must be a list of roles"],
     b"hosts:\n  psql2server: [postgres_master]\n"),
    ("roles file roles not a list", ["postgres.promote", "--yes"], ["site.roles.yml", "hosts.psql2server"],
     b"hosts:\n  psql2server: postgres_primary\n"),
    ("roles file a list", DEPLOY, ["site.roles.yml", "a roles file ", "'hosts:' (host name -> list of roles)"],
     b"- psql2server\n"),
    ("roles file other key", DEPLOY, ["site.roles.yml", "a roles file ", "'hosts:' (host name -> list of roles)"],
     b"roles:\n  psql2server: [postgres_primary]\n"),
    ("roles file malformed YAML", ["postgres.rejoin", "psql1server", "--yes"], ["site.roles.yml", "malformed YAML"],
     b"hosts:\n  psql2server: [postgres_primary\n"),
    ("roles file duplicate host", DEPLOY, ["site.roles.yml", "duplicate key 'psql2server'"],
     b"hosts:\n  psql2server: [spare]\n  psql2server: [postgres_primary]\n"),
    ("roles file retired unknown host", DEPLOY, ["site.roles.yml", "retired.0", "'ghost' is not a host of the inventory"],
     b"retired: [ghost]\n"),
    ("roles file not UTF-8", DEPLOY, ["site.roles.yml", "cannot read the roles file"], b"hosts: {psql2server: [\xff]}\n"),
    ("roles file two primaries", ["postgres.promote", "--yes"],
     ["site.yml", "role postgres_primary needs exactly 1 host (found 2)"], b"hosts:\n  psql2server: [postgres_primary]\n"),
    ("rejoin the primary the roles file made", ["postgres.rejoin", "psql2server", "--yes"],
     ["psql2server is the current primary", "recorded in", "site.roles.yml", "(a rescue's record) over",
      "psql1server: postgres_replica; psql2server: postgres_primary"], SWAPPED),
    ("promote the primary the roles file made", ["postgres.promote", "--node", "psql2server", "--yes"],
     ["--node psql2server: has postgres_primary, not role postgres_replica (replicas: psql1server)"], SWAPPED),
]]

# --- invoke configs -----------------------------------------------------------------------
C += [
    Case("config inventory is a list", DEPLOY, ["'inventory'", "one inventory file", "list"],
         config={"inventory": ["a.yml", "b.yml"]}, env={"INVOKE_INVENTORY": None}),
    Case("config inventory is a list and INVOKE_INVENTORY set", DEPLOY, ["INVOKE_INVENTORY", "'inventory'", "list"],
         config={"inventory": ["a.yml", "b.yml"]}),
    Case("config inventory is a mapping", DEPLOY, ["invoke config", "wrong shape", "inventory"],
         config={"inventory": {"path": "a.yml"}}, env={"INVOKE_INVENTORY": None}),
    Case("config inventory is a number", DEPLOY, ["'inventory'", "int"], config={"inventory": 5},
         env={"INVOKE_INVENTORY": None}),
    Case("config inventory is empty", DEPLOY, ["'inventory' is empty"], config={"inventory": ""}),
    Case("config check is not a boolean", DEPLOY, ["'check' must be true or false"], config={"check": "maybe"}),
    Case("config check is a list", DEPLOY, ["'check' must be true or false"], config={"check": [1]}),
    Case("config malformed YAML", DEPLOY, ["invoke config", "malformed YAML"], raw_config=b"inventory: [a\n"),
    Case("config a list", DEPLOY, ["invoke config", "must be a mapping"], raw_config=b"- a\n"),
    Case("config not UTF-8", DEPLOY, ["invoke config", "utf-8"], raw_config=b"inventory: \xff\n"),
    Case("config file missing", ["-f", "{tmp}/nosuch.yaml", *DEPLOY], ["invoke config", "nosuch.yaml", "no such file"]),
    Case("config file of another type", ["-f", "{tmp}/cfg.txt", *DEPLOY], ["invoke config", "not supported"]),
]

# --- task arguments -------------------------------------------------------------------------
OPS = _inv()
C += [Case(id, argv, expect, inventory=OPS, stdin=stdin) for id, argv, expect, stdin in [
    ("--hosts empty", ["base.deploy", "--hosts", ""], ["--hosts", "names no host"], None),
    ("--hosts only a comma", ["base.deploy", "--hosts", ","], ["--hosts", "names no host"], None),
    ("--hosts empty name", ["base.deploy", "--hosts", "pxc1,,pxc2"], ["--hosts", "empty name"], None),
    ("--hosts unknown", ["base.deploy", "--hosts", "nosuch"], ["--hosts names unknown host(s): nosuch"], None),
    ("--hosts injection", ["deploy.all", "--hosts", "e1server;id"], ["unknown host(s): e1server;id"], None),
    ("--hosts on firewall.show", ["firewall.show", "--hosts", "nosuch"], ["unknown host(s): nosuch"], None),
    ("unknown task", ["base.redeploy"], ["No idea what 'base.redeploy' is"], None),
    ("extra argument", ["base.deploy", "extra"], ["No idea what 'extra' is"], None),
    ("register empty user", ["ejabberd.register-user", "", "--password", "secret-pw-1"], ["empty user name"], None),
    ("register user with space", ["ejabberd.register-user", "a b", "--password", "secret-pw-1"], ["'a b'", "not a valid JID"], None),
    ("register user with newline", ["ejabberd.register-user", "alice\n", "--password", "secret-pw-1"], ["not a valid JID"], None),
    ("register user with quote", ["ejabberd.register-user", "o'neil", "--password", "secret-pw-1"], ["not a valid JID"], None),
    ("register other domain", ["ejabberd.register-user", "x@other.test", "--password", "secret-pw-1"], ["'other.test' is not served here"], None),
    ("register with resource", ["ejabberd.register-user", "x@xmpp.lab.test/phone", "--password", "secret-pw-1"], ["not a bare JID"], None),
    ("register empty password", ["ejabberd.register-user", "alice", "--password", ""], ["empty password"], None),
    ("register password with newline", ["ejabberd.register-user", "alice", "--password", "a\nb"], ["newline"], None),
    ("register no password no terminal", ["ejabberd.register-user", "alice"], ["no password given and no terminal", "--password-file"], ""),
    ("register password and file", ["ejabberd.register-user", "alice", "--password", "pw-pw-pw-1", "--password-file", "-"], ["not both"], ""),
    ("register password file missing", ["ejabberd.register-user", "alice", "--password-file", "{tmp}/nosuch"], ["--password-file", "cannot read it"], None),
    ("register password file empty stdin", ["ejabberd.register-user", "alice", "--password-file", "-"], ["empty password"], ""),
    ("unregister empty user", ["ejabberd.unregister-user", ""], ["empty user name"], None),
    ("unregister other domain", ["ejabberd.unregister-user", "x@evil.test"], ["not served here"], None),
    ("change password bad user", ["ejabberd.change-password", "a b", "--password", "pw-pw-pw-1"], ["not a valid JID"], None),
    ("change password no terminal", ["ejabberd.change-password", "alice"], ["no password given and no terminal"], ""),
    ("add-domain empty", ["mail.add-domain", ""], ["empty domain name"], None),
    ("add-domain with space", ["mail.add-domain", "not a domain"], ["'not a domain' is not a valid domain name"], None),
    ("add-domain injection", ["mail.add-domain", "a;id.org"], ["not a valid domain name"], None),
    ("add-domain trailing newline", ["mail.add-domain", "example.org\n"], ["not a valid domain name"], None),
    ("add-mailbox no domain", ["mail.add-mailbox", "bob", "--password", "pw-pw-pw-1"], ["'bob' is not an e-mail address"], None),
    ("add-mailbox empty local", ["mail.add-mailbox", "@lab.test", "--password", "pw-pw-pw-1"], ["'@lab.test'"], None),
    ("add-mailbox newline", ["mail.add-mailbox", "bob\n@lab.test", "--password", "pw-pw-pw-1"], ["the part before '@'"], None),
    ("add-mailbox space", ["mail.add-mailbox", "bo b@lab.test", "--password", "pw-pw-pw-1"], ["the part before '@'"], None),
    ("add-mailbox injection", ["mail.add-mailbox", "$(id)@lab.test", "--password", "pw-pw-pw-1"], ["the part before '@'"], None),
    ("add-mailbox short password", ["mail.add-mailbox", "bob@lab.test", "--password", "short"], ["at least 8 characters"], None),
    ("add-mailbox no password no terminal", ["mail.add-mailbox", "bob@lab.test"], ["no password given and no terminal"], ""),
    ("add-alias bad target", ["mail.add-alias", "postmaster@lab.test", "not an address"], ["'not an address' is not an e-mail address"], None),
    ("add-alias no target", ["mail.add-alias", "postmaster@lab.test", ","], ["no target address"], None),
    ("add-alias bad alias", ["mail.add-alias", "post master@lab.test", "bob@lab.test"], ["the part before '@'"], None),
    ("set-password bad address", ["mail.set-password", "bob", "--password", "pw-pw-pw-1"], ["'bob' is not an e-mail address"], None),
    ("set-password no terminal", ["mail.set-password", "bob@lab.test"], ["no password given and no terminal"], ""),
    ("standby unknown node", ["cluster.standby", "nosuch"], ["'nosuch' is not a cluster node"], None),
    ("standby injection", ["cluster.unstandby", "postfix01;id"], ["'postfix01;id'"], None),
    ("standby a Galera node", ["cluster.standby", "pxc1"], ["'pxc1' is not a cluster node"], None),
    ("replica unknown host", ["postgres.replica", "nosuch"], ["'nosuch' is not a host of the inventory"], None),
    ("replica the primary", ["postgres.replica", "psql1server"], ["psql1server", "not role postgres_replica"], None),
    ("promote unknown node", ["postgres.promote", "--node", "nosuchhost", "--yes"],
     ["--node nosuchhost: not a host of", "site.yml"], None),
    ("promote node not a replica", ["postgres.promote", "--node", "e1server", "--yes"],
     ["--node e1server: has ejabberd, not role postgres_replica"], None),
    ("promote node the primary", ["postgres.promote", "--node", "psql1server", "--yes", "--force"],
     ["--node psql1server: has postgres_primary, not role postgres_replica"], None),
    ("rejoin unknown host", ["postgres.rejoin", "nosuchhost", "--yes"], ["'nosuchhost' is not a host of"], None),
    ("rejoin the current primary", ["postgres.rejoin", "psql1server", "--yes"],
     ["psql1server is the current primary", "nothing to rejoin"], None),
    ("rejoin host without a PostgreSQL role", ["postgres.rejoin", "e1server", "--yes"],
     ["e1server has ejabberd, not a PostgreSQL role"], None),
    ("rejoin host injection", ["postgres.rejoin", "psql2server;id", "--yes"], ["'psql2server;id' is not a host of"], None),
    ("bootstrap unknown node", ["pxc.bootstrap", "--node", "nosuch"], ["--node nosuch", "not a Galera node"], None),
    ("bootstrap --hosts subset", ["pxc.bootstrap", "--hosts", "pxc1"], ["--hosts must name all of"], None),
    ("pxc deploy --hosts subset", ["pxc.deploy", "--hosts", "pxc1"], ["--hosts must name all of pxc1, pxc2, pxc3"], None),
    ("cluster deploy --hosts subset", ["cluster.deploy", "--hosts", "postfix01"], ["do not narrow it with --hosts"], None),
    ("lab.power unknown host", ["lab.power", "nosuch", "off"], ["nosuch"], None),
    ("lab.power unknown action", ["lab.power", "e1server", "sideways"], ["sideways", "on, off or status"], None),
    ("lab.ssh unknown host", ["lab.ssh", "nosuch"], ["nosuch"], None),
    ("lab.up unknown host", ["lab.up", "--hosts", "nosuch"], ["nosuch"], None),
    ("lab.up empty hosts", ["lab.up", "--hosts", ""], ["--hosts"], None),
    ("lab.up bad timeout", ["lab.up", "--timeout", "abc"], ["--timeout", "abc"], None),
    ("lab.up negative timeout", ["lab.up", "--timeout", "-5"], ["--timeout"], None),
]]


def test_there_are_more_than_100_cases():
    assert len(C) > 100
    assert len({c.id for c in C}) == len(C)


@pytest.fixture
def watched(monkeypatch):
    """Records SSH connection attempts and commands started on this machine (and refuses them)."""
    seen: dict[str, list] = {"ssh": [], "local": []}

    def no_ssh(self, *a, **kw):
        seen["ssh"].append(self.name)
        raise AssertionError(f"connection attempted to {self.name}")

    class NoPopen(subprocess.Popen):
        def __init__(self, args, *a, **kw):
            seen["local"].append(args)
            raise AssertionError(f"local command started: {args}")

    monkeypatch.setattr(remote.HostSession, "open", no_ssh)
    monkeypatch.setattr(subprocess, "Popen", NoPopen)
    return seen


def _all_tasks(coll, prefix=""):
    for name, task in coll.tasks.items():
        yield prefix + name, task
    for name, sub in coll.collections.items():
        yield from _all_tasks(sub, f"{prefix}{name}.")


def _listing(folder: Path) -> dict[str, tuple[int, float]]:
    return {str(p.relative_to(folder)): (p.stat().st_size, p.stat().st_mtime) for p in folder.rglob("*")}


@pytest.mark.parametrize("case", C, ids=[c.id for c in C])
def test_bad_input_is_refused_cleanly(case, tmp_path, monkeypatch, capsys, watched):
    site = tmp_path / "site.yml"
    if case.raw is not None:
        site.write_bytes(case.raw)
    else:
        site.write_text(yaml.safe_dump(case.inventory if case.inventory is not None else _inv(), sort_keys=False))
    secrets = tmp_path / "site.secrets.yml"
    if case.secrets == "dir":
        secrets.mkdir()
    elif case.secrets is not None:
        secrets.write_bytes(case.secrets)
        secrets.chmod(case.secrets_mode)
    if case.roles is not None:
        (tmp_path / "site.roles.yml").write_bytes(case.roles)
    (tmp_path / "cfg.txt").write_text("x\n")
    argv = [a.replace("{tmp}", str(tmp_path)) for a in case.argv]
    if case.config is not None or case.raw_config is not None:
        cfg = tmp_path / "invoke-site.yaml"
        cfg.write_bytes(case.raw_config if case.raw_config is not None else yaml.safe_dump(case.config).encode())
        argv = ["-f", str(cfg), *argv]
    monkeypatch.setenv("INVOKE_INVENTORY", str(site))
    for key, value in case.env.items():
        if value is None:
            monkeypatch.delenv(key, raising=False)
        else:
            monkeypatch.setenv(key, value.replace("{tmp}", str(tmp_path)))
    if case.stdin is not None:
        import io
        monkeypatch.setattr("sys.stdin", io.StringIO(case.stdin))
    before = _listing(tmp_path)
    program = Program(namespace=tasks.ns, name="hastack", binary="inv")
    helps = {id(t): (t, dict(t.help)) for _, t in _all_tasks(tasks.ns)}  # invoke pops them while parsing
    try:
        with pytest.raises(SystemExit) as exited:
            program.run(["inv", *argv])
    finally:
        for task, help in helps.values():
            task.help = help
    out = capsys.readouterr()
    text = out.out + out.err
    assert exited.value.code not in (0, None), text
    assert exited.value.code != 2 or "internal error" not in text, text
    assert "Traceback" not in text, text
    for want in case.expect:
        assert want in text, f"{want!r} not in:\n{text}"
    assert watched == {"ssh": [], "local": []}, text
    assert _listing(tmp_path) == before, "files beside the inventory changed"


def test_deploy_all_on_hosts_outside_both_clusters_is_not_refused(monkeypatch):
    """--hosts naming no cluster node: the cluster tiers skip (the preflight refuses only a part of a cluster)."""
    from fabfile import cluster, pxc
    from fabfile.core.testing import RecordingRun
    from fabfile.core.inventory import load

    run = RecordingRun(load(Path(__file__).resolve().parents[2] / "inventory/lab.yml"), only="e1server,gw1server")
    pxc.preflight(run)
    assert cluster.preflight(run) == []
