"""The site inventory: one YAML file describing hosts, networks, VIPs and stacks.

It is parsed by pydantic (structure, types, unknown keys), then checked for the
things a schema cannot say (addresses inside their networks, role counts, ...).
Every problem is reported as ``file: key.path: message``; nothing connects to a
host before the inventory is valid.
"""

from __future__ import annotations

import ipaddress
import re
import zoneinfo
from collections import Counter
from functools import cached_property
from pathlib import Path
from typing import Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from .errors import UserError

ROLES = {
    # mail cluster
    "webmail": "nginx + php-fpm + Roundcube front end, keepalived VIP",
    "mail_backend": "Pacemaker/Corosync node: DRBD, postfix, dovecot, DB proxy, Postfixadmin",
    "galera": "Percona XtraDB Cluster / MariaDB Galera node",
    # XMPP service
    "ejabberd": "clustered ejabberd node",
    "postgres_primary": "PostgreSQL primary",
    "postgres_replica": "PostgreSQL streaming replica",
    "gateway": "router between the DMZ and the internal network",
    "backup": "Bacula director/storage, WAL archive",
    "monitoring": "Prometheus + Grafana",
    "spare": "spare host for rescue procedures",
}
Role = Literal[tuple(ROLES)]  # type: ignore[valid-type]
Name = str

# Every pattern is used with re.fullmatch (a trailing newline never passes).
LABEL = r"[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?"
HOST_NAME = re.compile(LABEL)  # hostnames, FQDNs and certificate names are made of it
NETWORK_NAME = re.compile(r"[a-z][a-z0-9_]{0,11}")  # becomes a NIC name in the lab (15 characters with a prefix)
DNS_NAME = re.compile(rf"(?=.{{1,253}}$)({LABEL}\.)+[a-z]([a-z0-9-]{{0,61}}[a-z0-9])?")
ZONE = re.compile(r"[A-Za-z][A-Za-z0-9_+-]*(/[A-Za-z0-9_+-]+)*")
MODULE = re.compile(r"[a-z0-9_]{1,64}")
UNIX_USER = re.compile(r"[a-z_][a-z0-9_-]{0,31}")
XMPP_ADMIN = re.compile(r"[a-z0-9._-]{1,64}(@" + DNS_NAME.pattern + ")?")
PROXY_URL = re.compile(r"https?://[A-Za-z0-9.-]+(:[0-9]{1,5})?/?")
CONTROL = re.compile(r"[\x00-\x1f\x7f]")


def is_dns_name(value: str) -> bool:
    return bool(DNS_NAME.fullmatch(value or ""))


def is_zone(value: str) -> bool:
    """A time zone name that names a zone of the IANA database (as tzdata installs it)."""
    if not ZONE.fullmatch(value or "") or ".." in value:
        return False
    try:
        zones = zoneinfo.available_timezones()
    except Exception:  # pragma: no cover - no tz database on this machine
        zones = set()
    return value in zones if zones else True


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Network(_Model):
    cidr: ipaddress.IPv4Network
    management: bool = False
    description: str = ""


class Host(_Model):
    roles: list[Role] = Field(default_factory=list)
    addresses: dict[Name, ipaddress.IPv4Address]
    # Kernel modules the host's services need (drbd, nfsd); the container lab
    # cannot load them, see the README's fidelity table.
    kernel_modules: list[str] = Field(default_factory=list)
    cpus: int = Field(default=1, ge=1)
    memory_mb: int = Field(default=1024, ge=256)
    # Extra disks (GiB) a VM gets, e.g. the DRBD backing disk on mail back ends.
    disks_gb: list[int] = Field(default_factory=list)


class Vip(_Model):
    address: ipaddress.IPv4Address
    network: Name
    role: Role
    names: list[str] = Field(default_factory=list)


class Ssh(_Model):
    user: str = "root"
    port: int = Field(default=22, ge=1, le=65535)
    # Relative paths are relative to the inventory file's folder.
    key_file: str | None = None
    known_hosts: str | None = None
    connect_timeout: float = Field(default=10, gt=0)


class Site(_Model):
    name: str = Field(pattern=r"^[a-z][a-z0-9-]*$")
    domain: str = Field(pattern=r"^([a-z0-9-]+\.)+[a-z]{2,}$|^[a-z0-9-]+\.(local|lan|lab|test|internal)$")
    apt_proxy: str | None = Field(default=None, pattern=r"^https?://")
    timezone: str = "UTC"


# The DRBD backing device (mail.drbd_backing): a whole disk that becomes an LVM PV.
BLOCK_DEVICE = re.compile(r"/dev/[A-Za-z0-9_+:.-]+(/[A-Za-z0-9_+:.-]+)*")
LVM_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.+-]{0,126}")
LV_SIZE = re.compile(r"(100|[1-9][0-9]?)%(FREE|VG)|[1-9][0-9]*(\.[0-9]+)?[KMGT]")


