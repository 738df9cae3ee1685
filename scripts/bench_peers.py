#!/usr/bin/env python3
"""The base tier's no-op, side by side with pyinfra and Ansible doing the same checks.

    sudo .venv/bin/python scripts/bench_peers.py            # the lab's 16 hosts, 3 rounds
    sudo .venv/bin/python scripts/bench_peers.py --rounds 5 --hosts e1server,e2server

The state is the one `inv base.deploy` converges: /etc/hostname, /etc/hosts,
the apt proxy file, /etc/timezone and the sysctl file (the same bytes, rendered
by our templates), the common packages, the /etc/localtime link, timesyncd
enabled and the sysctl values live. pyinfra 3 and ansible-core 2.19 get that
state as a deploy file and a playbook; their own SSH (paramiko for pyinfra,
OpenSSH with pipelining for Ansible) reaches the same hosts with the lab's key
and known_hosts. Each tool converges once, then the rounds alternate the three
no-op runs; the script prints each median and the ratio to pyinfra.

The peers live in their own virtualenv (.venv-peers, made on first use from
PyPI): they are benchmark tools, never dependencies of the tool (pyinfra pins
paramiko<5, Fabric here runs on 5).
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from fabfile import base, lab  # noqa: E402
from fabfile.core import templates  # noqa: E402
from fabfile.core.inventory import load  # noqa: E402
from fabfile.core.tasks import DEFAULT_INVENTORY, PROJECT_ROOT  # noqa: E402

PEERS = PROJECT_ROOT / ".venv-peers"
PEER_PACKAGES = ["pyinfra==3.10.0", "ansible-core==2.19.14"]
FILES = {  # template -> where it lands
    "base/etc/hostname.j2": "/etc/hostname",
    "base/etc/hosts.j2": "/etc/hosts",
    "base/etc/timezone.j2": "/etc/timezone",
    "base/etc/sysctl.d/60-hastack.conf.j2": base.SYSCTL_FILE,
}
PROXY = ("base/etc/apt/apt.conf.d/01proxy.j2", "/etc/apt/apt.conf.d/01proxy")


def peers() -> Path:
    """The peers' virtualenv, made on first use."""
    if not (PEERS / "bin/pyinfra").exists() or not (PEERS / "bin/ansible-playbook").exists():
        print(f"installing {' '.join(PEER_PACKAGES)} into {PEERS} (once)", flush=True)
        subprocess.run([sys.executable, "-m", "venv", str(PEERS)], check=True)
        subprocess.run([str(PEERS / "bin/pip"), "install", "-q", "--disable-pip-version-check", *PEER_PACKAGES],
                       check=True)
    return PEERS / "bin"


def render_files(inv, hosts: list[str], out: Path) -> None:
    """Every host's base files, rendered by our templates (the same bytes inv puts)."""
    secret = lambda name: ""  # noqa: E731 - the base templates hold no secret
    wanted = dict(FILES)
    if inv.site.apt_proxy:
        wanted[PROXY[0]] = PROXY[1]
    for host in hosts:
        v = base.template_vars(inv, host, secret)
        for name in wanted:
            dest = out / host / Path(name).name.removesuffix(".j2")
            dest.parent.mkdir(parents=True, exist_ok=True)
            dest.write_text(templates.render(name, inv, host, secret, **v))


def sysctl_values(path: Path) -> list[tuple[str, str]]:
    pairs = []
    for line in path.read_text().splitlines():
        if line and not line.startswith("#"):
            key, _, value = line.partition("=")
            pairs.append((key.strip(), value.strip()))
    return pairs


def pyinfra_files(inv, hosts: list[str], work: Path) -> list[str]:
    key, known = inv.key_file, inv.known_hosts_file
    rows = ",\n".join(
        f'    ("{inv.management_address(h)}", {{"lab_name": "{h}", "ssh_user": "{inv.ssh.user}", '
        f'"ssh_key": "{key}", "ssh_known_hosts_file": "{known}", "ssh_strict_host_key_checking": "yes"}})'
        for h in hosts)
    (work / "inventory.py").write_text(f"hosts = [\n{rows},\n]\n")
    proxy = (f'files.put(name="apt proxy", src=f"{{FILES}}/{{name}}/01proxy", dest="{PROXY[1]}", '
             'user="root", group="root", mode="644")\n') if inv.site.apt_proxy else ""
    puts = "".join(
        f'files.put(name="{dest}", src=f"{{FILES}}/{{name}}/{Path(t).name.removesuffix(".j2")}", dest="{dest}", '
        'user="root", group="root", mode="644")\n' for t, dest in FILES.items())
    (work / "deploy.py").write_text(f'''\
from pyinfra import host
from pyinfra.operations import apt, files, server, systemd

FILES = "{work / 'files'}"
name = host.data.lab_name
{puts}{proxy}apt.packages(name="common packages", packages={base.PACKAGES!r})
files.link(name="time zone", path="/etc/localtime", target="/usr/share/zoneinfo/{inv.site.timezone}")
systemd.service(name="timesyncd enabled", service="systemd-timesyncd", enabled=True)
for key, value in {{k: v for k, v in (l.split(" = ") for l in open(f"{{FILES}}/{{name}}/60-hastack.conf")
                   if " = " in l and not l.startswith("#"))}}.items():
    server.sysctl(name=f"sysctl {{key}}", key=key, value=int(value.strip()))
''')
    return ["pyinfra", "-y", str(work / "inventory.py"), str(work / "deploy.py")]


