"""The lab's power controller: what a hypervisor's API is to fence_virsh.

The lab machine runs no sshd, so the lab fence agent (configs/cluster/usr/sbin/
fence_lab, installed on the cluster nodes) reaches the machine through this
small TCP listener instead. `inv lab.up` starts it on the management bridge's
address (port FENCE_LAB_PORT, 1229) when the inventory's mail cluster uses
`fence_agent: fence_lab` (lifecycle.ensure_fence_listener runs
`python -m fabfile.lab.fence INVENTORY STATE_DIR`); `inv lab.down` stops it.

Protocol, one request per connection:

    listener -> "fence_lab 1 NONCE"
    agent    -> "ACTION HOST HMAC"    HMAC-SHA256(secret, "NONCE ACTION HOST"), hex
    listener -> "ok STATE" | "error MESSAGE"

ACTION is on, off, status or list. The secret is FENCE_LAB_SECRET
(`fence_lab_secret`) in the site's secrets store (beside the inventory); only
hosts of this inventory can be powered, and only by someone who holds the
secret. `off` is a hard power off (SIGKILL to every process of the container),
`on` boots it as lab.up does.
"""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import secrets as pysecrets
import socketserver
import sys
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING

from ..core.inventory import load
from ..core.report import Report
from ..core.secrets import Secrets
from ..core.topology import FENCE_LAB_PORT, FENCE_LAB_SECRET
from .lifecycle import lab_up
from .machines import power_off, power_state
from .plan import STATE_DIR, Plan
from .system import say

if TYPE_CHECKING:
    from ..core.inventory import Inventory

ACTIONS = ("on", "off", "status", "list")


def sign(secret: str, nonce: str, action: str, host: str) -> str:
    return hmac.new(secret.encode(), f"{nonce} {action} {host}".encode(), hashlib.sha256).hexdigest()


def check_request(line: str, nonce: str, secret: str, hosts) -> tuple[str, str]:
    """(action, host) of a well-formed, authentic request; ValueError otherwise."""
    parts = line.split()
    if len(parts) != 3:
        raise ValueError("malformed request")
    action, host, mac = parts
    if not hmac.compare_digest(mac, sign(secret, nonce, action, host)):
        raise ValueError("bad signature")
    if action not in ACTIONS:
        raise ValueError(f"unknown action {action}")
    if action in ("on", "off") or (action == "status" and host != "-"):
        if host not in hosts:
            raise ValueError(f"{host} is not a host of this lab")
    return action, host


def act(plan: Plan, action: str, host: str, report: Report) -> str:
    """Carry out one checked request; the answer after "ok"."""
    inv = plan.inv
    if action == "list":
        return " ".join(f"{h}:{power_state(plan, h)}" for h in inv.hosts)
    if action == "off":
        power_off(plan, host)
    elif action == "on":
        if power_state(plan, host) == "off":
            lab_up(inv, hosts=host, state_dir=plan.state_dir, report=report)
    return power_state(plan, host)


def serve(inventory_path: str, state_dir: str | None = None) -> None:
    inv: Inventory = load(Path(inventory_path))
    plan = Plan(inv, Path(state_dir) if state_dir else STATE_DIR)
    report = Report("lab.power-listener")
    power_lock = threading.Lock()

    def secret() -> str:
        return Secrets(inv.site_file("secrets.yml")).get(FENCE_LAB_SECRET)

    class Handler(socketserver.StreamRequestHandler):
        def handle(self):
            nonce = pysecrets.token_hex(16)
            self.wfile.write(f"fence_lab 1 {nonce}\n".encode())
            line = self.rfile.readline(512).decode(errors="replace")
            if not line.strip():
                return  # a connection check (lab.up waits for the port), not a request
            try:
                action, host = check_request(line, nonce, secret(), inv.hosts)
                with power_lock:
                    answer = act(plan, action, host, report)
                self.wfile.write(f"ok {answer}\n".encode())
                if action in ("on", "off"):
                    say(report, f"{time.strftime('%H:%M:%S')} {self.client_address[0]}: {action} {host}")
            except Exception as exc:  # any failure is the answer, the listener keeps serving
                say(report, f"{time.strftime('%H:%M:%S')} {self.client_address[0]}: refused: {exc}")
                with contextlib.suppress(OSError):
                    self.wfile.write(f"error {exc}\n".encode())

    class Server(socketserver.ThreadingTCPServer):
        allow_reuse_address = True
        daemon_threads = True

    with Server((str(plan.bridge_interface.ip), FENCE_LAB_PORT), Handler) as server:
        say(report, f"fence_lab listener on {plan.bridge_interface.ip}:{FENCE_LAB_PORT} for {inv.path}")
        server.serve_forever()


if __name__ == "__main__":
    # A fourth argument, the address it binds (IP:PORT), only names the process
    # for `lab.down`/`lab.up` (the listener computes it from the inventory).
    if len(sys.argv) not in (2, 3, 4):
        sys.exit("usage: python -m fabfile.lab.fence INVENTORY [STATE_DIR [IP:PORT]]")
    serve(*sys.argv[1:3])