class DrbdBacking(_Model):
    """Where the DRBD resource's backing device comes from: the logical volume
    /dev/<volume_group>/<volume>, made (by the drbd tier) on ``disk`` when the
    volume group does not exist yet; a disk that holds anything is refused."""

    # The whole disk that becomes the volume group's physical volume (empty, no partitions).
    disk: str = "/dev/vdb"
    volume_group: str = "vg0"
    volume: str = "mail"
    # lvcreate's size: PERCENT%FREE or PERCENT%VG (-l), or a size such as 900M or 20G (-L).
    size: str = "100%FREE"

    @field_validator("disk")
    @classmethod
    def _disk(cls, value: str) -> str:
        from pydantic_core import PydanticCustomError

        if not BLOCK_DEVICE.fullmatch(value) or "/../" in f"{value}/" or "/./" in f"{value}/":
            raise PydanticCustomError(
                "disk", "not a device path: give a path under /dev such as /dev/vdb or "
                "/dev/disk/by-id/NAME (letters, digits, '_', '+', ':', '.', '-'; no . or ..)")
        return value

    @field_validator("volume_group", "volume", "size")
    @classmethod
    def _lvm_word(cls, value: str, info) -> str:
        from pydantic_core import PydanticCustomError

        pattern, code, message = (
            (LV_SIZE, "lv_size", "not a volume size: PERCENT%FREE or PERCENT%VG (1-100, e.g. 100%FREE), or a "
             "size such as 900M or 20G (K, M, G, T)") if info.field_name == "size" else
            (LVM_NAME, "lvm_name", "not an LVM name: a letter or digit, then letters, digits, '_', '.', '+', '-' "
             "(at most 127)"))
        if not pattern.fullmatch(value):
            raise PydanticCustomError(code, message)
        return value

    @property
    def device(self) -> str:
        """The DRBD backing device: the logical volume."""
        return f"/dev/{self.volume_group}/{self.volume}"

    @property
    def lvcreate_size(self) -> tuple[str, str]:
        """lvcreate's size option and its value: ("-l", "100%FREE") or ("-L", "20G")."""
        return ("-l" if "%" in self.size else "-L", self.size)


class MailStack(_Model):
    domain: str
    galera_flavour: Literal["percona", "mariadb"] = "percona"
    db_proxy: Literal["proxysql", "haproxy"] = "proxysql"
    storage: Literal["drbd", "none"] = "drbd"
    drbd_version: Literal[8, 9] = 8
    # The backing device of the DRBD resource on every node (mail.storage: drbd).
    drbd_backing: DrbdBacking = DrbdBacking()
    fence_agent: Literal["fence_virsh", "fence_vbox", "fence_ipmilan", "fence_lab", "none"] = "fence_virsh"
    # The mailbox postmaster@DOMAIN and abuse@DOMAIN forward to: a local part of
    # the mail domain or a full address. Unset: the mail tier creates neither alias.
    postmaster: str | None = None

    @field_validator("postmaster")
    @classmethod
    def _postmaster_is_a_mailbox(cls, value: str | None, info) -> str | None:
        from pydantic_core import PydanticCustomError

        if value is None:
            return None
        local_re = r"[a-z0-9_+-]+(\.[a-z0-9_+-]+)*"  # what `inv mail.add-mailbox` accepts, lower case
        if not re.fullmatch(rf"{local_re}(@{DNS_NAME.pattern})?", value) or len(value.split("@")[0]) > 64:
            raise PydanticCustomError(
                "mailbox", "not a mailbox: give a local part of the mail domain (lower-case letters, digits, "
                "'.', '_', '+', '-'; no leading, trailing or double dot; at most 64) or a full LOCAL@DOMAIN")
        domain = info.data.get("domain")
        if value in ("postmaster", "abuse", f"postmaster@{domain}", f"abuse@{domain}"):
            raise PydanticCustomError(
                "mailbox", "postmaster@ and abuse@ would forward to themselves: name the mailbox that reads them")
        return value

    @property
    def postmaster_address(self) -> str | None:
        """mail.postmaster as a full address (a local part is in the mail domain)."""
        if self.postmaster is None:
            return None
        return self.postmaster if "@" in self.postmaster else f"{self.postmaster}@{self.domain}"


class XmppStack(_Model):
    domain: str
    admins: list[str] = Field(default_factory=list)


# Roundcube plugins Debian 12 ships (roundcube-core + roundcube-plugins 1.6): the
# only names `webmail.plugins` accepts (a plugin that is not there breaks every page).
ROUNDCUBE_PLUGINS = (
    "acl", "additional_message_headers", "archive", "attachment_reminder", "autologon", "autologout",
    "database_attachments", "debug_logger", "emoticons", "enigma", "example_addressbook",
    "filesystem_attachments", "help", "hide_blockquote", "http_authentication", "identicon",
    "identity_select", "jqueryui", "krb_authentication", "managesieve", "markasjunk", "new_user_dialog",
    "new_user_identity", "newmail_notifier", "password", "reconnect", "redundant_attachments",
    "show_additional_headers", "squirrelmail_usercopy", "subscriptions_option", "userinfo",
    "vcard_attachments", "virtuser_file", "virtuser_query", "zipdownload",
)


