"""The database proxy without hosts: HAProxy's config (one active writer, the
rest backup, Galera-aware check; a reader port over the nodes that are not the
writer; `haproxy -c` when haproxy is installed) and ProxySQL's config (Galera
hostgroups, the read/write split's query rules), parsed by libconfig itself
(the C library ProxySQL reads it with, through ctypes) when libconfig9 is
installed here; the firewall opens the reader port like the writer port."""

from __future__ import annotations

import ctypes
import ctypes.util
import re
import shlex
import shutil
import subprocess
from pathlib import Path

import pytest

from fabfile import dbproxy
from fabfile.core import Result, flows, templates, topology
from fabfile.core.inventory import load
from fabfile.core.secrets import Secrets
from fabfile.core.sql import mysql_native_hash
from fabfile.core.testing import RecordingRun, files_present

ROOT = Path(__file__).resolve().parents[2]
LAB = load(ROOT / "inventory/lab.yml")  # haproxy
EXAMPLE = load(ROOT / "inventory/example.yml")  # proxysql


@pytest.fixture
def secrets(tmp_path):
    return Secrets(tmp_path / "secrets.yml")


def render(name, inv, host, secret):
    return templates.render(name, inv, host, secret, **dbproxy.template_vars(inv, host, secret))


def haproxy_cfg(secrets, host="postfix01"):
    return render("dbproxy/etc/haproxy/haproxy.cfg.j2", LAB, host, secrets.get)


def test_haproxy_one_writer_rest_backup(secrets):
    text = haproxy_cfg(secrets)
    servers = re.findall(r"^\s+server (\S+) (\S+) check(.*)$", text, re.M)
    assert [(n, a, rest.strip()) for n, a, rest in servers] == [
        ("pxc1", "10.200.11.120:3306", ""),
        ("pxc2", "10.200.11.121:3306", "backup"),
        ("pxc3", "10.200.11.122:3306", "backup"),
    ]
    assert "option allbackups" not in text  # one backup at a time, never two writers
    assert "option httpchk" in text and "http-check expect status 200" in text
    assert "default-server port 9200" in text and "on-marked-down shutdown-sessions" in text


def test_haproxy_binds_own_address_and_vip(secrets):
    text = haproxy_cfg(secrets, "postfix02")
    assert re.findall(r"^\s+bind (\S+)$", text, re.M) == [
        "10.200.11.114:3306", "10.200.11.116:3306",
        "10.200.11.116:8405",  # HAProxy's own Prometheus endpoint on the VIP, for the monitoring host
        "10.200.11.114:3307", "10.200.11.116:3307"]


# --- HAProxy's reader port -------------------------------------------------------------------


def sections(text: str) -> dict[str, list[str]]:
    """'listen galera' / 'frontend x' / 'backend y' -> its lines (stripped, no comments)."""
    out: dict[str, list[str]] = {}
    current = None
    for line in text.splitlines():
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        if not line[0].isspace():
            current = line.strip()
            out[current] = []
        elif current is not None:
            out[current].append(line.strip())
    return out


def test_haproxy_reader_port_on_the_own_address_and_the_vip(secrets):
    assert topology.db_proxy_reader_port(LAB) == topology.DB_PROXY_READER_PORTS["haproxy"] == 3307
    s = sections(haproxy_cfg(secrets, "postfix02"))
    assert [x for x in s["frontend galera_read"] if x.startswith("bind ")] == [
        "bind 10.200.11.114:3307", "bind 10.200.11.116:3307"]
    assert not any(x.startswith("bind ") and x.endswith(":3307") for x in s["listen galera"])


def test_haproxy_reader_backends_leave_out_the_writer(secrets):
    """One backend per possible writer, picked in the writer listener's order;
    in each the writer is only the backup; the servers track the writer
    listener's Galera-aware checks instead of checking on their own."""
    s = sections(haproxy_cfg(secrets))
    rules = [x for x in s["frontend galera_read"] if x.startswith("use_backend ")]
    assert rules == [f"use_backend read_not_{n} if {{ srv_is_up(galera/{n}) }}" for n in ("pxc1", "pxc2", "pxc3")]
    assert "default_backend read_not_pxc1" in s["frontend galera_read"]
    addrs = {"pxc1": "10.200.11.120", "pxc2": "10.200.11.121", "pxc3": "10.200.11.122"}
    for writer in addrs:
        lines = s[f"backend read_not_{writer}"]
        assert "balance leastconn" in lines
        assert "on-marked-up shutdown-backup-sessions" in next(x for x in lines if x.startswith("default-server"))
        servers = [x.split() for x in lines if x.startswith("server ")]
        assert [(w[1], w[2], w[3:]) for w in servers] == [
            (n, f"{a}:3306", ["track", f"galera/{n}"] + (["backup"] if n == writer else [])) for n, a in addrs.items()]
        assert not any("check" in x.split() for x in lines)


