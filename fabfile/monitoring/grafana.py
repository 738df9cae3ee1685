"""Grafana on the monitoring host (production only: `monitoring.grafana: true`).
Debian 12 has no Grafana; it comes from Grafana Labs' APT repository. The lab
cannot reach that repository, so the lab never runs this (see the README's
fidelity table); the unit tests run it on recording hosts.

What `converge(h, v)` does on the monitoring host, top to bottom:
1. Grafana's signing key: kept in /etc/apt/keyrings/grafana.asc while that
   keyring holds exactly our pinned key (`KEY_FINGERPRINT`), unrevoked and valid
   for more than `KEY_REFRESH_DAYS` days. Otherwise the key file is fetched on
   the host (`KEY_URL`, into a throw-away GnuPG home), the pinned key must be in
   it (a download without it stops the host, nothing changed), and only that
   key is written to the keyring (the file Grafana publishes also carries its
   retired keys: they are never trusted here).
2. The repository (`deb [signed-by=<keyring>] https://apt.grafana.com stable
   main`), apt-get update when the key or the source changed, the `grafana`
   package.
3. grafana.ini: HTTPS on port 3000 of the management address with the host's
   certificate from our CA (user grafana joins ssl-cert to read the key, like
   the other tiers' daemons), the admin password and secret key from the
   secrets store, no sign-up, no anonymous access, no analytics, no update or
   plugin-update checks, no external snapshots, no news feed.
4. Provisioning: the Prometheus datasource (uid `prometheus`,
   http://127.0.0.1:9090, Prometheus's scrape interval as its time interval) and
   a file provider for the dashboards (folder "hastack", read-only: edits in
   the UI are refused, a removed file removes its dashboard).
5. The dashboards: configs/monitoring/var/lib/grafana/dashboards/hastack/*.json
   as they are (not templates), into /var/lib/grafana/dashboards/hastack
   (root-owned, grafana reads them); a JSON file there that we no longer ship is
   removed.
6. grafana-server enabled and running, restarted when its config, its
   provisioning or its groups changed; then the admin password: grafana.ini's
   only seeds the first start, so it is tried against the API and, when
   Grafana refuses it, set with `grafana cli admin reset-admin-password`
   (on standard input).

The dashboards query the scrape conventions of this tier: every target has
labels `instance` (inventory host name) and `system` (mail|xmpp); `EXPORTED`
lists, per job, the metric names they use, each checked against the source of
the exporter version Debian 12 ships.
"""

from __future__ import annotations

import ast
import json
import re
import time
from pathlib import Path
from typing import TYPE_CHECKING

from ..core import HostFailed, UserError, q, templates, topology

if TYPE_CHECKING:
    from ..core import HostSession
    from ..core.inventory import Inventory

# --- the repository and its key -------------------------------------------------------------

REPO_URL = "https://apt.grafana.com"
REPO_SUITE, REPO_COMPONENT = "stable", "main"
# Grafana Labs' APT signing key (rsa3072, "Grafana Labs <engineering@grafana.com>",
# created 2023-08-24 after the rotation of 0E22EB88..., expiry extended since).
# Published on https://apt.grafana.com and in Grafana's install docs; a key with
# another fingerprint stops the run: a rotation is for a human to check.
KEY_FINGERPRINT = "B53AE77BADB630A683046005963FA27710458545"
# Grafana's install docs (2026) fetch gpg-full.key: the key above with its
# current expiry, plus Grafana's retired keys (which only the fingerprint
# check keeps out of our keyring).
KEY_URL = f"{REPO_URL}/gpg-full.key"
KEYRINGS_DIR = "/etc/apt/keyrings"
KEYRING = f"{KEYRINGS_DIR}/grafana.asc"
KEY_REFRESH_DAYS = 30  # fetch the key again when ours expires sooner than this
SOURCES_LIST = "/etc/apt/sources.list.d/grafana.list"
KEY_TOOLS = ["ca-certificates", "curl", "gpg"]
PACKAGES = ["grafana"]
_KEY_MARK = "#hastack-exported-key#"