class Postgres(_Model):
    """PostgreSQL settings of the XMPP service (tier postgres)."""

    # A commit is acknowledged once a standby has it too (synchronous_standby_names:
    # ANY 1 of the replicas). When no standby has streamed for synchronous_timeout
    # seconds, the primary's guard turns it off until one streams again (the README's
    # PostgreSQL section says why and what it costs).
    synchronous: bool = False
    synchronous_timeout: int = Field(default=10, ge=1, le=3600)


class Webmail(_Model):
    """The webmail front ends (Roundcube on the hosts with role webmail)."""

    # The name on the login page and in the title; default "<site name> webmail".
    product_name: str | None = Field(default=None, min_length=1, max_length=64)
    # The networks whose hosts may open the webmail VIP's 80/443 (default: every
    # network the VIP's hosts are on, but the management one).
    client_networks: list[Name] | None = None
    plugins: list[str] = Field(default_factory=lambda: ["password", "managesieve", "archive", "zipdownload"])
    # Shown as "Get support" on the login page when set.
    support_url: str | None = Field(default=None, pattern=r"^https?://[^\s'\"<>]+$")


EMAIL = re.compile(r"[a-z0-9_+-]+(\.[a-z0-9_+-]+)*@" + DNS_NAME.pattern)


class Thresholds(_Model):
    """Where the alerts fire (the rules' defaults follow the community mixins)."""

    disk_free_percent: float = Field(default=10, gt=0, lt=100)  # a filesystem with less free space
    memory_available_percent: float = Field(default=10, gt=0, lt=100)  # MemAvailable below this
    replication_lag_seconds: float = Field(default=30, gt=0)  # a PostgreSQL replica further behind
    certificate_days: int = Field(default=21, ge=1, le=3650)  # a certificate expiring sooner
    backup_age_hours: float = Field(default=26, gt=0)  # the last good backup older than this


class Monitoring(_Model):
    """Prometheus, Alertmanager and the exporters (the host with role monitoring)."""

    # Where Alertmanager sends the alerts (through the mail cluster when there is one).
    alert_email: str
    # HOST:PORT of the mail server Alertmanager hands its mail to; default: the
    # mail VIP's name, port 25 (the mail cluster of the same inventory).
    smarthost: str | None = Field(default=None, pattern=r"^[a-z0-9.-]+:[0-9]{1,5}$")
    # Production: add Grafana's APT repository and provision its dashboards. The
    # lab cannot reach it (see the README's fidelity table).
    grafana: bool = False
    thresholds: Thresholds = Thresholds()
    # How often Prometheus scrapes and evaluates its rules (seconds).
    scrape_interval: int = Field(default=15, ge=1, le=300)


BACKUP_JOB = re.compile(r"[a-z][a-z0-9-]{0,39}")
ABS_PATH = r"^/([A-Za-z0-9._+-]+/?)*$"
ONCALENDAR = r"^[A-Za-z0-9 ,:*./~-]+$"  # a systemd OnCalendar expression (checked by systemd-analyze on the host)


class BackupJob(_Model):
    """One Bacula job: what one client sends to the backup host (seed 004's jobs)."""

    client: Name
    # The fileset: absolute paths on the client, less `exclude` (paths below them:
    # files a live service rewrites while they are read, e.g. Prometheus's WAL).
    paths: list[str] = Field(default_factory=list)
    exclude: list[str] = Field(default_factory=list)
    # A PostgreSQL database dumped (pg_dump, ClientRunBeforeJob) on the client just
    # before the job, and removed after it; the dump's folder is added to the fileset.
    pg_dump: str | None = Field(default=None, pattern=r"^[a-z_][a-z0-9_-]{0,62}$")
    # The seed's two cycles: monthly (Full on the 1st, Differential on the 15th,
    # Incremental the other days, at 01:00) or hourly (Full at 01:00, Differential
    # at 13:00, Incremental every other hour). Default: hourly for a dump, else monthly.
    schedule: Literal["monthly", "hourly"] | None = None

    @field_validator("paths", "exclude")
    @classmethod
    def _absolute(cls, value: list[str]) -> list[str]:
        from pydantic_core import PydanticCustomError

        for path in value:
            if not re.fullmatch(ABS_PATH, path) or "/../" in f"{path}/" or "/./" in f"{path}/":
                raise PydanticCustomError("path", "not an absolute path without . or ..: {path!r}", {"path": path})
        return value