def route(text: str, up: set[str]) -> tuple[str | None, str | None]:
    """Where HAProxy sends a new connection on the writer port and on the reader
    port when the nodes ``up`` pass their check, read off the rendered config:
    the first non-backup server that is up, else the first backup (no
    allbackups); the reader frontend's first use_backend whose srv_is_up holds."""
    s = sections(text)

    def pick(lines: list[str]) -> str | None:
        servers = [x.split() for x in lines if x.startswith("server ")]
        tracked = {w[1]: (w[w.index("track") + 1].split("/")[1] if "track" in w else w[1]) for w in servers}
        active = [w[1] for w in servers if "backup" not in w and tracked[w[1]] in up]
        backup = [w[1] for w in servers if "backup" in w and tracked[w[1]] in up]
        return (active or backup or [None])[0]

    writer = pick(s["listen galera"])
    backend = next((m[1] for m in (re.fullmatch(r"use_backend (\S+) if \{ srv_is_up\(galera/(\S+)\) \}", x)
                                   for x in s["frontend galera_read"]) if m and m[2] in up), None)
    if backend is None:
        backend = next(x.split()[1] for x in s["frontend galera_read"] if x.startswith("default_backend "))
    lines = s[f"backend {backend}"]
    actives = {x.split()[1] for x in lines if x.startswith("server ") and "backup" not in x.split()}
    reader = pick(lines)
    # leastconn spreads over every active server that is up: any of them may answer
    return writer, (reader if reader not in actives else ",".join(sorted(actives & up)))


@pytest.mark.parametrize("up, writer, readers", [
    ({"pxc1", "pxc2", "pxc3"}, "pxc1", "pxc2,pxc3"),  # steady state: reads on every other node
    ({"pxc1", "pxc3"}, "pxc1", "pxc3"),
    ({"pxc2", "pxc3"}, "pxc2", "pxc3"),  # the writer moved: reads leave it
    ({"pxc1", "pxc2"}, "pxc1", "pxc2"),
    ({"pxc1"}, "pxc1", "pxc1"),  # the last node: reads fall back to the writer
    ({"pxc3"}, "pxc3", "pxc3"),
])
def test_haproxy_reads_land_on_non_writers_while_one_is_up(secrets, up, writer, readers):
    assert route(haproxy_cfg(secrets), up) == (writer, readers)


@pytest.mark.skipif(not shutil.which("haproxy"), reason="haproxy is not installed on this machine")
def test_haproxy_config_is_accepted_by_haproxy(secrets, tmp_path):
    cfg = tmp_path / "haproxy.cfg"
    # The same check the deploy runs on the host before the file replaces the old one.
    cfg.write_text(haproxy_cfg(secrets))
    out = subprocess.run(["haproxy", "-c", "-f", str(cfg)], capture_output=True, text=True)
    assert out.returncode == 0, out.stdout + out.stderr


# --- ProxySQL ---------------------------------------------------------------------------


