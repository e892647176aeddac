"""`tspd serve`: a local HTTP server (standard library only) for the dashboard page and its JSON API.

Every API answer is JSON; a request the dashboard cannot serve gets a 4xx with {"error": message}.
The endpoints are listed in API below and documented in the README ("Dashboard").

Example:
    >>> from tspd.app.server import make_server
    >>> server = make_server("runs/induction", port=0)         # doctest: +SKIP
    >>> server.url                                               # doctest: +SKIP
    'http://127.0.0.1:54321/'
"""

from __future__ import annotations

import errno
import json
import math
import socket
import sys
import threading
import time
import traceback
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Callable
from urllib.parse import parse_qs, urlsplit

import torch

from tspd.app.adapters import Adapter
from tspd.app.session import AppError, RunRegistry, _integer, _show
from tspd.config import ConfigError

STATIC_DIR = Path(__file__).resolve().parent / "static"
CONTENT_TYPES = {".html": "text/html; charset=utf-8", ".js": "text/javascript; charset=utf-8",
                 ".css": "text/css; charset=utf-8", ".svg": "image/svg+xml"}
MAX_BODY = 1 << 20  # a prompt is text: a megabyte is plenty, and bounds what one request can make us read
MAX_TOP_K = 50
BACKLOG = 128  # connections waiting to be accepted (socketserver's default, 5, resets a burst of requests)


def _top_k(value) -> int:
    if value is None:
        return 8
    k = _integer(value)  # a JSON integer, or ASCII digits from the query string (like seed and idx)
    if k is None or not 1 <= k <= MAX_TOP_K:
        raise AppError(f"'top_k' must be an integer in 1..{MAX_TOP_K}, got {_show(value)}")
    return k


# (method, path) -> handler(registry, params): params merge the query string and the JSON body.
API: dict[tuple[str, str], Callable[[RunRegistry, dict], dict]] = {
    ("GET", "/api/runs"): lambda r, p: {"runs": r.names()},
    ("GET", "/api/run"): lambda r, p: r.get(p.get("run")).info(),
    ("GET", "/api/metrics"): lambda r, p: r.get(p.get("run")).metrics(),
    ("GET", "/api/tables"): lambda r, p: r.get(p.get("run")).tables(),
    ("GET", "/api/sample"): lambda r, p: r.get(p.get("run")).sample_prompt(p.get("seed", 0)),
    ("GET", "/api/subcomponents"): lambda r, p: r.get(p.get("run")).subcomponent_list(p.get("site")),
    ("GET", "/api/subcomponent"): lambda r, p: r.get(p.get("run")).subcomponent(p.get("site"), p.get("idx")),
    ("POST", "/api/prompt"): lambda r, p: r.get(p.get("run")).analyse(p.get("prompt"), _top_k(p.get("top_k"))),
    ("POST", "/api/ablate"): lambda r, p: r.get(p.get("run")).ablate(
        p.get("prompt"), p.get("ablations"), p.get("base", "ones"), _top_k(p.get("top_k"))),
}