class Backup(_Model):
    """Backups (seed 004): Bacula on the host with role backup, and the WAL archive
    and base backups of the PostgreSQL hosts."""

    # The storage daemon's file volumes on the backup host.
    volume_dir: str = Field(default="/srv/bacula/volumes", pattern=ABS_PATH)
    # Bacula jobs by name (the seed's e1-fs, psql2-dump, mon1-grfn, ...).
    jobs: dict[str, BackupJob] = Field(default_factory=dict)
    # The seed's retention cycle, per pool (Volume Retention in days).
    full_retention_days: int = Field(default=29, ge=1, le=3650)
    diff_retention_days: int = Field(default=29, ge=1, le=3650)
    incr_retention_days: int = Field(default=7, ge=1, le=3650)
    # The WAL archive and base backups of the PostgreSQL hosts: `pgbackrest` (its
    # repository on the backup host, TLS with the site's CA; runs in containers) or
    # `nfs` (the seed's: an NFS export on the backup host; needs the nfsd module).
    wal_archive: Literal["pgbackrest", "nfs"] = "pgbackrest"
    wal_archive_dir: str = Field(default="/srv/pgbackrest", pattern=ABS_PATH)
    # When base backups run (systemd OnCalendar, on the backup host), and how many full ones are kept.
    base_backup_full: str = Field(default="Sun *-*-* 01:30", pattern=ONCALENDAR)
    base_backup_diff: str = Field(default="Mon..Sat *-*-* 01:30", pattern=ONCALENDAR)
    base_backups_kept: int = Field(default=2, ge=1, le=100)


class Lab(_Model):
    """Settings only the embedded lab reads (bridge names, cached root)."""

    bridge_prefix: str = Field(default="hal", pattern=r"^[a-z][a-z0-9]{0,5}$")
    stand_ins: dict[str, str] = Field(default_factory=dict)