class Libconfig:
    """The libconfig C library (libconfig9), as ProxySQL uses it."""

    SIZE = 512  # sizeof(config_t) is ~100 bytes; generous

    def __init__(self, lib):
        self.lib = lib
        lib.config_read_string.argtypes = [ctypes.c_void_p, ctypes.c_char_p]
        lib.config_lookup.restype = ctypes.c_void_p
        lib.config_lookup.argtypes = [ctypes.c_void_p, ctypes.c_char_p]
        lib.config_setting_length.argtypes = [ctypes.c_void_p]
        lib.config_setting_get_elem.restype = ctypes.c_void_p
        lib.config_setting_get_elem.argtypes = [ctypes.c_void_p, ctypes.c_uint]
        lib.config_setting_get_member.restype = ctypes.c_void_p
        lib.config_setting_get_member.argtypes = [ctypes.c_void_p, ctypes.c_char_p]
        lib.config_setting_get_int.argtypes = [ctypes.c_void_p]
        lib.config_setting_get_string.restype = ctypes.c_char_p
        lib.config_setting_get_string.argtypes = [ctypes.c_void_p]
        self.cfg = ctypes.create_string_buffer(self.SIZE)
        lib.config_init(self.cfg)

    def parse(self, text: str) -> None:
        if not self.lib.config_read_string(self.cfg, text.encode()):
            # config_error_text()/config_error_line() are macros over config_t
            # (libconfig 1.5 on x86-64: error_text at offset 32, error_line at 52).
            raw = self.cfg.raw
            err = ctypes.cast(int.from_bytes(raw[32:40], "little"), ctypes.c_char_p).value
            line = int.from_bytes(raw[52:56], "little")
            raise ValueError(f"libconfig: line {line}: {(err or b'?').decode()}")

    def lookup(self, path: str):
        s = self.lib.config_lookup(self.cfg, path.encode())
        assert s, f"{path}: not in the file"
        return s

    def value(self, setting):
        """A string setting's text, else an int setting's value (config_setting_type is a macro)."""
        text = self.lib.config_setting_get_string(setting)
        return text.decode() if text is not None else self.lib.config_setting_get_int(setting)

    def member(self, group, name):
        m = self.lib.config_setting_get_member(group, name.encode())
        assert m, f"no member {name}"
        return self.value(m)

    def rows(self, path: str) -> list:
        lst = self.lookup(path)
        return [self.lib.config_setting_get_elem(lst, i) for i in range(self.lib.config_setting_length(lst))]

    def close(self):
        self.lib.config_destroy(self.cfg)


@pytest.fixture
def libconfig():
    name = ctypes.util.find_library("config")
    if not name:
        pytest.skip("libconfig is not installed on this machine (apt-get install libconfig9)")
    lc = Libconfig(ctypes.CDLL(name))
    yield lc
    lc.close()


def proxysql_cnf(secrets, host="postfix01"):
    return render("dbproxy/etc/proxysql.cnf.j2", EXAMPLE, host, secrets.get)


def test_proxysql_config_parses_with_libconfig(libconfig, secrets):
    libconfig.parse(proxysql_cnf(secrets))
    assert libconfig.value(libconfig.lookup("mysql_variables.monitor_username")) == "monitor"
    assert libconfig.value(libconfig.lookup("mysql_variables.monitor_password")) == secrets.get("pxc_monitor_password")
    assert libconfig.value(libconfig.lookup("mysql_variables.interfaces")) == "10.10.11.113:6033;10.10.11.116:6033"
    assert libconfig.value(libconfig.lookup("admin_variables.mysql_ifaces")) == "127.0.0.1:6032"
    servers = [(libconfig.member(s, "address"), libconfig.member(s, "hostgroup"), libconfig.member(s, "weight"))
               for s in libconfig.rows("mysql_servers")]
    assert servers == [("10.10.11.120", 10, 1000), ("10.10.11.121", 10, 900), ("10.10.11.122", 10, 800)]
    (hg,) = libconfig.rows("mysql_galera_hostgroups")
    assert {k: libconfig.member(hg, k) for k in ("writer_hostgroup", "backup_writer_hostgroup", "reader_hostgroup",
                                                 "max_writers", "writer_is_also_reader", "active")} == {
        "writer_hostgroup": 10, "backup_writer_hostgroup": 20, "reader_hostgroup": 30,
        "max_writers": 1, "writer_is_also_reader": 1, "active": 1}
    users = {libconfig.member(u, "username"): libconfig.member(u, "password") for u in libconfig.rows("mysql_users")}
    # every account of the mail tier (postfixadmin, postfix, dovecot, roundcube, ...), not the node-local ones
    assert set(users) == {a.user for a in topology.db_accounts(EXAMPLE)} - set(dbproxy.NOT_PROXIED)
    assert {"postfixadmin", "postfix", "dovecot", "roundcube"} <= set(users)
    for account in topology.db_accounts(EXAMPLE):
        if account.user in users:
            assert users[account.user] == mysql_native_hash(secrets.get(account.secret))


