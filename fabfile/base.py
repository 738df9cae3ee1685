"""Base tier: what every host of both systems gets first.

Runbook: hostname and /etc/hosts (FQDNs under the site domain), apt through the
site's proxy, the common packages, time zone and time sync, and the sysctl each
role needs (forwarding on the gateway, non-local bind on VIP holders).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from invoke import Collection

from .core import q, runbook

if TYPE_CHECKING:
    from .core import HostSession, Run

PACKAGES = [
    "ca-certificates", "curl", "gnupg", "iproute2", "iptables", "netcat-openbsd",
    "openssl", "procps", "python3", "rsync", "systemd-timesyncd", "tzdata",
]

SYSCTL_FILE = "/etc/sysctl.d/60-hastack.conf"


def template_vars(inv, host, secret):
    me = inv.hosts[host]
    return {
        "host_entries": [(name, inv.service_address(name)) for name in inv.hosts],
        "vip_entries": [(str(v.address), v.names) for v in inv.vips.values() if v.names],
        "forwarding": "gateway" in me.roles,
        "nonlocal_bind": any(set(me.roles) & {v.role} for v in inv.vips.values()),
    }


def converge(run: Run) -> None:
    run.step("base: identity", run.hosts(), _identity)
    run.step("base: apt and packages", run.hosts(), _packages)
    run.step("base: time and kernel settings", run.hosts(), _time_and_sysctl)


def _identity(h: HostSession) -> None:
    if h.template("base/etc/hostname.j2", "/etc/hostname", h.tier_vars(template_vars)):
        h.sh(f"hostname {q(h.name)}", message=f"hostname {h.name}")
    h.template("base/etc/hosts.j2", "/etc/hosts", h.tier_vars(template_vars))


def _packages(h: HostSession) -> None:
    proxy = "/etc/apt/apt.conf.d/01proxy"
    if h.inv.site.apt_proxy:
        h.template("base/etc/apt/apt.conf.d/01proxy.j2", proxy, h.tier_vars(template_vars))
    else:
        h.ensure(f"test ! -e {proxy}", f"rm -f {proxy}", f"no apt proxy ({proxy} absent)")
    h.packages(PACKAGES)


def _time_and_sysctl(h: HostSession) -> None:
    zone = h.inv.site.timezone
    target = q(f"/usr/share/zoneinfo/{zone}")
    h.template("base/etc/timezone.j2", "/etc/timezone", h.tier_vars(template_vars))
    h.ensure(f'[ "$(readlink /etc/localtime)" = {target} ]', f"ln -sfn {target} /etc/localtime", f"time zone {zone}")
    # timesyncd skips itself in containers (the machine keeps their clock).
    h.service("systemd-timesyncd")
    h.template("base/etc/sysctl.d/60-hastack.conf.j2", SYSCTL_FILE, h.tier_vars(template_vars))
    # The live values, not only the file: someone may have changed them by hand.
    live = (f"grep -E '^[a-z]' {SYSCTL_FILE} | while IFS=' =' read -r key value; do "
            '[ "$(sysctl -n "$key")" = "$value" ] || exit 1; done')
    h.ensure(live, f"sysctl -q -p {SYSCTL_FILE}", "sysctl settings live")


@runbook(default=True)
def deploy(run):
    """Converge the base tier on every host (or --hosts)."""
    converge(run)


@runbook
def hosts_file(run):
    """Only rewrite /etc/hosts and the hostname (after an inventory change)."""
    run.step("base: identity", run.hosts(), _identity)


ns = Collection("base", deploy, hosts_file)