class Inventory(_Model):
    site: Site
    ssh: Ssh = Ssh()
    networks: dict[Name, Network]
    hosts: dict[Name, Host]
    vips: dict[Name, Vip] = Field(default_factory=dict)
    mail: MailStack | None = None
    xmpp: XmppStack | None = None
    postgres: Postgres = Postgres()
    webmail: Webmail | None = None
    monitoring: Monitoring | None = None
    backup: Backup = Backup()
    lab: Lab | None = None

    # Set by load(); not part of the YAML.
    path: Path = Field(default=Path("inventory.yml"), exclude=True)
    # Roles the roles file (<stem>.roles.yml, written by rescue tasks) put over the
    # inventory's: {host: the inventory's own roles}, for the hosts it changed.
    overridden: dict[str, list[str]] = Field(default_factory=dict, exclude=True)
    # Hosts the roles file retired (replaced by a spare: `inv rescue.replace`): left out
    # of this inventory, {host: its entry in the inventory file}.
    retired: dict[str, dict] = Field(default_factory=dict, exclude=True)

    # --- what the tiers ask -------------------------------------------------

    @property
    def backup_jobs(self) -> dict[str, "BackupJob"]:
        """backup.jobs without those of retired hosts (a rescue replaced them)."""
        return {n: j for n, j in self.backup.jobs.items() if j.client not in self.retired}

    @cached_property
    def management_network(self) -> str:
        return next(name for name, net in self.networks.items() if net.management)

    def management_address(self, host: str) -> str:
        return str(self.hosts[host].addresses[self.management_network])

    def with_role(self, *roles: str) -> list[str]:
        """Host names carrying any of ``roles``, in inventory order."""
        return [name for name, host in self.hosts.items() if set(roles) & set(host.roles)]

    def fqdn(self, host: str) -> str:
        return f"{host}.{self.site.domain}"

    def select(self, spec: str | None) -> list[str]:
        """The hosts an operator named with --hosts (comma-separated), in inventory
        order; None: every host. An empty list, an empty name between commas or an
        unknown host is a UserError naming it."""
        if spec is None:
            return list(self.hosts)
        if not isinstance(spec, str):
            raise UserError(f"--hosts must be comma-separated host names, not {spec!r}")
        parts = [h.strip() for h in spec.split(",")]
        if not any(parts):
            raise UserError(f"--hosts {spec!r} names no host: give comma-separated inventory names "
                            f"(known: {', '.join(self.hosts)}), or leave --hosts out for every host")
        if not all(parts):
            raise UserError(f"--hosts {spec!r} has an empty name between commas")
        unknown = sorted(set(parts) - set(self.hosts))
        if unknown:
            raise UserError(f"{self.path}: --hosts names unknown host(s): {', '.join(unknown)} "
                            f"(known: {', '.join(self.hosts)})")
        return [h for h in self.hosts if h in parts]

    def non_management(self, host: str) -> dict[str, ipaddress.IPv4Address]:
        """A host's addresses on every network but the management one."""
        mgmt = self.management_network
        return {net: a for net, a in self.hosts[host].addresses.items() if net != mgmt}

    def service_address(self, host: str) -> str:
        """The address a host's services answer on: outside the management network,
        on the first of its networks that another host of its roles is on too (a
        spare on the DMZ and the internal network serves an ejabberd role on the
        DMZ, a PostgreSQL role on the internal one), else its first one; the
        management address for a host with no other."""
        others = self.non_management(host)
        if not others:
            return self.management_address(host)
        if len(others) > 1 and self.hosts[host].roles:
            peers = [p for p in self.with_role(*self.hosts[host].roles) if p != host]
            for net, address in others.items():
                if any(net in self.hosts[p].addresses for p in peers):
                    return str(address)
        return str(next(iter(others.values())))

    def peer_addresses(self, src: str, target: str) -> list[str]:
        """The addresses ``src`` talks to ``target`` from (as /32 CIDRs): its address
        on a (non-management) network they share; across the gateway its own
        segment address(es) a gateway routes to the target's (or all of them); the
        management address for a host with no other."""
        mine, theirs = self.non_management(src), self.non_management(target)
        shared = [a for net, a in mine.items() if net in theirs]
        if shared:
            return [f"{a}/32" for a in shared]
        segments = [set(self.non_management(g)) for g in self.with_role("gateway")]
        routed = [a for net, a in mine.items() if any(net in segs and segs & set(theirs) for segs in segments)]
        if routed:  # across a gateway: from the segment(s) it routes to the target's
            return [f"{a}/32" for a in routed]
        if mine:
            return [f"{a}/32" for a in mine.values()]
        return [f"{self.management_address(src)}/32"]

    @property
    def folder(self) -> Path:
        return self.path.parent

    def site_file(self, suffix: str) -> Path:
        """A per-site file beside the inventory, e.g. lab.secrets.yml."""
        return self.folder / f"{self.path.stem}.{suffix}"

    @property
    def roles_file(self) -> Path:
        """Where rescue tasks record role changes (lab.roles.yml beside lab.yml)."""
        return self.site_file("roles.yml")

    @property
    def key_file(self) -> Path:
        return self._resolve(self.ssh.key_file) or self.site_file("id_ed25519")

    @property
    def known_hosts_file(self) -> Path:
        return self._resolve(self.ssh.known_hosts) or self.site_file("known_hosts")

    def _resolve(self, value: str | None) -> Path | None:
        if value is None:
            return None
        p = Path(value).expanduser()
        return p if p.is_absolute() else self.folder / p

    # --- checks a schema cannot express -------------------------------------

    def problems(self) -> list[tuple[str, str]]:
        found: list[tuple[str, str]] = []
        add = lambda path, msg: found.append((path, msg))  # noqa: E731

        # Names that end up in shells, hostnames, certificates and config files.
        for name in self.hosts:
            if not HOST_NAME.fullmatch(name):
                add(f"hosts.{name!r}", "a host name must be one DNS label: lower-case letters, digits and '-', "
                    "not starting or ending with '-', at most 63 characters")
        for name, net in self.networks.items():
            if not NETWORK_NAME.fullmatch(name):
                add(f"networks.{name!r}", "a network name must be a lower-case letter followed by at most 11 "
                    "lower-case letters, digits or '_' (it names the hosts' NICs)")
            if CONTROL.search(net.description):
                add(f"networks.{name}.description", "control characters (newlines, tabs, ...) are not allowed")
        for name in self.vips:
            if not NETWORK_NAME.fullmatch(name):
                add(f"vips.{name!r}", "a VIP name must be a lower-case letter followed by at most 11 "
                    "lower-case letters, digits or '_'")
        if not is_dns_name(self.site.domain):
            add("site.domain", f"{self.site.domain!r} is not a DNS name")
        if not is_zone(self.site.timezone):
            add("site.timezone", f"{self.site.timezone!r} does not name a time zone (e.g. UTC, Europe/Moscow)")
        if self.site.apt_proxy is not None and not PROXY_URL.fullmatch(self.site.apt_proxy):
            add("site.apt_proxy", f"{self.site.apt_proxy!r} is not an http(s)://HOST[:PORT] URL")
        if not UNIX_USER.fullmatch(self.ssh.user):
            add("ssh.user", f"{self.ssh.user!r} is not a user name")
        for name, host in self.hosts.items():
            for module in host.kernel_modules:
                if not MODULE.fullmatch(module):
                    add(f"hosts.{name}.kernel_modules", f"{module!r} is not a kernel module name")
        for name, vip in self.vips.items():
            for dns in vip.names:
                if not is_dns_name(dns):
                    add(f"vips.{name}.names", f"{dns!r} is not a DNS name")
        if self.mail is not None and not is_dns_name(self.mail.domain):
            add("mail.domain", f"{self.mail.domain!r} is not a DNS name")
        if self.xmpp is not None:
            if not is_dns_name(self.xmpp.domain):
                add("xmpp.domain", f"{self.xmpp.domain!r} is not a DNS name")
            for admin in self.xmpp.admins:
                if not XMPP_ADMIN.fullmatch(admin):
                    add("xmpp.admins", f"{admin!r} is not a user name (letters, digits, '.', '_', '-') or JID")

        managements = [n for n, net in self.networks.items() if net.management]
        if len(managements) != 1:
            add("networks", f"exactly one network must have 'management: true' (found {len(managements)})")
        for a, b in _pairs(list(self.networks.items())):
            if a[1].cidr.overlaps(b[1].cidr):
                add(f"networks.{b[0]}.cidr", f"{b[1].cidr} overlaps network {a[0]} ({a[1].cidr})")

        seen: dict[ipaddress.IPv4Address, str] = {}
        for name, host in self.hosts.items():
            if managements and managements[0] not in host.addresses:
                add(f"hosts.{name}.addresses", f"no address on the management network '{managements[0]}'")
            for net, addr in host.addresses.items():
                where = f"hosts.{name}.addresses.{net}"
                if net not in self.networks:
                    add(where, f"unknown network '{net}' (known: {', '.join(self.networks)})")
                    continue
                cidr = self.networks[net].cidr
                if addr not in cidr:
                    add(where, f"{addr} is outside network {net} ({cidr})")
                elif addr in (cidr.network_address, cidr.broadcast_address):
                    add(where, f"{addr} is the network or broadcast address of {cidr}")
                if addr in seen:
                    add(where, f"address {addr} is already used by {seen[addr]}")
                else:
                    seen[addr] = f"hosts.{name}.addresses.{net}"

        for name, vip in self.vips.items():
            where = f"vips.{name}"
            if vip.network not in self.networks:
                add(f"{where}.network", f"unknown network '{vip.network}'")
                continue
            cidr = self.networks[vip.network].cidr
            if vip.address not in cidr:
                add(f"{where}.address", f"{vip.address} is outside network {vip.network} ({cidr})")
            carriers = self.with_role(vip.role)
            if not carriers:
                add(f"{where}.role", f"no host has role '{vip.role}' to carry this VIP")
            for host in carriers:
                if vip.network not in self.hosts[host].addresses:
                    add(f"{where}.network", f"host {host} (role {vip.role}) has no address on network {vip.network}")
            if vip.address in seen:
                add(f"{where}.address", f"address {vip.address} is already used by {seen[vip.address]}")
            else:
                seen[vip.address] = where

        if self.webmail is not None:
            for i, net in enumerate(self.webmail.client_networks or []):
                if net not in self.networks:
                    add(f"webmail.client_networks.{i}", f"unknown network '{net}'")
            for i, plugin in enumerate(self.webmail.plugins):
                if plugin not in ROUNDCUBE_PLUGINS:
                    add(f"webmail.plugins.{i}", f"'{plugin}' is not a Roundcube plugin Debian ships "
                        f"(known: {', '.join(ROUNDCUBE_PLUGINS)})")
            if self.webmail.product_name is not None and CONTROL.search(self.webmail.product_name):
                add("webmail.product_name", "control characters are not allowed")

        counts = Counter(role for host in self.hosts.values() for role in host.roles)
        if self.monitoring is not None:
            if not EMAIL.fullmatch(self.monitoring.alert_email) or len(self.monitoring.alert_email) > 254:
                add("monitoring.alert_email", f"{self.monitoring.alert_email!r} is not an e-mail address "
                    "(LOCAL@DOMAIN, lower case)")
            if counts["monitoring"] != 1:
                add("monitoring", "the monitoring section needs exactly one host with role monitoring "
                    f"(found {counts['monitoring']})")
        if self.mail is not None:
            galera = counts["galera"]
            if galera < 3 or galera % 2 == 0:
                add("hosts", f"role galera needs an odd number of hosts, at least 3 (found {galera})")
            if counts["mail_backend"] < 2:
                add("hosts", f"role mail_backend (Pacemaker) needs at least 2 hosts (found {counts['mail_backend']})")
        if self.xmpp is not None:
            if counts["ejabberd"] < 1:
                add("hosts", "role ejabberd needs at least 1 host (found 0)")
            if counts["postgres_primary"] != 1:
                add("hosts", f"role postgres_primary needs exactly 1 host (found {counts['postgres_primary']})")
        if self.backup_jobs and counts["backup"] != 1:
            add("backup.jobs", f"Bacula jobs need exactly one host with role backup (found {counts['backup']})")
        if counts["backup"] > 1:
            add("hosts", f"role backup needs at most 1 host (found {counts['backup']})")
        for name, job in self.backup.jobs.items():
            where = f"backup.jobs.{name}"
            if not BACKUP_JOB.fullmatch(name):
                add(where, "not a job name (lower-case letters, digits and '-', starting with a letter, at most 40)")
            if job.client in self.retired:
                continue  # replaced by a spare (rescue.replace): the job waits for the inventory's edit
            if job.client not in self.hosts:
                add(f"{where}.client", f"unknown host '{job.client}'")
            elif job.pg_dump is not None and job.client not in self.overridden and not {
                    "postgres_primary", "postgres_replica"} & set(self.hosts[job.client].roles):
                add(f"{where}.pg_dump", f"{job.client} is not a PostgreSQL host (pg_dump runs on the client)")
            if not job.paths and job.pg_dump is None:
                add(where, "nothing to back up: give paths, pg_dump or both")
            for i, path in enumerate(job.exclude):
                if not any(path.rstrip("/").startswith(p.rstrip("/") + "/") for p in job.paths):
                    add(f"{where}.exclude.{i}", f"{path} is below none of the job's paths")
        for role in ("galera", "mail_backend", "webmail") if self.mail is None else ():
            if counts[role]:
                add("mail", f"hosts have role {role} but the inventory has no 'mail' section")
        for role in ("ejabberd", "postgres_primary", "postgres_replica") if self.xmpp is None else ():
            if counts[role]:
                add("xmpp", f"hosts have role {role} but the inventory has no 'xmpp' section")
        return found


