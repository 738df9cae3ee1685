"""The two Galera flavours the tier installs: Percona XtraDB Cluster 8.0
(Percona's repository) or Debian's MariaDB + galera-4, chosen by
`mail.galera_flavour` in the inventory. What differs between them is data
(`Flavour`) plus the way their packages go on a host (`install_packages`)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from ..core import topology
from ..core.shell import APT_UPDATE

if TYPE_CHECKING:
    from ..core import HostSession
    from ..core.inventory import Inventory


@dataclass(frozen=True)
class Flavour:
    name: str
    packages: tuple[str, ...]
    service: str
    daemon: str
    config_template: str
    config_path: str
    dropin_template: str
    dropin_path: str
    provider: str
    sst_method: str
    sst_user: bool  # PXC 8.0 manages its own SST user (mysql.pxc.sst.user)
    bootstrap_cmd: str
    after_bootstrap: tuple[str, ...]  # once every node joined
    bootstrap_unit: str  # unit that is active while the node runs as bootstrap node

    @property
    def start_cmd(self) -> str:
        return f"systemctl start {self.service}"

    @property
    def stop_cmd(self) -> str:
        return f"systemctl stop {self.service}"


FLAVOURS = {
    "mariadb": Flavour(
        name="mariadb",
        packages=("mariadb-server", "mariadb-client", "galera-4", "mariadb-backup", "socat", "rsync"),
        service="mariadb",
        daemon="mariadbd",
        config_template="pxc/etc/mysql/mariadb.conf.d/60-galera.cnf.j2",
        config_path="/etc/mysql/mariadb.conf.d/60-galera.cnf",
        dropin_template="pxc/etc/systemd/system/mariadb.service.d/hastack.conf.j2",
        dropin_path="/etc/systemd/system/mariadb.service.d/hastack.conf",
        provider="/usr/lib/galera/libgalera_smm.so",
        sst_method="mariabackup",
        sst_user=True,
        # galera_new_cluster starts mariadb.service with --wsrep-new-cluster once;
        # later restarts of the unit join the cluster normally.
        bootstrap_cmd="galera_new_cluster",
        after_bootstrap=(),
        bootstrap_unit="mariadb",
    ),
    "percona": Flavour(
        name="percona",
        packages=("percona-xtradb-cluster", "socat", "rsync"),
        service="mysql",
        daemon="mysqld",
        config_template="pxc/etc/mysql/mysql.conf.d/mysqld.cnf.j2",
        config_path="/etc/mysql/mysql.conf.d/mysqld.cnf",
        dropin_template="pxc/etc/systemd/system/mysql.service.d/hastack.conf.j2",
        dropin_path="/etc/systemd/system/mysql.service.d/hastack.conf",
        provider="/usr/lib/galera4/libgalera_smm.so",
        sst_method="xtrabackup-v2",
        sst_user=False,
        bootstrap_cmd="systemctl start mysql@bootstrap.service",
        # Percona's documented sequence: the first node leaves bootstrap mode
        # once the others are in, and runs as an ordinary member.
        after_bootstrap=("systemctl stop mysql@bootstrap.service", "systemctl start mysql"),
        bootstrap_unit="mysql@bootstrap.service",
    ),
}


def flavour(inv: Inventory) -> Flavour:
    return FLAVOURS[inv.mail.galera_flavour if inv.mail else "percona"]


def install_packages(h: HostSession, flav: Flavour) -> None:
    """The flavour's packages; no node is started here (the formation steps do it)."""
    if flav.name == "percona":
        _percona_repository(h)
        # PXC's postinst would start each node as a one-node cluster of its own
        # (gcomm://): no service may start while the packages install.
        h.packages(flav.packages, no_start=True)
        # mysqld reads the pki tier's host key (group ssl-cert) for pxc-encrypt-cluster-traffic.
        topology.key_reader(h, "mysql", "mysqld reads the host key for encrypted cluster traffic")
    else:
        # Debian's MariaDB enables mariadb.socket, which holds 3306 and makes the
        # Galera start fail ("Address already in use" during wsrep recovery).
        h.ensure("! systemctl is-enabled -q mariadb.socket 2>/dev/null && ! systemctl is-active -q mariadb.socket",
                 "systemctl disable --now mariadb.socket && systemctl mask mariadb.socket",
                 "mariadb.socket disabled (3306 belongs to mariadbd)")
        h.packages(flav.packages)


def _percona_repository(h: HostSession) -> None:
    """Percona's repository through its own percona-release tool (Percona's
    documented setup: `percona-release setup pxc80`)."""
    h.ensure("dpkg-query -W -f='${Status}' percona-release 2>/dev/null | grep -q 'ok installed'",
             "curl -fsSLo /tmp/percona-release.deb "
             "https://repo.percona.com/apt/percona-release_latest.generic_all.deb && "
             "DEBIAN_FRONTEND=noninteractive apt-get install -y -q /tmp/percona-release.deb && "
             "rm -f /tmp/percona-release.deb",
             "percona-release installed")
    h.ensure("test -e /etc/apt/sources.list.d/percona-pxc-80-release.list",
             "percona-release enable-only pxc-80 release && percona-release enable tools release && "
             + APT_UPDATE, "Percona repository pxc-80 enabled")
