"""Monitoring tier (seed 004's mon1server, for both systems): Prometheus with
Alertmanager and the blackbox exporter on the monitoring host, an exporter for
every tier on the hosts that run it.

Runbook of `inv monitoring.deploy`:
1. Preflight (before any host is touched): the inventory has a `monitoring`
   section and one monitoring host; alerts go out by mail through the mail
   cluster (the mail VIP's name, port 25) or `monitoring.smarthost`.
2. Exporters, each listening on the host's address that the monitoring host
   reaches (topology.scrape_address; the firewall opens the port to the
   monitoring host only) — which host runs which is topology.EXPORTERS:
   - node exporter on every host;
   - postgres exporter on the PostgreSQL hosts: its role `prometheus`, member of
     pg_monitor and nothing else, created on the primary; it connects over the
     local socket with peer authentication (the OS user is the role), so there
     is no password at all to keep;
   - mysqld exporter on the Galera nodes: account `exporter`@localhost with
     PROCESS only (the pxc tier creates it; generated password, in a file only
     the exporter's group reads), over the socket;
   - ha_cluster exporter on the Pacemaker nodes; postfix exporter on the mail
     back ends (its showq socket, the mail log); HAProxy's own endpoint (the
     dbproxy tier adds it); nginx exporter on the webmail front ends (nginx's
     stub_status on 127.0.0.1 only).
3. The monitoring host: Prometheus (127.0.0.1:9090; its scrape targets are
   generated from the inventory, each with `instance` = the host's name and
   `system` = mail/xmpp; rules checked with `promtool check rules`, the config
   with `promtool check config` before they replace the live ones), the blackbox
   exporter (127.0.0.1:9115) probing what users see — SMTP submission with
   STARTTLS and IMAPS on the mail VIP, HTTPS on the webmail VIP, XMPP with
   direct TLS (5223) on the xmpp VIP, each certificate checked against our CA —,
   Alertmanager (127.0.0.1:9093, mail to `monitoring.alert_email`), and nginx
   serving both UIs over HTTPS with the host's certificate and basic auth
   (user `admin`, generated password: `inv monitoring.web` says where) on the
   management address.
4. Grafana only with `monitoring.grafana: true` (its APT repository; see grafana.py).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from invoke import Collection

from ..core import HostFailed, UserError, runbook, topology
from ..core.secrets import stable_bcrypt

if TYPE_CHECKING:
    from ..core import HostSession, Run
    from ..core.inventory import Inventory

ROLE = topology.MONITORING
SERVER_PACKAGES = ["prometheus", "prometheus-alertmanager", "prometheus-blackbox-exporter", "nginx"]
PROMETHEUS = "127.0.0.1:9090"
ALERTMANAGER = "127.0.0.1:9093"
BLACKBOX = "127.0.0.1:9115"
WEB_USER = "admin"
WEB_SECRET = "monitoring_web_password"
HTPASSWD = "/etc/nginx/hastack-monitoring.htpasswd"
PG_ROLE = "prometheus"  # the postgres exporter's role (peer authentication: the OS user)
MYSQLD_CNF = "/etc/prometheus/mysqld-exporter.cnf"
MYSQLD_SOCKET = "/run/mysqld/mysqld.sock"
TEXTFILE_DIR = "/var/lib/prometheus/node-exporter"  # node exporter's textfile collector (backups write here)
STUB_STATUS = "127.0.0.1:8080"
MAIL_LOG = "/var/log/mail.log"


# --- what the inventory says ---------------------------------------------------------------


def monitoring_host(inv: Inventory) -> str | None:
    return topology.monitoring_host(inv)


def system_of(inv: Inventory, host: str) -> str:
    """`system` label: the seed a host belongs to (mail cluster or XMPP service)."""
    mail = {topology.WEBMAIL, topology.MAIL_BACKEND, topology.GALERA}
    return "mail" if mail & set(inv.hosts[host].roles) else "xmpp"


def scrape_jobs(inv: Inventory) -> dict[str, list[dict]]:
    """job -> targets ({address, instance, system}), from the inventory's roles."""
    jobs: dict[str, list[dict]] = {}
    for host in inv.hosts:
        for e in topology.exporters(inv, host):
            if e.vip in inv.vips:  # once, on the VIP, named after it
                target = {"address": f"{inv.vips[e.vip].address}:{e.port}", "instance": e.vip,
                          "system": system_of(inv, host)}
            else:
                target = {"address": f"{topology.scrape_address(inv, host)}:{e.port}", "instance": host,
                          "system": system_of(inv, host)}
            if target not in jobs.setdefault(e.job, []):
                jobs[e.job].append(target)
    return jobs


