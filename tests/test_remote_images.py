"""Remote image URLs against a real local HTTP server: fetches work, and nothing private can be reached.

127.0.0.1 is blocked like any non-public address, so tests that must reach the local server add
it to `remote_image_allowed_networks` (the UNSAFE switch); the refusal tests leave it out and check
that the server never saw a request.
"""

from __future__ import annotations

import ipaddress
import socket
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, urlparse

import pytest

from service.api import remote_images
from service.api.errors import APIError
from service.api.images import load_image
from service.api.remote_images import NOT_FETCHED, fetch_image, host_allowed, is_public
from service.config import Limits
from tests.ray_app import free_port
from tests.service_fixtures import encoded, noise_image

PNG = encoded(noise_image(5, (30, 20)))
LOOPBACK = ["127.0.0.1/32"]


class Server(ThreadingHTTPServer):
    daemon_threads = True
    seen: list[tuple[str, str]]

    def handle_error(self, request, client_address) -> None:
        """Clients that give up (the deadline tests) break the pipe: expected, not worth a traceback."""


class Handler(BaseHTTPRequestHandler):
    """/img.png, /redirect?to=URL, /hops?n=N (N redirects to itself), /big, /big-chunked, /slow, /drip, /missing."""

    server: Server

    def log_message(self, *args) -> None:
        return

    def do_GET(self) -> None:
        url = urlparse(self.path)
        query = parse_qs(url.query)
        self.server.seen.append((url.path, self.headers.get("Host", "")))
        if url.path == "/img.png":
            self._send(200, PNG, {"Content-Type": "image/png"})
        elif url.path == "/redirect":
            self._send(302, b"", {"Location": query["to"][0]})
        elif url.path == "/hops":
            n = int(query["n"][0])
            target = "/img.png" if n == 0 else f"/hops?n={n - 1}"
            self._send(302, b"", {"Location": target})
        elif url.path == "/big":
            self._send(200, b"\0" * 200_000, {"Content-Type": "image/png"})
        elif url.path == "/big-chunked":
            self.send_response(200)
            self.send_header("Transfer-Encoding", "chunked")
            self.end_headers()
            for _ in range(50):
                self.wfile.write(b"1000\r\n" + b"\0" * 4096 + b"\r\n")
            self.wfile.write(b"0\r\n\r\n")
        elif url.path == "/slow":
            time.sleep(3)
            self._send(200, PNG, {})
        elif url.path == "/drip":
            self.send_response(200)
            self.send_header("Content-Length", str(len(PNG)))
            self.end_headers()
            for byte in PNG:
                self.wfile.write(bytes([byte]))
                self.wfile.flush()
                time.sleep(0.2)
        else:
            self._send(404, b"not here", {})

    def _send(self, status: int, body: bytes, headers: dict[str, str]) -> None:
        self.send_response(status)
        for name, value in headers.items():
            self.send_header(name, value)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)


@pytest.fixture(scope="module")
def server() -> Iterator[Server]:
    httpd = Server(("127.0.0.1", 0), Handler)
    httpd.seen = []
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield httpd
    httpd.shutdown()
    httpd.server_close()


@pytest.fixture
def base(server: Server) -> str:
    server.seen.clear()
    return f"http://127.0.0.1:{server.server_address[1]}"


def _limits(**overrides) -> Limits:
    return Limits(**{"allow_remote_images": True, "max_image_bytes": 100_000, "remote_image_timeout_s": 5.0,
                     **overrides})


def _refused(url: str, limits: Limits) -> APIError:
    with pytest.raises(APIError) as caught:
        fetch_image(url, limits, "messages.0.content.0.image_url.url")
    assert caught.value.param == "messages.0.content.0.image_url.url"
    return caught.value


def test_a_fetch_through_the_local_server_decodes(base: str, server: Server) -> None:
    limits = _limits(remote_image_allowed_networks=LOOPBACK)
    assert fetch_image(f"{base}/img.png", limits) == PNG
    image = load_image(f"{base}/img.png", limits)
    assert image.size == (30, 20) and image.mode == "RGB"
    assert fetch_image(f"{base}/hops?n=2", limits) == PNG, "three redirects: the default bound"


def test_disabled_by_default(base: str, server: Server) -> None:
    error = _refused(f"{base}/img.png", Limits())
    assert error.status == 400 and "disabled" in error.message and server.seen == []


@pytest.mark.parametrize("host", ["127.0.0.1", "localhost", "[::1]", "0.0.0.0", "10.1.2.3", "192.168.0.10",
                                  "172.16.5.4", "169.254.169.254", "100.100.100.200", "[fd00:ec2::254]",
                                  "[::ffff:127.0.0.1]", "[64:ff9b::a9fe:a9fe]", "[2002:7f00:1::1]", "224.0.0.1",
                                  "240.0.0.1", "[ff02::1]", "[fe80::1]"])
def test_private_loopback_link_local_metadata_multicast_reserved_are_refused(host: str, server: Server) -> None:
    port = server.server_address[1]
    server.seen.clear()
    error = _refused(f"http://{host}:{port}/img.png", _limits())
    assert error.status == 400 and "private, loopback" in error.message
    assert server.seen == []


def test_public_address_classification() -> None:
    public = ["8.8.8.8", "1.1.1.1", "2606:4700:4700::1111", "2a00:1450:4001:80b::200e"]
    assert all(is_public(ipaddress.ip_address(a)) for a in public)
    blocked = ["127.0.0.1", "10.0.0.1", "169.254.169.254", "100.64.0.1", "224.0.0.251", "255.255.255.255",
               "::1", "fe80::1", "fc00::1", "::ffff:10.0.0.1", "64:ff9b::7f00:1", "2001:db8::1"]
    assert not any(is_public(ipaddress.ip_address(a)) for a in blocked)


