"""Fetch a chat `image_url` over http(s) without letting a client reach what the server can reach.

A URL is a request to make from inside the cluster, so every hop is checked: the host against the
allow-list, then its DNS answers (every address must be public: no private, loopback, link-local,
multicast, reserved or metadata address, including IPv4 embedded in IPv6), and the connection goes
to the address that was checked (the URL's host is replaced by the IP; `Host` and TLS SNI keep the
name), so a second DNS answer cannot rebind it. Redirects are followed here, one checked hop at a
time. One deadline bounds DNS, connects, redirects and the body; the body is read raw (no
decompression) and bounded by `max_image_bytes`. Network failures all get one generic message, so
the endpoint cannot be used to tell open ports from closed or filtered ones.
"""

from __future__ import annotations

import ipaddress
import socket
import ssl
import time
from concurrent.futures import ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout

import httpx

from service.api.errors import APIError
from service.config import Limits

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address

NOT_FETCHED = "the image URL could not be fetched (network error, timeout or an answer other than 200)"
REDIRECTS = frozenset({301, 302, 303, 307, 308})
_NAT64 = ipaddress.ip_network("64:ff9b::/96")
_DNS = ThreadPoolExecutor(max_workers=4, thread_name_prefix="image-url-dns")
"""getaddrinfo has no timeout: it runs here so the deadline can stop waiting for it (a few threads at most)."""


class _NotFetched(Exception):
    """A network-level failure; reported to the client only as NOT_FETCHED."""


def embedded_ipv4(ip: IPAddress) -> ipaddress.IPv4Address | None:
    """The IPv4 address an IPv6 address carries (mapped, 6to4, Teredo client, NAT64), if any."""
    if isinstance(ip, ipaddress.IPv4Address):
        return None
    if ip.ipv4_mapped is not None:
        return ip.ipv4_mapped
    if ip.sixtofour is not None:
        return ip.sixtofour
    if ip.teredo is not None:
        return ip.teredo[1]
    if ip in _NAT64:
        return ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF)
    return None


def is_public(ip: IPAddress) -> bool:
    """True for a globally routable unicast address (and, for IPv6, any IPv4 inside it is one too)."""
    inner = embedded_ipv4(ip)
    if inner is not None and not is_public(inner):
        return False
    return ip.is_global and not (ip.is_multicast or ip.is_reserved or ip.is_loopback or ip.is_link_local
                                 or ip.is_unspecified or ip.is_private)


def host_allowed(host: str, allowed: list[str]) -> bool:
    """Empty list: any host. Else an exact name, or `*.example.com` for its subdomains."""
    if not allowed:
        return True
    host = host.lower().rstrip(".")
    for entry in (e.lower().rstrip(".") for e in allowed):
        if host == entry or (entry.startswith("*.") and host.endswith(entry[1:])):
            return True
    return False


def _address_allowed(ip: IPAddress, limits: Limits) -> bool:
    return is_public(ip) or any(ip in network for network in limits.remote_image_allowed_networks)


def _resolve(host: str, port: int, deadline: float) -> list[IPAddress]:
    try:
        return [ipaddress.ip_address(host)]
    except ValueError:
        pass
    try:
        infos = _DNS.submit(socket.getaddrinfo, host, port, type=socket.SOCK_STREAM).result(
            timeout=max(0.0, deadline - time.monotonic()))
    except (OSError, FutureTimeout) as exc:
        raise _NotFetched from exc
    addresses = list(dict.fromkeys(ipaddress.ip_address(str(info[4][0]).split("%")[0]) for info in infos))
    if not addresses:
        raise _NotFetched
    return addresses


def _parse(url: str | httpx.URL, param: str) -> httpx.URL:
    try:
        parsed = httpx.URL(url)
    except (httpx.InvalidURL, TypeError, ValueError) as exc:
        raise APIError(400, "malformed image URL", param) from exc
    if parsed.scheme not in ("http", "https") or not parsed.host:
        raise APIError(400, "image URLs must be http(s) with a host", param)
    return parsed


def _pinned_request(client: httpx.Client, url: httpx.URL, ip: IPAddress, deadline: float) -> httpx.Request:
    """A GET of `url` sent to `ip`: Host header and TLS server name stay the URL's host."""
    extensions: dict[str, object] = {"timeout": httpx.Timeout(max(0.01, deadline - time.monotonic())).as_dict()}
    try:
        ipaddress.ip_address(url.host)
    except ValueError:
        extensions["sni_hostname"] = url.host
    return client.build_request("GET", url.copy_with(host=str(ip)), extensions=extensions,
                                headers={"Host": url.netloc.decode("ascii"), "Accept-Encoding": "identity",
                                         "Accept": "image/*"})


def _tls(limits: Limits) -> ssl.SSLContext | bool:
    """Certificates are always verified, against the URL's host name (not the pinned IP)."""
    if limits.remote_image_ca_file is None:
        return True
    return ssl.create_default_context(cafile=str(limits.remote_image_ca_file))


def _connect(client: httpx.Client, url: httpx.URL, addresses: list[IPAddress], deadline: float) -> httpx.Response:
    """The response from the first of the checked `addresses` that accepts a connection."""
    for ip in addresses:
        try:
            return client.send(_pinned_request(client, url, ip, deadline), stream=True)
        except httpx.ConnectError:
            if time.monotonic() > deadline:
                break
    raise _NotFetched


def _body(response: httpx.Response, limits: Limits, deadline: float, param: str) -> bytes:
    declared = response.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limits.max_image_bytes:
        raise APIError(413, f"image exceeds {limits.max_image_bytes} bytes", param)
    chunks, total = [], 0
    for chunk in response.iter_raw():
        total += len(chunk)
        if total > limits.max_image_bytes:
            raise APIError(413, f"image exceeds {limits.max_image_bytes} bytes", param)
        if time.monotonic() > deadline:
            raise _NotFetched
        chunks.append(chunk)
    return b"".join(chunks)


def fetch_image(url: str, limits: Limits, param: str = "image") -> bytes:
    """The bytes at `url` if remote images are enabled and every hop passes the checks; else an APIError."""
    if not limits.allow_remote_images:
        raise APIError(400, "remote image URLs are disabled on this server; send a data URL or base64", param)
    deadline = time.monotonic() + limits.remote_image_timeout_s
    current = _parse(url, param)
    try:
        with httpx.Client(follow_redirects=False, trust_env=False, verify=_tls(limits)) as client:
            for _ in range(limits.remote_image_max_redirects + 1):
                if not host_allowed(current.host, limits.remote_image_hosts):
                    raise APIError(400, f"image host {current.host!r} is not in the allowed image hosts", param)
                addresses = _resolve(current.host, current.port or (443 if current.scheme == "https" else 80),
                                     deadline)
                if not all(_address_allowed(ip, limits) for ip in addresses):
                    raise APIError(400, "the image URL points to a private, loopback, link-local, multicast or "
                                   "reserved address", param)
                response = _connect(client, current, addresses, deadline)
                try:
                    if response.status_code in REDIRECTS and "location" in response.headers:
                        current = _parse(current.join(response.headers["location"]), param)
                        continue
                    if response.status_code != 200:
                        raise _NotFetched
                    return _body(response, limits, deadline, param)
                finally:
                    response.close()
    except (_NotFetched, httpx.HTTPError, OSError) as exc:
        raise APIError(400, NOT_FETCHED, param) from exc
    raise APIError(400, f"the image URL redirected more than {limits.remote_image_max_redirects} times", param)