def probes(inv: Inventory) -> list[dict]:
    """What users see, by VIP: {module, vip, target} for the blackbox exporter.
    A VIP is probed by its first name (the name its certificate is checked for)."""
    out = []
    wanted = {"mail": [("smtp_starttls", "{}:587"), ("imaps", "{}:993")],
              "webmail": [("https", "https://{}/")],
              # XMPP over direct TLS (5223): the blackbox exporter reads its answers by lines,
              # and an XMPP stream has none, so a STARTTLS dialogue on 5222 can only time out.
              "xmpp": [("xmpps", "{}:5223")]}
    for vip_name, modules in wanted.items():
        vip = inv.vips.get(vip_name)
        if vip is None or not vip.names:
            continue
        for module, form in modules:
            out.append({"module": module, "vip": vip_name, "target": form.format(vip.names[0])})
    return out


def smarthost(inv: Inventory) -> str:
    """Where Alertmanager hands its mail: monitoring.smarthost, else the mail VIP's name, port 25."""
    if inv.monitoring is not None and inv.monitoring.smarthost:
        return inv.monitoring.smarthost
    vip = inv.vips.get("mail")
    return f"{vip.names[0]}:25" if vip is not None and vip.names else ""


def web_names(inv: Inventory, host: str) -> list[str]:
    return [inv.fqdn(host), host]


def template_vars(inv: Inventory, host: str, secret) -> dict:
    """Everything the tier's templates see (exporters, server, Grafana)."""
    from . import grafana

    return {**exporter_vars(inv, host, secret), **server_vars(inv, host, secret),
            **grafana.template_vars(inv, host, secret)}


def server_vars(inv: Inventory, host: str, secret) -> dict:
    from ..core.inventory import Monitoring
    from .rules import rule_vars

    mon = inv.monitoring or Monitoring(alert_email=f"root@{inv.site.domain}")
    return {
        "jobs": scrape_jobs(inv),
        "probes": probes(inv),
        "scrape_interval": f"{mon.scrape_interval}s",
        "prometheus": PROMETHEUS,
        "alertmanager": ALERTMANAGER,
        "blackbox": BLACKBOX,
        "external_url": f"https://{inv.fqdn(host)}",
        "alert_email": mon.alert_email,
        "smarthost": smarthost(inv) or "localhost:25",
        "smtp_name": (smarthost(inv) or "localhost:25").rsplit(":", 1)[0],
        "mail_from": f"alertmanager@{inv.mail.domain if inv.mail else inv.site.domain}",
        "ca": topology.CA_FILE,
        "cert": topology.cert_path(host),
        "key": topology.key_path(host),
        "web_listen": inv.management_address(host),
        "server_names": web_names(inv, host),
        "htpasswd": HTPASSWD,
        "htpasswd_line": f"{WEB_USER}:{stable_bcrypt(secret(WEB_SECRET), 'monitoring-web')}",
        "xmpp_domain": topology.xmpp_domain(inv) if inv.xmpp else "",
        **rule_vars(inv),
    }


def exporter_vars(inv: Inventory, host: str, secret) -> dict:
    jobs = {e.job for e in topology.exporters(inv, host)}
    return {
        "listen": topology.scrape_address(inv, host),
        "ports": {e.job: e.port for e in topology.EXPORTERS},
        "textfile_dir": TEXTFILE_DIR,
        "pg_role": PG_ROLE,
        "mysqld_cnf": MYSQLD_CNF,
        "mysqld_socket": MYSQLD_SOCKET,
        "mysqld_password": secret(topology.account_secret(inv, "exporter")) if "mysqld" in jobs else "",
        "stub_status": STUB_STATUS,
        "mail_log": MAIL_LOG,
    }


# --- runbook ------------------------------------------------------------------------------


def preflight(run: Run) -> None:
    inv = run.inv
    if inv.monitoring is None:
        return
    if monitoring_host(inv) is None:
        raise UserError(f"{inv.path}: monitoring: no host has role monitoring")
    if not smarthost(inv):
        raise UserError(f"{inv.path}: monitoring.smarthost is not set and there is no mail VIP with a name: "
                        "Alertmanager needs a mail server for monitoring.alert_email")


def converge(run: Run) -> None:
    inv = run.inv
    if inv.monitoring is None:
        return
    preflight(run)
    run.secrets.get(WEB_SECRET)
    exporting, mon = _targets(run)
    primary = [h for h in inv.with_role(topology.PG_PRIMARY) if h in run.hosts()]
    if primary:
        run.step("monitoring: postgres exporter's role", primary, _pg_role)
    run.step("monitoring: exporters", exporting, exporters)
    if mon:
        run.step("monitoring: Prometheus, Alertmanager, blackbox, nginx", [mon], server)
        if inv.monitoring.grafana:
            from . import grafana

            run.step("monitoring: Grafana", [mon], lambda h: grafana.converge(h, h.tier_vars(grafana.template_vars)))