# --- Grafana ---------------------------------------------------------------------------------

SERVICE = "grafana-server"
USER = GROUP = "grafana"
PORT = 3000
ETC = "/etc/grafana"
INI = f"{ETC}/grafana.ini"
HOME = "/usr/share/grafana"
DATA = "/var/lib/grafana"
PROVISIONING = f"{ETC}/provisioning"
DATASOURCES_YAML = f"{PROVISIONING}/datasources/hastack.yaml"
DASHBOARDS_YAML = f"{PROVISIONING}/dashboards/hastack.yaml"
DASHBOARDS_DIR = f"{DATA}/dashboards/hastack"
DASHBOARDS_SOURCE = "monitoring/var/lib/grafana/dashboards/hastack"  # under configs/
DASHBOARD_FOLDER = "hastack"
ADMIN_USER = "admin"
ADMIN_PASSWORD_SECRET = "grafana_admin_password"
SECRET_KEY_SECRET = "grafana_secret_key"  # encrypts what Grafana stores; generated once, never changed
DATASOURCE_UID = "prometheus"
PROMETHEUS_URL = "http://127.0.0.1:9090"  # Prometheus listens on localhost on the monitoring host
DEFAULT_SCRAPE_INTERVAL = 15

TEMPLATES = {  # configs/<name> -> where it lands
    "monitoring/etc/grafana/grafana.ini.j2": INI,
    "monitoring/etc/grafana/provisioning/datasources/hastack.yaml.j2": DATASOURCES_YAML,
    "monitoring/etc/grafana/provisioning/dashboards/hastack.yaml.j2": DASHBOARDS_YAML,
}


def _ini_secret(name: str, value: str) -> str:
    """A secret grafana.ini holds in triple quotes (so that # and ; stay part of
    it): it must not be able to end them."""
    if not value or '"' in value or any(ord(c) < 32 or ord(c) == 127 for c in value):
        raise UserError(f"secret '{name}' cannot go into grafana.ini: it is empty or holds a double quote "
                        "or a control character")
    return value


def template_vars(inv: Inventory, host: str, secret) -> dict:
    mon = inv.monitoring
    address = inv.management_address(host)
    return {
        "grafana_http_addr": address,  # the operators reach it on the management network only
        "grafana_port": PORT,
        "grafana_root_url": f"https://{address}:{PORT}/",
        "grafana_cert": topology.cert_path(host),
        "grafana_key": topology.key_path(host),
        "grafana_paths": {"data": DATA, "logs": "/var/log/grafana", "plugins": f"{DATA}/plugins",
                          "provisioning": PROVISIONING},
        "grafana_admin_user": ADMIN_USER,
        "grafana_admin_password": _ini_secret(ADMIN_PASSWORD_SECRET, secret(ADMIN_PASSWORD_SECRET)),
        "grafana_secret_key": _ini_secret(SECRET_KEY_SECRET, secret(SECRET_KEY_SECRET)),
        "grafana_datasource_uid": DATASOURCE_UID,
        "grafana_prometheus_url": PROMETHEUS_URL,
        "grafana_scrape_interval": f"{mon.scrape_interval if mon else DEFAULT_SCRAPE_INTERVAL}s",
        "grafana_dashboards_dir": DASHBOARDS_DIR,
        "grafana_dashboard_folder": DASHBOARD_FOLDER,
    }


def sources_list() -> str:
    return (f"# {templates.HEADER_MARK} (fabfile/monitoring/grafana.py): local edits are overwritten "
            "on the next deploy.\n"
            f"# Grafana Labs' repository (Debian 12 has no Grafana), trusted with their key only.\n"
            f"deb [signed-by={KEYRING}] {REPO_URL} {REPO_SUITE} {REPO_COMPONENT}\n")


# --- the signing key -----------------------------------------------------------------------------