def _pairs(items):
    for i, a in enumerate(items):
        for b in items[i + 1 :]:
            yield a, b


class InventoryError(UserError):
    def __init__(self, path: Path | str, problems: list[tuple[str, str]]):
        self.path = str(path)
        self.problems = problems
        lines = [f"{self.path}: {loc}: {msg}" if loc else f"{self.path}: {msg}" for loc, msg in problems]
        super().__init__("invalid inventory\n  " + "\n  ".join(lines))


class _UniqueKeyLoader(getattr(yaml, "CSafeLoader", yaml.SafeLoader)):
    """A SafeLoader that refuses duplicate mapping keys (YAML would keep the last);
    on libyaml's parser where PyYAML has it (ten times the pure-Python one)."""

    def construct_mapping(self, node, deep=False):
        seen: dict = {}
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            try:
                hash(key)
            except TypeError:
                raise yaml.constructor.ConstructorError(
                    None, None, "a mapping key must be a plain value, not a list or mapping", key_node.start_mark
                ) from None
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    None, None, f"duplicate key '{key}'", key_node.start_mark
                )
            seen[key] = True
        return super().construct_mapping(node, deep=deep)


PATTERN_HINTS = {
    "name": "a lower-case letter, then lower-case letters, digits and '-'",
    "domain": "a DNS name such as example.com",
    "apt_proxy": "an http(s):// URL",
    "bridge_prefix": "a lower-case letter and at most 5 more letters or digits",
}