def install(run: Run, among: set[str] | None = None) -> None:
    """Only the packages, installed stopped (nothing here needs the systems), on
    the selected hosts ``among`` these: `deploy.all` runs this beside them;
    converge() finds them installed then."""
    if run.inv.monitoring is None:
        return
    exporting, mon = _targets(run, among)
    run.step("monitoring: exporter packages", exporting, _exporter_packages)
    if mon:
        run.step("monitoring: server packages", [mon], _server_packages)


def _targets(run: Run, among: set[str] | None = None) -> tuple[list[str], str | None]:
    """The selected hosts (``among`` these) that get exporters, and the monitoring
    host when it is selected."""
    selected = [h for h in run.hosts() if among is None or h in among]
    exporting = [h for h in run.inv.hosts if topology.exporters(run.inv, h) and h in selected]
    mon = monitoring_host(run.inv)
    return exporting, mon if mon in selected else None


def _exporter_packages(h: HostSession) -> None:
    # installed stopped: Debian starts each with its defaults (no account, no
    # stub_status yet), it fails and hits its start limit
    h.packages([e.package for e in topology.exporters(h.inv, h.name) if e.package], no_start=True)


def _server_packages(h: HostSession) -> None:
    h.packages(SERVER_PACKAGES, no_start=True)


def _pg_role(h: HostSession) -> None:
    from ..core.sql import pg_ident, pg_literal, psql_c

    row = h.probe(psql_c(
        f"SELECT rolcanlogin::text || ':' || pg_has_role({pg_literal(PG_ROLE)}, 'pg_monitor', 'MEMBER')::text "
        f"FROM pg_roles WHERE rolname = {pg_literal(PG_ROLE)}"))
    if not row.ok and not h.run.check:
        raise HostFailed(f"cannot ask PostgreSQL for role {PG_ROLE}: {row.stderr.strip()}")
    have = row.stdout.strip()
    if have == "true:true":
        h.ok(f"role {PG_ROLE}: login (peer, no password), member of pg_monitor")
        return
    verb = "ALTER" if have else "CREATE"
    h.sh(psql_c(f"{verb} ROLE {pg_ident(PG_ROLE)} WITH LOGIN NOSUPERUSER NOCREATEDB NOCREATEROLE; "
                f"GRANT pg_monitor TO {pg_ident(PG_ROLE)}"),
         message=f"role {PG_ROLE}: login over the local socket only (peer), member of pg_monitor")


def exporters(h: HostSession) -> None:
    """The exporters of this host's roles, each on the address the monitoring host scrapes."""
    inv = h.inv
    wanted = topology.exporters(inv, h.name)
    _exporter_packages(h)
    v = h.tier_vars(exporter_vars)  # not the server's (rules, htpasswd hash, Grafana secrets) on every host
    for e in wanted:
        if e.package is None:
            h.ok(f"{e.job}: served by the service itself on port {e.port}")
            continue
        getattr(_Exporters, e.job)(h, v, e)