def primary_keys(colons: str) -> dict[str, tuple[str, int | None]]:
    """`gpg --with-colons` listing -> {primary key fingerprint: (validity, expiry epoch or None)}."""
    keys: dict[str, tuple[str, int | None]] = {}
    pending: tuple[str, int | None] | None = None
    for line in colons.splitlines():
        f = line.split(":")
        if f[0] == "pub":
            pending = (f[1] if len(f) > 1 else "", int(f[6]) if len(f) > 6 and f[6].isdigit() else None)
        elif f[0] == "fpr" and pending is not None and len(f) > 9:
            keys[f[9].upper()] = pending
            pending = None
        elif f[0] in ("sub", "sec", "ssb"):
            pending = None
    return keys


def _usable(key: tuple[str, int | None] | None, now: float, margin_days: int = 0) -> bool:
    """Not revoked, expired or invalid, and valid for ``margin_days`` more days."""
    if key is None:
        return False
    validity, expires = key
    if validity in ("r", "e", "i", "d", "n"):
        return False
    return expires is None or expires > now + margin_days * 86400


# gpg in a throw-away home ($d), so that reading a key leaves nothing behind (not even /root/.gnupg).
_SCRATCH = "d=$(mktemp -d) && trap 'gpgconf --homedir \"$d\" --kill all 2>/dev/null; rm -rf \"$d\"' EXIT"
_GPG = 'gpg --batch --no-tty --homedir "$d"'
_SCRATCH_GPG = f"{_SCRATCH} && {_GPG}"


def _fetch_key_command(proxy: str | None = None) -> str:
    """On the host, read-only: the key file from KEY_URL (through the site's apt
    proxy when it has one, as apt will reach the repository) imported into a
    throw-away GnuPG home; prints its keys (colon listing), a mark, then our key
    alone, armored."""
    via = f"--proxy {q(proxy)} " if proxy else ""
    return (f"{_SCRATCH} && curl -fsSL --max-time 60 {via}-o \"$d/key\" {q(KEY_URL)} && "
            f"{_GPG} --quiet --import \"$d/key\" && "
            f"{_GPG} --with-colons --list-keys && echo {q(_KEY_MARK)} && "
            f"{_GPG} --armor --export-options export-minimal --export {q(KEY_FINGERPRINT)}")


def signing_key(h: HostSession, *, now: float | None = None) -> bool:
    """Step 1: the keyring holds our pinned key, and nothing else. Returns changed."""
    now = time.time() if now is None else now
    have = h.probe(f"test -s {q(KEYRING)} && {_SCRATCH_GPG} --show-keys --with-colons {q(KEYRING)}")
    if have.ok:
        keys = primary_keys(have.stdout)
        if set(keys) == {KEY_FINGERPRINT} and _usable(keys[KEY_FINGERPRINT], now, KEY_REFRESH_DAYS):
            expires = keys[KEY_FINGERPRINT][1]
            until = time.strftime("%Y-%m-%d", time.gmtime(expires)) if expires else "no expiry"
            h.ok(f"{KEYRING}: Grafana's key {KEY_FINGERPRINT} (valid until {until})")
            return False
    if h.run.check and not all(h.installed(p) for p in ("curl", "gpg")):
        h.changed(f"would fetch {KEY_URL} and keep key {KEY_FINGERPRINT} in {KEYRING}")
        return True
    out = h.read(_fetch_key_command(h.inv.site.apt_proxy))
    listing, _, armored = out.partition(_KEY_MARK + "\n")
    keys = primary_keys(listing)
    if KEY_FINGERPRINT not in keys or "BEGIN PGP PUBLIC KEY BLOCK" not in armored:
        found = ", ".join(sorted(keys)) or "no key"
        raise HostFailed(f"{KEY_URL} holds {found}, not Grafana's pinned signing key {KEY_FINGERPRINT}: "
                         "refusing to trust it (nothing was changed). If Grafana Labs rotated their key, "
                         "check the new fingerprint on https://apt.grafana.com and update "
                         "KEY_FINGERPRINT in fabfile/monitoring/grafana.py")
    if not _usable(keys[KEY_FINGERPRINT], now):
        raise HostFailed(f"{KEY_URL}: Grafana's key {KEY_FINGERPRINT} is revoked or expired "
                         "(nothing was changed)")
    if not _usable(keys[KEY_FINGERPRINT], now, KEY_REFRESH_DAYS):
        h.note(f"Grafana's signing key {KEY_FINGERPRINT} expires within {KEY_REFRESH_DAYS} days and "
               f"{KEY_URL} has no later one yet")
    h.directory(KEYRINGS_DIR)
    return h.put(armored.strip() + "\n", KEYRING, mode="0644")