def test_a_redirect_to_a_blocked_address_is_refused_before_connecting(base: str, server: Server) -> None:
    limits = _limits(remote_image_allowed_networks=LOOPBACK)
    for target in ("http://169.254.169.254/latest/meta-data/", "http://10.0.0.1/", "http://[::1]:1/x",
                   f"http://127.0.0.2:{server.server_address[1]}/img.png"):
        server.seen.clear()
        error = _refused(f"{base}/redirect?to={target}", limits)
        assert error.status == 400 and "private, loopback" in error.message, target
        assert [path for path, _ in server.seen] == ["/redirect"]


def test_redirects_are_bounded(base: str) -> None:
    error = _refused(f"{base}/hops?n=3", _limits(remote_image_allowed_networks=LOOPBACK,
                                                 remote_image_max_redirects=3))
    assert error.status == 400 and "more than 3 times" in error.message


def test_oversize_bodies_are_refused(base: str) -> None:
    limits = _limits(remote_image_allowed_networks=LOOPBACK)
    for path in ("/big", "/big-chunked"):
        error = _refused(f"{base}{path}", limits)
        assert error.status == 413 and "100000 bytes" in error.message, path


def test_slow_servers_hit_one_deadline(base: str) -> None:
    limits = _limits(remote_image_allowed_networks=LOOPBACK, remote_image_timeout_s=1.0)
    for path in ("/slow", "/drip"):
        start = time.monotonic()
        error = _refused(f"{base}{path}", limits)
        assert error.status == 400 and error.message == NOT_FETCHED, path
        assert time.monotonic() - start < 2.5, path


def test_network_errors_are_not_echoed(base: str) -> None:
    """A closed port, a 404 and a timeout read the same: the endpoint is no port scanner."""
    limits = _limits(remote_image_allowed_networks=LOOPBACK, remote_image_timeout_s=1.0)
    closed = f"http://127.0.0.1:{free_port()}/img.png"
    messages = {_refused(url, limits).message for url in (closed, f"{base}/missing", f"{base}/slow")}
    assert messages == {NOT_FETCHED}


def test_hosts_outside_the_allow_list_are_refused(base: str, server: Server) -> None:
    port = server.server_address[1]
    limits = _limits(remote_image_allowed_networks=LOOPBACK, remote_image_hosts=["images.example.com"])
    error = _refused(f"http://localhost:{port}/img.png", limits)
    assert error.status == 400 and "'localhost' is not in the allowed image hosts" in error.message
    allowed = _limits(remote_image_allowed_networks=LOOPBACK, remote_image_hosts=["localhost"])
    error = _refused(f"http://localhost:{port}/redirect?to=http://127.0.0.1:{port}/img.png", allowed)
    assert "'127.0.0.1' is not in the allowed" in error.message
    assert server.seen == [("/redirect", f"localhost:{port}")]
    assert host_allowed("a.example.com", ["*.example.com"]) and not host_allowed("example.com", ["*.example.com"])
    assert host_allowed("Example.COM.", ["example.com"]) and not host_allowed("badexample.com", ["*.example.com"])


def test_the_checked_address_is_the_one_connected_to(base: str, server: Server, monkeypatch) -> None:
    """One DNS lookup per hop; the connection goes to its answer, with the name kept in Host (no rebinding gap)."""
    port = server.server_address[1]
    lookups: list[str] = []
    real = socket.getaddrinfo

    def counting(host, *args, **kwargs):
        lookups.append(host)
        return real(host, *args, **kwargs)

    monkeypatch.setattr(remote_images.socket, "getaddrinfo", counting)
    limits = _limits(remote_image_allowed_networks=["127.0.0.1/32", "::1/128"])
    assert fetch_image(f"http://localhost:{port}/img.png", limits) == PNG
    assert lookups.count("localhost") == 1
    assert server.seen[-1] == ("/img.png", f"localhost:{port}")


@pytest.fixture(scope="module")
def tls_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Server, Path]]:
    """The same server over HTTPS with a certificate for the name `localhost` only, from a throwaway CA."""
    import ssl

    import trustme

    authority = trustme.CA()
    ca_file = tmp_path_factory.mktemp("tls") / "ca.pem"
    authority.cert_pem.write_to_path(str(ca_file))
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    authority.issue_cert("localhost").configure_cert(context)
    httpd = Server(("127.0.0.1", 0), Handler)
    httpd.seen = []
    httpd.socket = context.wrap_socket(httpd.socket, server_side=True)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield httpd, ca_file
    httpd.shutdown()
    httpd.server_close()


def test_https_is_verified_against_the_name_while_connecting_to_the_checked_ip(tls_server) -> None:
    httpd, ca_file = tls_server
    port = httpd.server_address[1]
    limits = _limits(remote_image_allowed_networks=["127.0.0.1/32", "::1/128"], remote_image_ca_file=ca_file)
    assert fetch_image(f"https://localhost:{port}/img.png", limits) == PNG
    assert httpd.seen[-1] == ("/img.png", f"localhost:{port}")
    by_ip = _refused(f"https://127.0.0.1:{port}/img.png", limits)
    assert by_ip.message == NOT_FETCHED, "the certificate names localhost, not 127.0.0.1"
    public_cas = _limits(remote_image_allowed_networks=["127.0.0.1/32", "::1/128"])
    assert _refused(f"https://localhost:{port}/img.png", public_cas).message == NOT_FETCHED, \
        "certifi's CAs do not know the throwaway CA"
