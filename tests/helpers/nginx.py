"""A throwaway nginx serving one folder on 127.0.0.1 (ports from ``tests.helpers.net.free_port``): the HTTP
server of the http tests and of ``bench/remote.py``.

No pytest here (the benchmarks import this module too): failures raise :class:`NginxError`, which the
test fixture turns into a failure (nginx is an oracle's dependency, never a reason to skip) and the
benchmark into its exit message.  Everything nginx writes (its pid, logs, temporary files and the
configuration) stays in the ``prefix`` folder; the workers run as the calling user, so they can read a
0700 temporary folder.
"""

from __future__ import annotations

import os
import pwd
import shutil
import socket
import subprocess
import time
from pathlib import Path

CONF = """\
daemon off;
user {user};
worker_processes 1;
pid {prefix}/nginx.pid;
error_log {prefix}/error.log;
events {{ worker_connections 64; }}
http {{
    access_log {access_log};
    client_body_temp_path {prefix}/tmp;
    proxy_temp_path {prefix}/tmp;
    fastcgi_temp_path {prefix}/tmp;
    uwsgi_temp_path {prefix}/tmp;
    scgi_temp_path {prefix}/tmp;
    default_type application/octet-stream;
    server {{
        listen 127.0.0.1:{http};
{tls}        root {www};
{locations}    }}
}}
"""

TLS = """\
        listen 127.0.0.1:{https} ssl;
        ssl_certificate {prefix}/cert.pem;
        ssl_certificate_key {prefix}/key.pem;
"""


class NginxError(RuntimeError):
    """nginx is missing, exited or never listened."""


def wait_port(port: int, proc: subprocess.Popen[bytes], timeout: float = 10) -> None:
    """Return once ``port`` accepts connections; NginxError if ``proc`` exits or the time runs out."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise NginxError(f"nginx exited: {proc.returncode}")
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            return
        except OSError:
            time.sleep(0.05)
    raise NginxError("nginx did not start listening")


def binary() -> str:
    nginx = shutil.which("nginx") or "/usr/sbin/nginx"
    if not Path(nginx).exists():
        raise NginxError("nginx is not installed; run 'make test' (it installs nginx-light)")
    return nginx


def start(prefix: Path, www: Path, http: int, *, https: int | None = None, access_log: bool = True,
          locations: dict[str, str] | None = None) -> subprocess.Popen[bytes]:
    """nginx serving ``www`` on ``http`` (and with TLS on ``https``: ``prefix/cert.pem`` and ``key.pem``
    must exist), listening when this returns; ``locations``: path -> directives of a ``location``."""
    nginx = binary()
    (prefix / "tmp").mkdir(exist_ok=True)
    conf = prefix / "nginx.conf"
    conf.write_text(CONF.format(
        user=pwd.getpwuid(os.getuid()).pw_name, prefix=prefix, www=www, http=http,
        access_log=f"{prefix}/access.log" if access_log else "off",
        tls="" if https is None else TLS.format(prefix=prefix, https=https),
        locations="".join(f"        location {path} {{ {body} }}\n" for path, body in (locations or {}).items())))
    proc = subprocess.Popen([nginx, "-c", str(conf), "-p", str(prefix)], stderr=subprocess.DEVNULL)
    try:
        wait_port(http, proc)
        if https is not None:
            wait_port(https, proc)
    except BaseException:
        stop(proc)
        raise
    return proc


def stop(proc: subprocess.Popen[bytes]) -> None:
    proc.terminate()
    try:
        proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