# --- converge ------------------------------------------------------------------------------------


def dashboard_files() -> list[Path]:
    """The dashboards we ship, sorted by name."""
    return sorted((templates.CONFIGS / DASHBOARDS_SOURCE).glob("*.json"))


def _curl_config(user: str, password: str) -> str:
    """curl's config-file syntax (`-K -`): the credentials go on standard input."""
    quoted = (user + ":" + password).replace("\\", "\\\\").replace('"', '\\"')
    return f'user = "{quoted}"\n'


def converge(h: HostSession, v: dict) -> None:
    """Grafana from its APT repository on the monitoring host, provisioned (see the module docstring)."""
    h.packages(KEY_TOOLS)
    changed = signing_key(h)
    changed |= h.put(sources_list(), SOURCES_LIST)
    if changed:
        h.apt_update()
    h.packages(PACKAGES)
    restart = topology.key_reader(h, USER, "grafana-server reads the host key")
    for name, dest in TEMPLATES.items():
        restart |= h.template(name, dest, v, group=GROUP, mode="0640")
    _dashboards(h)
    h.service(SERVICE, restart=restart)
    admin_password(h, v)


def _dashboards(h: HostSession) -> None:
    """The shipped dashboards, as they are; a JSON file there that we do not ship goes."""
    h.directory(f"{DATA}/dashboards", group=GROUP)
    h.directory(DASHBOARDS_DIR, group=GROUP)
    ours = {f.name for f in dashboard_files()}
    for f in dashboard_files():
        h.put(templates.static(f"{DASHBOARDS_SOURCE}/{f.name}"), f"{DASHBOARDS_DIR}/{f.name}", group=GROUP)
    listed = h.probe(f"find {q(DASHBOARDS_DIR)} -maxdepth 1 -type f -name '*.json' -printf '%f\\n'")
    stale = sorted(set(listed.stdout.split()) - ours) if listed.ok else []
    for name in stale:
        h.sh(f"rm -f {q(DASHBOARDS_DIR + '/' + name)}", message=f"dashboard {name} removed (no longer shipped)")


def admin_password(h: HostSession, v: dict) -> None:
    """The admin password Grafana checks is the one in the secrets (grafana.ini's
    admin_password only seeds the first start)."""
    url = f"https://{v['grafana_http_addr']}:{PORT}"
    curl = f"curl -sS --max-time 10 --cacert {q(topology.CA_FILE)}"
    if h.run.check and not h.probe(f"systemctl is-active -q {SERVICE}").ok:
        h.changed(f"would check Grafana's admin password on {url} once it runs")
        return
    h.wait_for(f"{curl} -f -o /dev/null {q(url + '/api/health')}", timeout=120, what=f"Grafana answering on {url}")
    password = v["grafana_admin_password"]
    r = h.probe(f"{curl} -o /dev/null -w '%{{http_code}}' -K - {q(url + '/api/user')}",
                stdin=_curl_config(ADMIN_USER, password))
    code = r.stdout.strip()
    if code == "200":
        h.ok(f"Grafana's {ADMIN_USER} password is the one in the secrets")
        return
    if code != "401":
        raise HostFailed(f"{url}/api/user answered {code or 'nothing'} to the admin login: "
                         + (r.stderr.strip() or "expected 200 or 401"))
    h.sh(f"runuser -u {USER} -- grafana cli --homepath {HOME} --config {INI} "
         "admin reset-admin-password --password-from-stdin",
         stdin=password + "\n", message=f"Grafana's {ADMIN_USER} password set from the secrets")