def ansible_files(inv, hosts: list[str], work: Path) -> list[str]:
    key, known = inv.key_file, inv.known_hosts_file
    lines = [f"{h} ansible_host={inv.management_address(h)} ansible_user={inv.ssh.user} "
             f"ansible_ssh_private_key_file={key} "
             f"ansible_ssh_common_args='-o UserKnownHostsFile={known} -o StrictHostKeyChecking=yes'" for h in hosts]
    (work / "hosts.ini").write_text("[lab]\n" + "\n".join(lines) + "\n")
    copies = "".join(
        f"    - ansible.builtin.copy: {{src: '{work}/files/{{{{ inventory_hostname }}}}/"
        f"{Path(t).name.removesuffix('.j2')}', dest: {dest}, owner: root, group: root, mode: '0644'}}\n"
        for t, dest in ([*FILES.items(), PROXY] if inv.site.apt_proxy else FILES.items()))
    check = (f"grep -E '^[a-z]' {base.SYSCTL_FILE} | while IFS=' =' read -r key value; do "
             '[ "$(sysctl -n "$key")" = "$value" ] || exit 1; done')
    (work / "play.yml").write_text(f"""\
- hosts: lab
  gather_facts: false
  tasks:
{copies}    - ansible.builtin.apt: {{name: {base.PACKAGES!r}, state: present}}
    - ansible.builtin.file: {{src: /usr/share/zoneinfo/{inv.site.timezone}, dest: /etc/localtime, state: link}}
    - ansible.builtin.systemd_service: {{name: systemd-timesyncd, enabled: true}}
    - name: sysctl values live
      ansible.builtin.shell: |
        {check} || sysctl -q -p {base.SYSCTL_FILE}
      changed_when: false
""")
    return ["ansible-playbook", "-f", str(len(hosts)), "-i", str(work / "hosts.ini"), str(work / "play.yml")]


def timed(cmd: list[str], env: dict) -> float:
    start = time.monotonic()
    out = subprocess.run(cmd, cwd=PROJECT_ROOT, env=env, capture_output=True, text=True, stdin=subprocess.DEVNULL)
    seconds = time.monotonic() - start
    if out.returncode != 0:
        sys.exit(f"{' '.join(cmd[:2])} failed ({out.returncode}):\n{out.stdout[-3000:]}\n{out.stderr[-2000:]}")
    return seconds


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--inventory", default=str(PROJECT_ROOT / DEFAULT_INVENTORY))
    ap.add_argument("--hosts", default=None, help="only these lab hosts (default: every host)")
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    lab.require_root("scripts/bench_peers.py")
    inventory = Path(args.inventory).resolve()
    inv = load(inventory)
    hosts = inv.select(args.hosts)
    bin_dir = peers()
    env = {**os.environ, "INVOKE_INVENTORY": str(inventory), "PATH": f"{bin_dir}:{os.environ['PATH']}",
           "ANSIBLE_PIPELINING": "True", "ANSIBLE_HOST_KEY_CHECKING": "True", "ANSIBLE_NOCOLOR": "1",
           "ANSIBLE_LOCALHOST_WARNING": "False"}
    lab.lab_up(inv, hosts=",".join(hosts))
    only = ["--hosts", ",".join(hosts)] if args.hosts else []
    ours = [str(PROJECT_ROOT / ".venv/bin/inv"), "base.deploy", *only]
    with tempfile.TemporaryDirectory(prefix="bench-peers-") as tmp:
        work = Path(tmp)
        render_files(inv, hosts, work / "files")
        tools = {"inv base.deploy": ours, "pyinfra": pyinfra_files(inv, hosts, work),
                 "ansible-playbook": ansible_files(inv, hosts, work)}
        for name, cmd in tools.items():  # converge once: the rounds are no-ops
            timed(cmd, env)
        times: dict[str, list[float]] = {name: [] for name in tools}
        for _ in range(args.rounds):
            for name, cmd in tools.items():
                times[name].append(timed(cmd, env))
    medians = {name: statistics.median(t) for name, t in times.items()}
    print(f"base tier no-op on {len(hosts)} hosts, {os.cpu_count()} CPUs, median of {args.rounds} rounds "
          "(whole processes, alternating):")
    for name, m in medians.items():
        print(f"  {name:<18} {m:6.2f} s   {m / medians['pyinfra']:5.2f}x pyinfra   "
              f"(runs: {', '.join(f'{t:.2f}' for t in times[name])})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