def _finite(obj):
    """A copy of a JSON-able object with every non-finite float replaced by None."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_finite(v) for v in obj]
    return obj


class Handler(BaseHTTPRequestHandler):
    server: "DashboardServer"
    server_version = "tspd-dashboard"
    timeout = 30  # a client that stops sending mid-request cannot hold a thread forever

    def log_message(self, format, *args):  # noqa: A002 (the base class's name)
        if self.server.verbose:
            super().log_message(format, *args)

    def do_GET(self):
        """GET, and HEAD: the same answer's status and headers, without the body."""
        t0 = time.perf_counter()
        url = urlsplit(self.path)
        if url.path.startswith("/api/"):
            self._api(self.command, url.path, self._query(url.query), t0)
        else:
            self._static(url.path, t0)

    do_HEAD = do_GET

    def do_POST(self):
        t0 = time.perf_counter()
        url = urlsplit(self.path)
        params = self._query(url.query)
        try:
            params.update(self._body())
        except AppError as err:
            self._json(err.status, {"error": str(err), "status": err.status}, server_ms=(time.perf_counter() - t0) * 1000)
            return
        self._api("POST", url.path, params, t0)

    def _other_method(self):
        """PUT, DELETE, PATCH, OPTIONS: the API's 405 (or 404) in JSON, not http.server's 501 page."""
        self.close_connection = True  # its body, if any, is not read
        self._api(self.command, urlsplit(self.path).path, {}, time.perf_counter())

    do_PUT = do_DELETE = do_PATCH = do_OPTIONS = _other_method

    def send_error(self, code, message=None, explain=None):
        """http.server's own refusals (a malformed request line, an unknown method, headers too
        long): JSON like every other answer, not its HTML page."""
        self.close_connection = True
        short = self.responses.get(code, ("error",))[0]
        self._json(code, {"error": f"{message or short}{f' ({explain})' if explain else ''}", "status": code}, server_ms=0.0)

    @staticmethod
    def _query(query: str) -> dict:
        return {k: v[-1] for k, v in parse_qs(query).items()}

    def _body(self) -> dict:
        length = self.headers.get("Content-Length")
        if length is None or not (length.isascii() and length.isdigit()):  # '²'.isdigit() is True; int('²') fails
            self.close_connection = True
            raise AppError("send a JSON body with a Content-Length header (its size in bytes)"
                           + (f", not {_show(length)}" if length is not None else ""), 411)
        n = int(length) if len(length) <= 18 else MAX_BODY + 1  # int() refuses more than 4300 digits
        if n > MAX_BODY:
            self.close_connection = True  # the unread body must not be parsed as the next request
            raise AppError(f"the body has {length if len(length) <= 20 else length[:20] + '...'} bytes; the limit is {MAX_BODY}", 413)
        raw = self.rfile.read(n)
        if len(raw) < n:  # the client closed its side early
            self.close_connection = True
            raise AppError(f"the body has {len(raw)} bytes, fewer than its Content-Length {length}")
        try:
            body = json.loads(raw or b"{}")
        except RecursionError:
            raise AppError("the body is not JSON this server reads: it nests too deeply") from None
        except ValueError as err:  # JSONDecodeError, UnicodeDecodeError, a number of more than 4300 digits
            raise AppError(f"the body is not valid JSON: {str(err)[:200]}") from None
        if not isinstance(body, dict):
            raise AppError(f"the body must be a JSON object, got {type(body).__name__}")
        return body

    def _api(self, method: str, path: str, params: dict, t0: float) -> None:
        handler = API.get(("GET" if method == "HEAD" else method, path))
        allowed = None
        try:
            if handler is None:
                allowed = [m for m, p in API if p == path]
                if allowed:
                    raise AppError(f"{path} takes {', '.join(allowed)}, not {method}", 405)
                raise AppError(f"no endpoint {path}; endpoints: {sorted({p for _, p in API})}", 404)
            status, result = 200, handler(self.server.registry, params)
        except AppError as err:
            status, result = err.status, {"error": str(err), "status": err.status}
        except Exception as err:  # a bug, not bad input: say so rather than drop the connection
            traceback.print_exc(file=sys.stderr)
            status, result = 500, {"error": f"internal error ({type(err).__name__}: {err})", "status": 500}
        extra = {"Allow": ", ".join(allowed + (["HEAD"] if "GET" in allowed else []))} if status == 405 and allowed else {}
        self._json(status, result, server_ms=(time.perf_counter() - t0) * 1000, headers=extra)

    def _json(self, status: int, obj: dict, server_ms: float, headers: dict | None = None) -> None:
        # NaN / inf (e.g. a mean over an empty group in a run's JSON files) as null: browsers'
        # JSON.parse rejects Python's NaN, which would blank the whole page.
        data = json.dumps(_finite(obj), separators=(",", ":"), allow_nan=False).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.send_header("Cache-Control", "no-store")
        self.send_header("Server-Timing", f"app;dur={server_ms:.1f}")
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        self.end_headers()
        if self.command != "HEAD":  # HEAD: the headers GET would send, no body
            self.wfile.write(data)

    def _static(self, path: str, t0: float) -> None:
        name = "index.html" if path in ("/", "/index.html") else path.removeprefix("/static/")
        file = STATIC_DIR / name
        # Only files that sit directly in static/: no path from the URL reaches anything else.
        if "/" in name or name.startswith(".") or not file.is_file():
            data, ctype, status = b"not found", "text/plain; charset=utf-8", 404
        else:
            data, ctype, status = file.read_bytes(), CONTENT_TYPES.get(file.suffix, "application/octet-stream"), 200
        self.send_response(status)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(data)))
        self.send_header("Server-Timing", f"app;dur={(time.perf_counter() - t0) * 1000:.1f}")
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(data)


class DashboardServer(ThreadingHTTPServer):
    daemon_threads = True
    request_queue_size = BACKLOG

    def __init__(self, registry: RunRegistry, host: str, port: int, verbose: bool = False):
        super().__init__((host, port), Handler)
        self.registry, self.verbose = registry, verbose

    @property
    def url(self) -> str:
        host, port = self.server_address[:2]
        return f"http://{host}:{port}/"

    def start_background(self) -> threading.Thread:
        """Serve from a daemon thread (tests, notebooks); stop with .shutdown()."""
        thread = threading.Thread(target=self.serve_forever, daemon=True)
        thread.start()
        return thread


def make_server(path: str | Path, host: str = "127.0.0.1", port: int = 8765, adapter: Adapter | None = None,
                verbose: bool = False) -> DashboardServer:
    """A dashboard server over a run folder (or a folder of runs). A single run is loaded now, so a
    broken run folder fails here and not on the first page load."""
    registry = RunRegistry(path, adapter)
    if len(registry.runs) == 1:
        try:
            registry.get(None)
        except AppError as err:
            raise ConfigError(str(err)) from None
    try:
        return DashboardServer(registry, host, port, verbose)
    except OSError as err:
        if isinstance(err, socket.gaierror) or err.errno == errno.EADDRNOTAVAIL:  # the address, not the port
            raise OSError(f"cannot listen on {host}:{port}: {host!r} is not an address of this machine ({err.strerror}); "
                          "pass another --host (127.0.0.1: this machine only)") from None
        raise OSError(f"cannot listen on {host}:{port} ({err.strerror}); pass another --port (0 picks a free one)") from None


def serve(path: str | Path, host: str = "127.0.0.1", port: int = 8765, adapter: Adapter | None = None,
          threads: int | None = 1) -> None:
    """Serve the dashboard until interrupted (Ctrl-C). `threads`: torch CPU threads (None: torch's
    default); one suits toy runs, whose tiny ops otherwise wait on thread barriers when cores are busy.

    Example: `tspd.app.serve("runs/induction")`, then open http://127.0.0.1:8765/
    """
    if threads is not None:
        torch.set_num_threads(threads)
    server = make_server(path, host, port, adapter, verbose=True)
    print(f"tspd dashboard for {', '.join(server.registry.names())}: {server.url}  (Ctrl-C stops)", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