# --- the metric names the dashboards query ---------------------------------------------------------
#
# Per scrape job, the names our dashboards use, each read in the exporter's source
# at the version Debian 12 ships (tag in brackets):
EXPORTED: dict[str, frozenset[str]] = {
    # Prometheus adds these to every target of every job (scrape/scrape.go [v2.42.0]).
    "*": frozenset({"up", "scrape_duration_seconds"}),
    # node_exporter [v1.5.0]: collector/{cpu_linux,loadavg,meminfo,filesystem_common,
    # diskstats_common,netdev_common (legacy errs/drop names),timex,time,stat_linux,
    # vmstat_linux,filefd_linux,uname,textfile}.go, all default collectors. The textfile
    # collector also exposes what the backup jobs write (the hastack_ name).
    "node": frozenset({
        "node_cpu_seconds_total", "node_load5",
        "node_memory_MemAvailable_bytes", "node_memory_MemTotal_bytes",
        "node_memory_SwapTotal_bytes", "node_memory_SwapFree_bytes",
        "node_filesystem_avail_bytes", "node_filesystem_size_bytes", "node_filesystem_readonly",
        "node_disk_read_bytes_total", "node_disk_written_bytes_total", "node_disk_io_time_seconds_total",
        "node_network_receive_bytes_total", "node_network_transmit_bytes_total",
        "node_network_receive_errs_total", "node_network_transmit_errs_total",
        "node_network_receive_drop_total", "node_network_transmit_drop_total",
        "node_timex_offset_seconds", "node_timex_sync_status",
        "node_time_seconds", "node_boot_time_seconds", "node_vmstat_oom_kill",
        "node_filefd_allocated", "node_filefd_maximum", "node_uname_info",
        "node_textfile_mtime_seconds", "node_textfile_scrape_error",
        "hastack_backup_last_success_timestamp_seconds",
    }),
    # postgres_exporter [v0.11.1]: cmd/postgres_exporter/postgres_exporter.go
    # (builtinMetricMaps: <view>_<column>; pg_up), pg_setting.go (pg_settings_<name>),
    # collector/pg_database.go (pg_database_size_bytes).
    "postgres": frozenset({
        "pg_up", "pg_stat_database_xact_commit",
        "pg_stat_database_xact_rollback", "pg_stat_database_deadlocks", "pg_stat_database_conflicts",
        "pg_stat_database_blks_hit", "pg_stat_database_blks_read",
        "pg_stat_replication_pg_wal_lsn_diff", "pg_replication_slots_active",
        "pg_replication_slots_pg_wal_lsn_diff", "pg_stat_activity_count", "pg_stat_activity_max_tx_duration",
        "pg_settings_max_connections", "pg_database_size_bytes", "pg_locks_count",
        "pg_stat_archiver_archived_count", "pg_stat_archiver_failed_count", "pg_stat_archiver_last_archive_age",
    }),
    # mysqld_exporter [v0.14.0]: collector/global_status.go (every numeric SHOW GLOBAL
    # STATUS variable as mysql_global_status_<lower-cased name>; Primary/ON -> 1,
    # non-Primary/OFF -> 0; wsrep_evs_repl_latency -> mysql_galera_evs_repl_latency_*),
    # global_variables.go, exporter.go (mysql_up). The wsrep_* variables are Galera's.
    "mysqld": frozenset({
        "mysql_up", "mysql_global_status_wsrep_cluster_size", "mysql_global_status_wsrep_cluster_status",
        "mysql_global_status_wsrep_local_state", "mysql_global_status_wsrep_ready",
        "mysql_global_status_wsrep_connected", "mysql_global_status_wsrep_flow_control_paused",
        "mysql_global_status_wsrep_local_recv_queue", "mysql_global_status_wsrep_local_send_queue",
        "mysql_global_status_wsrep_local_cert_failures", "mysql_global_status_wsrep_local_bf_aborts",
        "mysql_global_status_wsrep_replicated_bytes", "mysql_global_status_wsrep_received_bytes",
        "mysql_galera_evs_repl_latency_avg_seconds",
        "mysql_global_status_threads_connected", "mysql_global_status_threads_running",
        "mysql_global_status_queries", "mysql_global_status_slow_queries",
        "mysql_global_status_aborted_connects", "mysql_global_variables_max_connections",
    }),
    # ha_cluster_exporter [1.3.1]: collector/{pacemaker,corosync,drbd}/*.go (SetDescriptor),
    # namespace ha_cluster (collector/default_collector.go).
    "hacluster": frozenset({
        "ha_cluster_pacemaker_nodes", "ha_cluster_pacemaker_resources", "ha_cluster_pacemaker_fail_count",
        "ha_cluster_pacemaker_stonith_enabled", "ha_cluster_corosync_quorate", "ha_cluster_corosync_member_votes",
        "ha_cluster_corosync_ring_errors", "ha_cluster_drbd_resources", "ha_cluster_drbd_connections",
        "ha_cluster_drbd_connections_sync", "ha_cluster_drbd_split_brain",
    }),
    # HAProxy 2.6's built-in exporter [v2.6.0]: addons/promex/README and
    # service-prometheus.c (status metrics carry a `state` label).
    "haproxy": frozenset({
        "haproxy_server_status", "haproxy_backend_active_servers", "haproxy_frontend_current_sessions",
        "haproxy_server_current_sessions", "haproxy_server_connection_errors_total",
        "haproxy_server_check_failures_total",
    }),
    # postfix_exporter [0.3.0]: postfix_exporter.go (showq histograms per queue, the
    # log counters; postfix_up per source path).
    "postfix": frozenset({
        "postfix_up", "postfix_showq_message_size_bytes_count", "postfix_smtpd_connects_total",
        "postfix_smtpd_messages_rejected_total", "postfix_smtpd_sasl_authentication_failures_total",
        "postfix_smtp_deferred_messages_total", "postfix_qmgr_messages_removed_total",
    }),
    # nginx-prometheus-exporter [v0.11.0]: collector/nginx.go, collector/helper.go.
    "nginx": frozenset({"nginx_up", "nginx_connections_active", "nginx_http_requests_total"}),
    # blackbox_exporter [v0.23.0]: prober/handler.go, prober/prober.go (TLS, also after STARTTLS).
    "probe": frozenset({"probe_success", "probe_duration_seconds", "probe_ssl_earliest_cert_expiry"}),
    # Prometheus [v2.42.0]: rules/manager.go, notifier/notifier.go, tsdb/head.go, cmd/prometheus/main.go.
    "prometheus": frozenset({
        "prometheus_tsdb_head_series", "prometheus_rule_evaluation_failures_total",
        "prometheus_notifications_dropped_total", "prometheus_notifications_errors_total",
        "prometheus_config_last_reload_successful",
    }),
    # Alertmanager [v0.25.0]: provider/mem/mem.go, notify/notify.go, config/coordinator.go.
    "alertmanager": frozenset({
        "alertmanager_alerts", "alertmanager_notifications_failed_total",
        "alertmanager_config_last_reload_successful",
    }),
}

