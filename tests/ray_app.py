"""A local Ray with Serve's HTTP proxy on a free 127.0.0.1 port, for test modules that run the real app.

Ray's temp dir goes under /tmp with a short name (its socket paths must stay under 108 bytes),
and everything is shut down and removed when the module is done.
"""

from __future__ import annotations

import shutil
import socket
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@contextmanager
def local_ray(num_cpus: int = 2, dashboard: bool = False, metrics_export_port: int | None = None) -> Iterator[None]:
    """A local Ray in a short temp dir under /tmp, shut down and removed afterwards.

    `dashboard` starts Ray's dashboard on a free port: the state API (`ray.util.state`) needs it.
    `metrics_export_port`: where Ray serves its Prometheus metrics (ray_serve_*), as on a cluster."""
    import ray

    ray_dir = tempfile.mkdtemp(prefix="vs", dir="/tmp")
    ray.init(_temp_dir=ray_dir, include_dashboard=dashboard, dashboard_port=free_port() if dashboard else None,
             num_cpus=num_cpus, log_to_driver=False, configure_logging=False,
             _metrics_export_port=metrics_export_port)
    try:
        yield
    finally:
        ray.shutdown()
        shutil.rmtree(ray_dir, ignore_errors=True)


@contextmanager
def local_serve(num_cpus: int = 2, dashboard: bool = False) -> Iterator[str]:
    """Start Ray and Serve; yield the proxy's base URL (deploy apps with `service.serve_cli.run_app`)."""
    from ray import serve

    with local_ray(num_cpus, dashboard):
        port = free_port()
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        try:
            yield f"http://127.0.0.1:{port}"
        finally:
            serve.shutdown()