def test_proxysql_query_rules_split_reads_of_the_lookup_accounts(libconfig, secrets):
    libconfig.parse(proxysql_cnf(secrets))
    rules = []
    for r in libconfig.rows("mysql_query_rules"):
        user = libconfig.lib.config_setting_get_member(r, b"username")
        rules.append((libconfig.member(r, "rule_id"), libconfig.value(user) if user else None,
                      libconfig.member(r, "match_digest"), libconfig.member(r, "destination_hostgroup"),
                      libconfig.member(r, "apply"), libconfig.member(r, "active")))
    writer, reader = dbproxy.WRITER_HOSTGROUP, dbproxy.READER_HOSTGROUP
    assert rules == [
        (100, None, "^SELECT .* FOR UPDATE", writer, 1, 1),
        (110, None, "^SELECT .* (FOR SHARE|LOCK IN SHARE MODE)", writer, 1, 1),
        (200, "postfix", "^SELECT", reader, 1, 1),
        (201, "dovecot", "^SELECT", reader, 1, 1),
    ]
    # everything else (writes, Roundcube's and Postfixadmin's reads) on the account's default: the writer
    defaults = {libconfig.member(u, "default_hostgroup") for u in libconfig.rows("mysql_users")}
    assert defaults == {writer}


def first_rule(statement: str, user: str) -> int | None:
    """The hostgroup ProxySQL's rules pick for ``statement`` of ``user`` (None: the default)."""
    for _, rule_user, digest, hostgroup, _ in dbproxy.query_rules(topology.DB_READ_ONLY_USERS + ("roundcube",)):
        if rule_user in (None, user) and re.search(digest, statement, re.I):
            return hostgroup
    return None


@pytest.mark.parametrize("statement, user, hostgroup", [
    ("SELECT domain FROM domain WHERE domain = ?", "postfix", dbproxy.READER_HOSTGROUP),
    ("select username as user, password from mailbox where username = ?", "dovecot", dbproxy.READER_HOSTGROUP),
    ("SELECT * FROM mailbox WHERE username = ? FOR UPDATE", "dovecot", dbproxy.WRITER_HOSTGROUP),
    ("SELECT * FROM mailbox WHERE username = ? LOCK IN SHARE MODE", "postfix", dbproxy.WRITER_HOSTGROUP),
    ("SELECT * FROM session WHERE sess_id = ?", "roundcube", None),
    ("UPDATE session SET changed = NOW() WHERE sess_id = ?", "roundcube", None),
    ("INSERT INTO log VALUES (?)", "postfix", None),
])
def test_proxysql_rules_route_statements(statement, user, hostgroup):
    assert first_rule(statement, user) == hostgroup


def test_read_only_users_can_only_read():
    """The reader path is for accounts that cannot write: HAProxy's reader port
    does not look at statements, so a write there would land on a non-writer."""
    accounts = {a.user: a for a in topology.db_accounts(LAB)}
    for user in topology.DB_READ_ONLY_USERS:
        assert accounts[user].grants and all(set(p) == {"SELECT"} for p in accounts[user].grants.values()), user
    assert topology.db_proxy_reader_port(EXAMPLE) == topology.db_proxy_port(EXAMPLE) == 6033


def test_libconfig_rejects_a_broken_file(libconfig, secrets):
    broken = proxysql_cnf(secrets).replace("max_writers=1", "max_writers=")
    with pytest.raises(ValueError):
        libconfig.parse(broken)


def test_proxysql_config_has_no_plaintext_app_passwords(secrets):
    text = proxysql_cnf(secrets)
    for account in topology.db_accounts(EXAMPLE):
        if account.user != "monitor":
            assert secrets.get(account.secret) not in text


def test_proxysql_reload_sequence():
    assert dbproxy.PROXYSQL_RELOAD[:3] == (
        "LOAD MYSQL SERVERS FROM CONFIG", "LOAD MYSQL SERVERS TO RUNTIME", "SAVE MYSQL SERVERS TO DISK")
    assert {s.rsplit(" ", 2)[0].split(" ", 1)[1] for s in dbproxy.PROXYSQL_RELOAD} == {
        "MYSQL SERVERS", "MYSQL USERS", "MYSQL VARIABLES", "MYSQL QUERY RULES"}


def test_ports_and_hosts():
    assert topology.db_proxy_port(LAB) == 3306 and topology.db_proxy_port(EXAMPLE) == 6033
    assert topology.db_proxy_hosts(LAB) == ["postfix01", "postfix02", "postfix03"]