# Names that exist only once something happened (a live Prometheus may not know
# them yet): the first NOQUEUE reject, a DRBD split brain, the first backup.
EVENT_ONLY = frozenset({
    "postfix_smtpd_messages_rejected_total", "ha_cluster_drbd_split_brain",
    "hastack_backup_last_success_timestamp_seconds",
})


def exported_names() -> frozenset[str]:
    return frozenset().union(*EXPORTED.values())


# --- PromQL: the metric names an expression selects ------------------------------------------------
#
# promtool parses an expression but does not list what it selects, so here is a
# small lexer after Prometheus 2.42's promql/parser/lex.go: an identifier is a
# metric name unless it is a function (then "(" follows), an aggregation or a
# keyword (case-insensitive, as in Prometheus), a number (Inf, NaN) or a label:
# inside {...} (a __name__="x" matcher names metric x), or in the list after
# by/without/on/ignoring/group_left/group_right. Strings, comments and [ranges]
# are skipped whole.

FUNCTIONS = frozenset({  # promql/parser/functions.go [v2.42.0]
    "abs", "absent", "absent_over_time", "acos", "acosh", "asin", "asinh", "atan", "atanh", "avg_over_time",
    "ceil", "changes", "clamp", "clamp_max", "clamp_min", "cos", "cosh", "count_over_time", "days_in_month",
    "day_of_month", "day_of_week", "day_of_year", "deg", "delta", "deriv", "exp", "floor", "histogram_count",
    "histogram_sum", "histogram_fraction", "histogram_quantile", "holt_winters", "hour", "idelta", "increase",
    "irate", "label_replace", "label_join", "last_over_time", "ln", "log10", "log2", "max_over_time",
    "min_over_time", "minute", "month", "pi", "predict_linear", "present_over_time", "quantile_over_time",
    "rad", "rate", "resets", "round", "scalar", "sgn", "sin", "sinh", "sort", "sort_desc", "sqrt",
    "stddev_over_time", "stdvar_over_time", "sum_over_time", "tan", "tanh", "time", "timestamp", "vector",
    "year",
})
AGGREGATIONS = frozenset({"sum", "avg", "count", "min", "max", "group", "stddev", "stdvar", "topk", "bottomk",
                          "count_values", "quantile"})
