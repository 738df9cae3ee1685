"""The base tier on the recording host: facts in, commands out; an already
converged host runs no command."""

from __future__ import annotations

from pathlib import Path

from fabfile import base
from fabfile.core import Result, templates
from fabfile.core.inventory import load
from fabfile.core.testing import RecordingRun, files_present

LAB = load(Path(__file__).resolve().parents[2] / "inventory/lab.yml")
HOST = "gw1server"


def secret(name):
    return f"secret-of-{name}"


def rendered(host=HOST) -> dict[str, tuple[str, str]]:
    v = base.template_vars(LAB, host, secret)
    files = {"/etc/hostname": "base/etc/hostname.j2", "/etc/hosts": "base/etc/hosts.j2",
             "/etc/timezone": "base/etc/timezone.j2", base.SYSCTL_FILE: "base/etc/sysctl.d/60-hastack.conf.j2",
             "/etc/apt/apt.conf.d/01proxy": "base/etc/apt/apt.conf.d/01proxy.j2"}
    return {dest: ("root:root:644", templates.render(name, LAB, host, secret, **v)) for dest, name in files.items()}


CONVERGED = [
    files_present(rendered()),
    (r"^dpkg-query -W -f='\$\{Package\}", Result(stdout="".join(f"{p} installed\n" for p in base.PACKAGES))),
    (r"readlink /etc/localtime", Result()),
    (r"^systemctl is-enabled systemd-timesyncd", Result(stdout="enabled\n")),
    (r"^systemctl is-active systemd-timesyncd", Result()),
    (r"^grep -E '\^\[a-z\]' /etc/sysctl.d/60-hastack.conf", Result()),  # the live values match
]


def converge(rules, check=False):
    run = RecordingRun(LAB, answers={HOST: rules}, check=check, only=HOST)
    base.converge(run)
    return run.session(HOST)


def test_a_converged_host_runs_no_command():
    h = converge(CONVERGED)
    assert h.changes == [] and h.uploads == {}
    assert h.reported("changed") == []


def test_a_fresh_host_gets_everything_in_order():
    h = converge([(r"^dpkg-query", Result(stdout=""))])
    assert h.changes[0] == "hostname gw1server"
    assert set(h.uploads) >= {"/etc/hostname.hastack-new", "/etc/hosts.hastack-new", "/etc/timezone.hastack-new"}
    install = next(c for c in h.changes if "apt-get install" in c)
    assert all(p in install for p in base.PACKAGES)
    assert "ln -sfn /usr/share/zoneinfo/UTC /etc/localtime" in h.changes
    assert h.changes[-1] == f"sysctl -q -p {base.SYSCTL_FILE}"
    assert "net.ipv4.ip_forward = 1" in h.uploads[base.SYSCTL_FILE + ".hastack-new"]  # the gateway forwards


def test_check_mode_on_a_fresh_host_changes_nothing_and_says_what_would():
    h = converge([(r"^dpkg-query", Result(stdout=""))], check=True)
    assert h.changes == [] and h.uploads == {}
    assert "would run: hostname gw1server" in h.reported("would change")


def test_a_drifted_sysctl_value_is_set_live_again():
    rules = [r for r in CONVERGED if "sysctl" not in r[0]]
    h = converge(rules)
    assert h.changes == [f"sysctl -q -p {base.SYSCTL_FILE}"]
