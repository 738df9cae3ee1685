"""The lab's apt proxy is warmed once by lab.up: the hosts' first `apt-get update`s,
all at once, must find the suites' InRelease fresh in apt-cacher-ng's cache
(sixteen concurrent refreshes of one file made apt-cacher-ng 3.7 fail them over
and over). Here a real HTTP proxy on localhost records what prewarm asks it."""

from __future__ import annotations

import http.server
import threading
from types import SimpleNamespace

from fabfile.lab import apt_proxy
from fabfile.lab.plan import SUITE


class _Proxy(http.server.BaseHTTPRequestHandler):
    seen: list[str] = []

    def do_GET(self):  # noqa: N802 - http.server's name
        type(self).seen.append(self.path)
        body = b"-----BEGIN PGP SIGNED MESSAGE-----\n"
        code = 404 if "security" in self.path and type(self).fail_security else 200
        self.send_response(code)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


def _serve(fail_security: bool):
    _Proxy.seen, _Proxy.fail_security = [], fail_security
    server = http.server.HTTPServer(("127.0.0.1", 0), _Proxy)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server, SimpleNamespace(proxy_url=f"http://127.0.0.1:{server.server_address[1]}")


def test_prewarm_fetches_each_suites_inrelease_once_through_the_proxy():
    server, plan = _serve(fail_security=False)
    try:
        assert apt_proxy.prewarm(plan) == []
    finally:
        server.shutdown()
    assert _Proxy.seen == apt_proxy.index_urls()  # absolute URLs: asked as a proxy, one after the other
    assert {u.rsplit("/dists/", 1)[1] for u in _Proxy.seen} == {
        f"{SUITE}/InRelease", f"{SUITE}-updates/InRelease", f"{SUITE}-security/InRelease"}


def test_prewarm_reports_what_it_could_not_fetch_and_goes_on():
    server, plan = _serve(fail_security=True)
    try:
        missed = apt_proxy.prewarm(plan)
    finally:
        server.shutdown()
    assert len(_Proxy.seen) == 3
    assert len(missed) == 1 and "security" in missed[0] and "404" in missed[0]


def test_the_proxy_serves_indexes_fetched_within_the_hour_from_its_cache():
    assert "FreshIndexMaxAge: 3600" in apt_proxy.ACNG_CONF