LABEL_LISTS = frozenset({"by", "without", "on", "ignoring", "group_left", "group_right"})
KEYWORDS = frozenset({"and", "or", "unless", "atan2", "offset", "bool", "start", "end", "inf", "nan"}) | LABEL_LISTS

_TOKEN = re.compile(r"""
    (?P<space>\s+)
  | (?P<comment>\#[^\n]*)
  | (?P<string>"(?:[^"\\\n]|\\.)*"|'(?:[^'\\\n]|\\.)*'|`[^`]*`)
  | (?P<duration>(?:\d+(?:ms|[smhdwy]))+)(?![\w:.])
  | (?P<number>0[xX][0-9a-fA-F]+|(?:\d+\.?\d*|\.\d+)(?:[eE][+-]?\d+)?)
  | (?P<ident>[a-zA-Z_:][a-zA-Z0-9_:]*)
  | (?P<op>=~|!~|!=|==|<=|>=|[-+*/%^<>=(){}\[\],@:])
""", re.X)


def promql_tokens(expr: str) -> list[tuple[str, str]]:
    """(kind, text) of each token, without spaces and comments; ValueError on a character PromQL has not."""
    out, pos = [], 0
    while pos < len(expr):
        m = _TOKEN.match(expr, pos)
        if m is None:
            raise ValueError(f"PromQL: unexpected {expr[pos:pos + 10]!r} at {pos} in {expr!r}")
        if m.lastgroup not in ("space", "comment"):
            out.append((m.lastgroup, m.group()))
        pos = m.end()
    return out


def _unquote(s: str) -> str:
    return s[1:-1] if s[0] == "`" else ast.literal_eval(s)


def _closing(tokens: list[tuple[str, str]], i: int, open_: str, close: str) -> int:
    """Index of the token closing the bracket at ``i``."""
    depth = 0
    for j in range(i, len(tokens)):
        if tokens[j] == ("op", open_):
            depth += 1
        elif tokens[j] == ("op", close):
            depth -= 1
            if depth == 0:
                return j
    raise ValueError(f"PromQL: unclosed {open_!r}")