class _Exporters:
    """One function per exporter: its settings, then its unit."""

    @staticmethod
    def node(h: HostSession, v: dict, e) -> None:
        h.directory(TEXTFILE_DIR, owner="prometheus", group="prometheus")
        changed = h.template("monitoring/etc/default/prometheus-node-exporter.j2",
                             "/etc/default/prometheus-node-exporter", v)
        h.service(e.package, restart=changed)

    @staticmethod
    def postgres(h: HostSession, v: dict, e) -> None:
        changed = h.template("monitoring/etc/default/prometheus-postgres-exporter.j2",
                             "/etc/default/prometheus-postgres-exporter", v)
        h.service(e.package, restart=changed)

    @staticmethod
    def mysqld(h: HostSession, v: dict, e) -> None:
        cnf = h.template("monitoring/etc/prometheus/mysqld-exporter.cnf.j2", MYSQLD_CNF, v,
                         group="prometheus", mode="0640")
        args = h.template("monitoring/etc/default/prometheus-mysqld-exporter.j2",
                          "/etc/default/prometheus-mysqld-exporter", v)
        h.service(e.package, restart=cnf or args)

    @staticmethod
    def hacluster(h: HostSession, v: dict, e) -> None:
        h.directory("/etc/sysconfig")
        changed = h.template("monitoring/etc/sysconfig/prometheus-ha_cluster_exporter.j2",
                             "/etc/sysconfig/prometheus-ha_cluster_exporter", v)
        h.service(e.unit, restart=changed)

    @staticmethod
    def postfix(h: HostSession, v: dict, e) -> None:
        # showq sits in postfix's public/ (group postdrop); the mail log is rsyslog's
        # (group adm, as Debian's log readers): made now when postfix has not logged
        # yet, so the exporter finds it and the setting does not change later.
        groups = h.in_group("prometheus", "postdrop", "postfix's showq socket")
        log = "/dev/null"
        if h.installed("rsyslog"):
            log = MAIL_LOG
            h.ensure(f"test -e {MAIL_LOG}", f"install -m 0640 -o root -g adm /dev/null {MAIL_LOG}",
                     f"{MAIL_LOG} exists (rsyslog appends to it)")
            groups |= h.in_group("prometheus", "adm", "reads the mail log")
        changed = h.template("monitoring/etc/default/prometheus-postfix-exporter.j2",
                             "/etc/default/prometheus-postfix-exporter", {**v, "mail_log": log})
        h.service(e.package, restart=changed or groups)  # a running process keeps its old groups

    @staticmethod
    def nginx(h: HostSession, v: dict, e) -> None:
        site = h.nginx_site("hastack-stub-status", "monitoring/etc/nginx/sites-available/hastack-stub-status.j2", v)
        h.service("nginx", reload=site)
        changed = h.template("monitoring/etc/default/prometheus-nginx-exporter.j2",
                             "/etc/default/prometheus-nginx-exporter", v)
        h.service(e.package, restart=changed)


def server(h: HostSession) -> None:
    """Prometheus, its rules, the blackbox exporter, Alertmanager and nginx on the monitoring host."""
    topology.require_certificate(h)
    _server_packages(h)
    v = h.tier_vars(template_vars)
    h.directory("/etc/prometheus/rules")
    rules = h.template("monitoring/etc/prometheus/rules/hastack.rules.yml.j2",
                       "/etc/prometheus/rules/hastack.rules.yml", v, validate="promtool check rules {} >/dev/null")
    config = h.template("monitoring/etc/prometheus/prometheus.yml.j2", "/etc/prometheus/prometheus.yml", v,
                        validate="promtool check config --syntax-only {} >/dev/null")
    args = h.template("monitoring/etc/default/prometheus.j2", "/etc/default/prometheus", v)
    h.service("prometheus", restart=args, reload=rules or config)
    bb = h.template("monitoring/etc/prometheus/blackbox.yml.j2", "/etc/prometheus/blackbox.yml", v,
                    validate="prometheus-blackbox-exporter --config.check --config.file={} >/dev/null 2>&1")
    bb_args = h.template("monitoring/etc/default/prometheus-blackbox-exporter.j2",
                         "/etc/default/prometheus-blackbox-exporter", v)
    h.service("prometheus-blackbox-exporter", restart=bb or bb_args)
    am = h.template("monitoring/etc/prometheus/alertmanager.yml.j2", "/etc/prometheus/alertmanager.yml", v,
                    group="prometheus", mode="0640", validate="amtool check-config {} >/dev/null")
    am_args = h.template("monitoring/etc/default/prometheus-alertmanager.j2",
                         "/etc/default/prometheus-alertmanager", v)
    h.service("prometheus-alertmanager", restart=am_args, reload=am)
    h.template("monitoring/etc/nginx/hastack-monitoring.htpasswd.j2", HTPASSWD, v, group="www-data", mode="0640")
    site = h.nginx_site("hastack-monitoring", "monitoring/etc/nginx/sites-available/hastack-monitoring.j2", v)
    h.service("nginx", reload=site)


# --- tasks ------------------------------------------------------------------------------------


@runbook
def deploy(run):
    """Exporters on every host, Prometheus + Alertmanager + blackbox probes + nginx on the monitoring host."""
    converge(run)


@runbook(readonly=True)
def web(run):
    """Where the monitoring UIs are and how to log in (the password stays in the secrets file)."""
    mon = monitoring_host(run.inv)
    if mon is None:
        raise UserError(f"{run.inv.path}: no monitoring section or no host with role monitoring")
    url = f"https://{run.inv.fqdn(mon)}"
    run.report.note(f"Prometheus {url}/ and Alertmanager {url}/alertmanager/ (management network, "
                    f"{run.inv.management_address(mon)}): user {WEB_USER}, password '{WEB_SECRET}' in "
                    f"{run.secrets.path}")


ns = Collection("monitoring", deploy, web)