def _loc(loc: tuple) -> str:
    return ".".join(str(part) for part in loc if not (isinstance(part, str) and part.startswith("function-")))


def _message(err: dict) -> str:
    kind, msg = err["type"], err["msg"]
    if kind == "extra_forbidden":
        return "unknown key"
    if kind == "literal_error" and "roles" in err["loc"]:
        return f"unknown role {err['input']!r} (known: {', '.join(ROLES)})"
    if kind == "missing":
        return "required key is missing"
    if kind == "string_pattern_mismatch":
        hint = PATTERN_HINTS.get(str(err["loc"][-1]), "")
        return f"{err['input']!r} is not valid here" + (f" ({hint})" if hint else "")
    return f"{msg} (got {err['input']!r})" if "input" in err and not isinstance(err["input"], dict) else msg


def parse(text: str, path: Path | str = "<inventory>", roles: dict[str, list[str]] | None = None,
          retired: list[str] | None = None) -> Inventory:
    """Parse and validate inventory text; raise InventoryError listing every problem.
    ``roles``: {host: roles} put over the hosts' roles, ``retired``: hosts left out
    (the roles file, already checked)."""
    try:
        data = yaml.load(text, Loader=_UniqueKeyLoader)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"line {mark.line + 1}, column {mark.column + 1}" if mark else "?"
        what = getattr(exc, "problem", None) or str(exc)
        raise InventoryError(path, [("", f"malformed YAML at {where}: {what}")]) from None
    if not isinstance(data, dict):
        raise InventoryError(path, [("", "the inventory must be a YAML mapping")])
    overridden: dict[str, list[str]] = {}
    gone: dict[str, dict] = {}
    if (roles or retired) and isinstance(data.get("hosts"), dict):
        hosts = dict(data["hosts"])
        for name, new in (roles or {}).items():
            if isinstance(hosts.get(name), dict) and sorted(hosts[name].get("roles") or []) != sorted(new):
                overridden[name] = list(hosts[name].get("roles") or [])
                hosts[name] = {**hosts[name], "roles": list(new)}
        for name in retired or []:
            if isinstance(hosts.get(name), dict):
                gone[name] = hosts.pop(name)
        data = {**data, "hosts": hosts}
    try:
        inv = Inventory.model_validate({**data, "path": Path(path), "overridden": overridden, "retired": gone})
    except ValidationError as exc:
        raise InventoryError(path, [(_loc(e["loc"]), _message(e)) for e in exc.errors()]) from None
    problems = inv.problems()
    if problems:
        if overridden or gone:
            problems.append(("", f"(with the roles file {Path(path).stem}.roles.yml put over it: "
                             + ", ".join([f"{h}: {', '.join(r)}" for h, r in (roles or {}).items() if h in overridden]
                                         + [f"{h} retired" for h in gone]) + ")"))
        raise InventoryError(path, problems)
    return inv