def promql_metrics(expr: str) -> set[str]:
    """The metric names a PromQL expression selects."""
    tokens = promql_tokens(expr)
    stack: list[str] = []
    for kind, text in tokens:
        if kind == "op" and text in "({[":
            stack.append({"(": ")", "{": "}", "[": "]"}[text])
        elif kind == "op" and text in ")}]" and (not stack or stack.pop() != text):
            raise ValueError(f"PromQL: unbalanced {text!r} in {expr!r}")
    if stack:
        raise ValueError(f"PromQL: unclosed bracket (expected {stack[-1]!r}) in {expr!r}")
    names: set[str] = set()
    i = 0
    while i < len(tokens):
        kind, text = tokens[i]
        nxt = tokens[i + 1] if i + 1 < len(tokens) else ("", "")
        if (kind, text) == ("op", "{"):
            end = _closing(tokens, i, "{", "}")
            inner = tokens[i + 1:end]
            for k, (_, label) in enumerate(inner):
                if label == "__name__" and k + 2 < len(inner) and inner[k + 2][0] == "string":
                    if inner[k + 1][1] != "=":
                        raise ValueError(f"PromQL: a {inner[k + 1][1]} matcher on __name__ names no metric: {expr!r}")
                    names.add(_unquote(inner[k + 2][1]))
            i = end + 1
            continue
        if (kind, text) == ("op", "["):
            i = _closing(tokens, i, "[", "]") + 1
            continue
        if kind == "ident":
            word = text.lower()
            if word in LABEL_LISTS and nxt == ("op", "("):
                i = _closing(tokens, i + 1, "(", ")") + 1
                continue
            if nxt == ("op", "(") and word not in AGGREGATIONS and word not in KEYWORDS:
                if text not in FUNCTIONS:
                    raise ValueError(f"PromQL: unknown function {text}() in {expr!r}")
            elif word not in AGGREGATIONS and word not in KEYWORDS:
                names.add(text)
        i += 1
    return names


# --- the dashboards' queries -----------------------------------------------------------------------

# Grafana's built-in interval variables, as promtool may see them.
GRAFANA_INTERVALS = {"__rate_interval": "5m", "__interval": "1m", "__range": "1h", "__range_s": "3600",
                     "__range_ms": "3600000", "__interval_ms": "60000"}
_GRAFANA_VAR = re.compile(r"\$\{([A-Za-z_]\w*)(?::[^}]*)?\}|\$([A-Za-z_]\w*)|\[\[([A-Za-z_]\w*)(?::[^\]]*)?\]\]")
_VARIABLE_QUERY = re.compile(r"^\s*(label_values|query_result)\((.*)\)\s*$", re.S)


def grafana_to_promql(expr: str) -> str:
    """A panel's expression with Grafana's variables replaced: its interval
    variables by durations, a dashboard variable (used inside label values) by a word."""
    def one(m: re.Match) -> str:
        name = m.group(1) or m.group(2) or m.group(3)
        return GRAFANA_INTERVALS.get(name, "grafana_var")
    return _GRAFANA_VAR.sub(one, expr)


def _variable_expr(query: str) -> str | None:
    """The PromQL inside a Prometheus template variable's query (label_values(EXPR, label),
    query_result(EXPR)); None for one that holds none (label_values(label), label_names())."""
    m = _VARIABLE_QUERY.match(query)
    if m is None:
        return None
    args = m.group(2)
    if m.group(1) == "query_result":
        return args
    depth, quote = 0, ""
    for k, c in enumerate(args):  # label_values(EXPR, label): the last top-level comma
        if quote:
            quote = "" if c == quote and args[k - 1] != "\\" else quote
        elif c in "\"'`":
            quote = c
        elif c in "({[":
            depth += 1
        elif c in ")}]":
            depth -= 1
        elif c == "," and depth == 0:
            return args[:k] if args[k + 1:].strip().isidentifier() else None
    return None


def _panels(panels: list[dict]):
    for p in panels:
        yield p
        yield from _panels(p.get("panels", []))


def dashboard_queries(dashboard: dict) -> list[str]:
    """Every PromQL expression of a dashboard, as written (with Grafana's variables):
    its panels' targets and its template variables' queries."""
    exprs = [t["expr"] for p in _panels(dashboard.get("panels", [])) for t in p.get("targets", []) if t.get("expr")]
    for var in dashboard.get("templating", {}).get("list", []):
        if var.get("type") == "query":
            query = var.get("query")
            query = query.get("query", "") if isinstance(query, dict) else query or ""
            inner = _variable_expr(query)
            if inner:
                exprs.append(inner)
    return exprs


def dashboard_metrics() -> dict[str, set[str]]:
    """Dashboard file name -> the metric names its queries select."""
    out = {}
    for f in dashboard_files():
        dashboard = json.loads(f.read_text())
        out[f.name] = set().union(*(promql_metrics(grafana_to_promql(e)) for e in dashboard_queries(dashboard)))
    return out