def test_firewall_opens_the_reader_port_like_the_writer_port():
    """The reader port on the dbproxy VIP, from the webmail and back end hosts
    only, in the same rules as the writer port; nowhere else."""
    webmail_and_backends = {f"{LAB.hosts[h].addresses['mail']}/32" for h in LAB.with_role("webmail", "mail_backend")}
    for host in LAB.with_role("mail_backend"):
        proxy = [r for r in flows.input_rules(LAB, host) if "3307" in r.ports.split(",")]
        assert {r.ports for r in proxy} == {"3306,3307"}
        assert {r.dst for r in proxy} == {"10.200.11.116/32"}
        assert {r.src for r in proxy} == webmail_and_backends - {f"{LAB.hosts[host].addresses['mail']}/32"}
    for host in LAB.hosts:
        if "mail_backend" not in LAB.hosts[host].roles:
            assert not any("3307" in r.ports for r in flows.input_rules(LAB, host)), host
    # ProxySQL: one port, nothing to add
    assert {r.ports for r in flows.input_rules(EXAMPLE, "postfix01") if "6033" in r.ports} == {"6033"}


def test_firewall_lets_only_back_ends_ask_the_galera_check():
    rows = [a for a in flows.TABLE["galera"] if a.ports == "9200"]
    assert len(rows) == 1 and rows[0].sources == ("mail_backend",)
    assert rows[0].when(LAB) and not rows[0].when(EXAMPLE)


# --- the steps on recording hosts (facts in, commands out) ---------------------------------

SECRET = Secrets(Path("/nonexistent/secrets.yml"), persist=False).get
UPLOAD = (r"^(mkdir -p |chown |mv -f |cp -a |rm -f |haproxy -c )", Result())


def recording(inv, answers):
    run = RecordingRun(inv, answers={**answers, "*": [UPLOAD]})
    run.secrets.get = lambda name, *a: SECRET(name)
    return run


def test_haproxy_already_converged_runs_no_command():
    cfg = render("dbproxy/etc/haproxy/haproxy.cfg.j2", LAB, "postfix01", SECRET)
    run = recording(LAB, {"postfix01": [
        (r"^dpkg-query -W -f='\$\{Package\}", Result(stdout="haproxy installed\n")),
        files_present({dbproxy.HAPROXY_CFG: ("root:root:644", cfg)}),
        (r"^systemctl is-enabled", Result(stdout="enabled\n")), (r"^systemctl is-active", Result())]})
    dbproxy.haproxy(run.session("postfix01"))
    assert run.session("postfix01").changes == []


def test_haproxy_owned_by_pacemaker_is_reloaded_only_where_it_runs():
    owns = (r"crm_resource --resource haproxy --query-xml", Result())
    run = recording(LAB, {"postfix01": [owns, (r"^systemctl is-active -q haproxy$", Result())],
                          "postfix02": [owns]})
    for host in ("postfix01", "postfix02"):
        dbproxy.haproxy(run.session(host))
    assert run.session("postfix01").changes[-1] == "systemctl reload haproxy"
    assert not any(c.startswith("systemctl") for c in run.session("postfix02").changes)  # never started here


def test_proxysql_changed_config_is_loaded_with_the_admin_password_on_stdin():
    run = recording(EXAMPLE, {"postfix01": [
        (r"^dpkg-query -W -f='\$\{Package\}", lambda cmd, stdin: Result(
            stdout="".join(f"{p} installed\n" for p in shlex.split(cmd)[3:]))),
        (r"^test -s /etc/apt/keyrings/proxysql.asc$", Result()),
        files_present({"/etc/apt/sources.list.d/proxysql.list": (
            "root:root:644", render("dbproxy/etc/apt/sources.list.d/proxysql.list.j2", EXAMPLE, "postfix01", SECRET))}),
        (r"^systemctl is-enabled", Result(stdout="enabled\n")), (r"^systemctl is-active", Result())]})
    h = run.session("postfix01")
    dbproxy.proxysql(h)
    assert h.changes[-1] == dbproxy.proxysql_admin(dbproxy.PROXYSQL_RELOAD)
    assert h.stdins[-1][1] == f"[client]\nuser=admin\npassword={SECRET('proxysql_admin_password')}\n"
    assert SECRET("proxysql_admin_password") not in " ".join(h.commands)
    words = shlex.split(h.changes[-1])
    assert words[:5] == ["mysql", "--defaults-extra-file=/dev/stdin", "-h", "127.0.0.1", "-P"]
    assert words[-1] == "; ".join(dbproxy.PROXYSQL_RELOAD)  # one quoted word, whatever it holds