def load(path: Path | str, *, roles_file: bool = True) -> Inventory:
    """The inventory at ``path``, with its roles file (a rescue's record) put over it
    unless ``roles_file`` is False (the lab: its machines are the file's hosts)."""
    path = Path(path)
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise InventoryError(path, [("", f"cannot read the inventory: {exc.strerror or exc}")]) from None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = raw[: exc.start].count(b"\n") + 1
        raise InventoryError(path, [("", f"not UTF-8 text (byte {raw[exc.start]:#04x} on line {line})")]) from None
    roles, retired = read_roles_file(path.parent / f"{path.stem}.roles.yml", text) if roles_file else (None, [])
    return parse(text, path, roles=roles, retired=retired)


ROLES_FILE_HEADER = """\
# Role changes made by rescue tasks (inv postgres.promote, inv rescue.replace,
# inv ejabberd.remove-node). They are put over the roles of {inventory} for the
# hosts below (`retired`: hosts replaced by a spare, left out), so that the next
# deploy does not undo the rescue. Make the same change in {inventory} and
# delete this file (only those tasks write it).
"""


def read_roles_file(path: Path, inventory_text: str) -> tuple[dict[str, list[str]] | None, list[str]]:
    """The roles file's {host: roles} and retired hosts, checked (hosts of the
    inventory, known roles); (None, []) without one."""
    try:
        raw = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return None, []
    except (OSError, UnicodeDecodeError) as exc:
        raise InventoryError(path, [("", f"cannot read the roles file: {getattr(exc, 'strerror', None) or exc}")]) \
            from None
    try:
        data = yaml.load(raw, Loader=_UniqueKeyLoader)
    except yaml.YAMLError as exc:
        raise InventoryError(path, [("", f"malformed YAML: {getattr(exc, 'problem', None) or exc}")]) from None
    if data is None:
        return None, []
    problems: list[tuple[str, str]] = []
    hosts = data.get("hosts", {}) if isinstance(data, dict) else None
    retired = data.get("retired", []) if isinstance(data, dict) else None
    if not isinstance(data, dict) or not data or not set(data) <= {"hosts", "retired"} \
            or not isinstance(hosts, dict) or not isinstance(retired, list):
        raise InventoryError(path, [("", "a roles file has 'hosts:' (host name -> list of roles) and/or "
                                     "'retired:' (a list of host names), nothing else")])
    try:
        listed = yaml.safe_load(inventory_text)
    except yaml.YAMLError:
        listed = None
    listed = listed.get("hosts") if isinstance(listed, dict) else None
    known = set(listed) if isinstance(listed, dict) else set()  # a broken inventory is reported as itself
    out: dict[str, list[str]] = {}
    for name, roles in hosts.items():
        if known and name not in known:
            problems.append((f"hosts.{name}", "not a host of the inventory"))
        elif not isinstance(roles, list) or not all(isinstance(r, str) and r in ROLES for r in roles):
            problems.append((f"hosts.{name}", f"must be a list of roles (known: {', '.join(ROLES)})"))
        else:
            out[str(name)] = roles
    for i, name in enumerate(retired):
        if not isinstance(name, str) or (known and name not in known):
            problems.append((f"retired.{i}", f"{name!r} is not a host of the inventory"))
        elif name in out:
            problems.append((f"retired.{i}", f"{name} is retired and has roles in 'hosts:' too"))
    if problems:
        raise InventoryError(path, problems)
    return out, [str(n) for n in retired]


def save_roles(inv: Inventory, changes: dict[str, list[str]], retire: list[str] = ()) -> Path | None:
    """Record ``changes`` ({host: its roles from now on}) and ``retire`` (hosts to leave
    out) in the inventory's roles file, beside what it recorded before; a host whose
    roles are the inventory's own again is dropped, and the file is removed once
    nothing differs. Returns the file, or None when it was removed (or not needed)."""
    path = inv.roles_file
    current = {name: list(inv.hosts[name].roles) for name in inv.overridden}
    base = dict(inv.overridden)
    for name, roles in changes.items():
        base.setdefault(name, list(inv.hosts[name].roles))
        current[name] = list(roles)
    gone = [*inv.retired, *(n for n in retire if n not in inv.retired)]
    keep = {name: roles for name, roles in current.items() if sorted(roles) != sorted(base[name]) and name not in gone}
    if not keep and not gone:
        path.unlink(missing_ok=True)
        return None
    record: dict = {}
    if keep:
        record["hosts"] = keep
    if gone:
        record["retired"] = gone
    body = ROLES_FILE_HEADER.format(inventory=inv.path.name) + yaml.safe_dump(record, sort_keys=False)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(body, encoding="utf-8")
    tmp.replace(path)
    return path
