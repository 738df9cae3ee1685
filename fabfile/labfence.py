"""The lab's power controller: what a hypervisor's API is to fence_virsh.

The lab machine runs no sshd, so the lab fence agent (configs/cluster/usr/sbin/
fence_lab, installed on the cluster nodes) reaches the machine through this
small TCP listener instead. `inv lab.up` starts it on the management bridge's
address (port 1229) when the inventory's mail cluster uses `fence_agent:
fence_lab`; `inv lab.down` stops it.

Protocol, one request per connection:

    listener -> "fence_lab 1 NONCE"
    agent    -> "ACTION HOST HMAC"    HMAC-SHA256(secret, "NONCE ACTION HOST"), hex
    listener -> "ok STATE" | "error MESSAGE"

ACTION is on, off, status or list. The secret is `fence_lab_secret` in the
site's secrets store (beside the inventory); only hosts of this inventory can
be powered, and only by someone who holds the secret. `off` is a hard power
off (SIGKILL to every process of the container), `on` boots it as lab.up does.
"""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import os
import secrets as pysecrets
import socketserver
import sys
import threading
import time
from pathlib import Path

PORT = 1229
SECRET = "fence_lab_secret"


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
    if action not in ("on", "off", "status", "list"):
        raise ValueError(f"unknown action {action}")
    if action in ("on", "off") or (action == "status" and host != "-"):
        if host not in hosts:
            raise ValueError(f"{host} is not a host of this lab")
    return action, host


def serve(inventory_path: str, state_dir: str | None = None) -> None:
    from . import lab
    from .core.inventory import load
    from .core.secrets import Secrets

    inv = load(Path(inventory_path))
    plan = lab.Plan(inv, Path(state_dir) if state_dir else lab.STATE_DIR)
    power_lock = threading.Lock()

    def secret() -> str:
        return Secrets(inv.site_file("secrets.yml")).get(SECRET)

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
                    answer = _act(lab, plan, inv, action, host)
                self.wfile.write(f"ok {answer}\n".encode())
                if action in ("on", "off"):
                    print(f"{time.strftime('%H:%M:%S')} {self.client_address[0]}: {action} {host}", flush=True)
            except Exception as exc:  # any failure is the answer, the listener keeps serving
                print(f"{time.strftime('%H:%M:%S')} {self.client_address[0]}: refused: {exc}", flush=True)
                with contextlib.suppress(OSError):
                    self.wfile.write(f"error {exc}\n".encode())

    class Server(socketserver.ThreadingTCPServer):
        allow_reuse_address = True
        daemon_threads = True

    with Server((str(plan.bridge_interface.ip), PORT), Handler) as server:
        print(f"fence_lab listener on {plan.bridge_interface.ip}:{PORT} for {inv.path}", flush=True)
        server.serve_forever()


def _act(lab, plan, inv, action: str, host: str) -> str:
    if action == "list":
        return " ".join(f"{h}:{lab.power_state(plan, h)}" for h in inv.hosts)
    if action == "off":
        lab.power_off(plan, host)
    elif action == "on":
        if lab.power_state(plan, host) == "off":
            lab.lab_up(inv, hosts=host, state_dir=plan.state_dir)
    return lab.power_state(plan, host)


if __name__ == "__main__":  # python -m fabfile.labfence INVENTORY [STATE_DIR]
    serve(*sys.argv[1:3])
