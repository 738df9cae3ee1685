"""A real XMPP client run (by tests/lab/test_xmpp.py) inside a lab host's network
namespace: logs users in over STARTTLS, verifying the server's certificate
against a given CA and the XMPP domain, optionally sends a message from the
first to the second, and prints one JSON line with what happened.

Input (JSON on stdin):
  {"ca": "/path/ca.crt", "timeout": 20,
   "clients": [{"jid": "alice@dom", "password": "...", "host": "10.0.0.2", "port": 5222}, ...],
   "message": "text"  (optional: clients[0] sends it to clients[1])}
Output: {"logins": [{"jid", "status", "tls", "peer"}], "received": ["text", ...]}
"""

from __future__ import annotations

import asyncio
import json
import logging
import sys
from pathlib import Path

import slixmpp


async def login(spec: dict, ca: str, timeout: float, inbox: asyncio.Queue):
    client = slixmpp.ClientXMPP(spec["jid"], spec["password"])
    client.ca_certs = Path(ca)
    # STARTTLS on the c2s port only: no direct TLS, no plaintext fallback.
    client.enable_direct_tls = False
    client.enable_starttls = True
    client.enable_plaintext = False
    loop = asyncio.get_running_loop()
    result = loop.create_future()

    def done(status: str) -> None:
        if not result.done():
            result.set_result(status)

    async def started(_event) -> None:
        client.send_presence()
        await client.get_roster()
        done("ok")

    def invalid_chain(exc) -> None:
        done(f"invalid certificate: {exc}")
        client.abort()

    def message(msg) -> None:
        if msg["type"] in ("chat", "normal") and msg["body"]:
            inbox.put_nowait(str(msg["body"]))

    client.add_event_handler("session_start", started)
    client.add_event_handler("failed_auth", lambda _e: done("authentication failed"))
    client.add_event_handler("ssl_invalid_chain", invalid_chain)
    client.add_event_handler("connection_failed", lambda e: done(f"connection failed: {e}"))
    client.add_event_handler("message", message)
    client.connect(spec["host"], spec.get("port", 5222))
    try:
        status = await asyncio.wait_for(result, timeout)
    except asyncio.TimeoutError:
        status = "timeout"
    tls, peer = False, None
    if status == "ok" and client.transport is not None:
        ssl_object = client.transport.get_extra_info("ssl_object")
        tls = ssl_object is not None
        if tls:
            cert = ssl_object.getpeercert()
            peer = [v for kind, v in cert.get("subjectAltName", ()) if kind == "DNS"]
    return client, {"jid": spec["jid"], "status": status, "tls": tls, "peer": peer}


async def main(spec: dict) -> dict:
    timeout = float(spec.get("timeout", 20))
    inboxes = [asyncio.Queue() for _ in spec["clients"]]
    clients, logins = [], []
    for c, inbox in zip(spec["clients"], inboxes):
        client, info = await login(c, spec["ca"], timeout, inbox)
        clients.append(client)
        logins.append(info)
    received = []
    if spec.get("message") and len(clients) >= 2 and all(i["status"] == "ok" for i in logins):
        clients[0].send_message(mto=spec["clients"][1]["jid"], mbody=spec["message"], mtype="chat")
        try:
            received.append(await asyncio.wait_for(inboxes[1].get(), timeout))
        except asyncio.TimeoutError:
            pass
    for client in clients:
        client.disconnect()
    await asyncio.sleep(0.5)
    return {"logins": logins, "received": received}


if __name__ == "__main__":
    logging.basicConfig(level=logging.CRITICAL)
    print(json.dumps(asyncio.run(main(json.load(sys.stdin)))))
