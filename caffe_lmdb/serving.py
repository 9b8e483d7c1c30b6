"""`caffe-lmdb serve`: a local, read-only web app to look inside LMDBs, and the rules that keep it safe.

The server is the standard library's `ThreadingHTTPServer`; `LmdbApp` answers each request. A URL
never names a file: the only paths are the fixed routes below, whose variable parts are the
number of a served LMDB and the index of a record (digits), looked up in memory; anything else,
`/../` and its encoded forms included, is a 404 that touches no file. The static files are
strings in `serve_pages`.

The security rules, as the local tools that do it best (Jupyter, Datasette) keep them:

* It listens on 127.0.0.1 unless told otherwise.
* The Host header must name the address it listens on (for 127.0.0.1 also `localhost`): a
  DNS-rebinding page, whose requests carry its own host name, gets 421.
* On any other address (`--host 0.0.0.0`) a random token (`secrets.token_urlsafe`) is printed in
  the URL at start; every request needs it: `?token=...` once (answered with a cookie and a
  redirect to the same URL without it), then the cookie. Without it: 403.
* GET and HEAD only (anything else: 405); every answer carries a Content-Security-Policy with
  no inline script or style (`default-src 'self'`), `X-Content-Type-Options: nosniff`, no
  framing (`frame-ancestors 'none'`, `X-Frame-Options: DENY`), no referrer, and
  `Cross-Origin-Resource-Policy: same-origin`.
* Page sizes are bounded (`MAX_PAGE`) and so are images (`served_lmdb.MAX_PIXELS`).
* Each LMDB is opened read-only without a lock file (`reader.LayoutReader`) and never written.

Routes (N: a served LMDB's number, I: a record index):

    /                                    the LMDBs served
    /db/N/                               overview (Datum LMDBs: info's counts, computed once)
    /db/N/gallery?start=&size=&label=&at=&key=   thumbnails, paged; filter, jump, search
    /db/N/record/I                       one record
    /db/N/thumb/I.png  /db/N/image/I.png?part=   its thumbnail, its image
    /db/N/download/I?part=  /db/N/value/I        its image bytes (or PNG), its LMDB value
    /db/N/problems[?run=1]               the check, run on request
    /db/N/transform/I  /db/N/transform/I/NAME.png   through the transform
    /db/N/status/overview.json  /db/N/status/check.json   progress of the background work
    /static/app.js  /static/style.css  /static/icon.svg
"""

from __future__ import annotations

import contextlib
import errno
import hmac
import ipaddress
import json
import logging
import os
import re
import secrets
import socket
import socketserver
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from http import HTTPStatus
from http.cookies import CookieError, SimpleCookie
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlencode, urlsplit

from .errors import CaffeLmdbError, LmdbNotFoundError, ServeError, TransformError, os_error_reason
from .serve_images import THUMB_SIDE, ByteCache, placeholder, png_bytes
from .serve_pages import (
    PAGE_SIZES,
    STATIC_FILES,
    gallery_page,
    gallery_url,
    index_page,
    key_text,
    message_page,
    overview_page,
    problems_page,
    record_page,
    record_url,
    transform_page,
    waiting_page,
)
from .serve_transform import Transforms, draw, draw_picture
from .served_lmdb import MAX_PIXELS, ServedLmdb

logger = logging.getLogger(__name__)

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 8000
#: The most thumbnails one gallery page shows, whatever `size` asks for.
MAX_PAGE = max(PAGE_SIZES)
#: Thumbnails per gallery page unless `size` says otherwise.
DEFAULT_PAGE = 100

#: Sent with every answer (see the module docstring).
SECURITY_HEADERS = (
    ("Content-Security-Policy", "default-src 'self'; img-src 'self'; style-src 'self'; script-src 'self'; "
                                "connect-src 'self'; object-src 'none'; base-uri 'none'; form-action 'self'; "
                                "frame-ancestors 'none'"),
    ("X-Content-Type-Options", "nosniff"),
    ("X-Frame-Options", "DENY"),
    ("Referrer-Policy", "no-referrer"),
    ("Cross-Origin-Resource-Policy", "same-origin"),
)

_N = r"(0|[1-9]\d{0,5})"
_I = r"(0|[1-9]\d{0,11})"
_ROUTES: tuple[tuple[re.Pattern[str], str], ...] = tuple((re.compile(pattern), name) for pattern, name in (
    (r"/", "index"),
    (r"/static/([a-z]+\.[a-z]+)", "static"),
    (rf"/db/{_N}/", "overview"),
    (rf"/db/{_N}/gallery", "gallery"),
    (rf"/db/{_N}/record/{_I}", "record"),
    (rf"/db/{_N}/thumb/{_I}\.png", "thumb"),
    (rf"/db/{_N}/image/{_I}\.png", "image"),
    (rf"/db/{_N}/download/{_I}", "download"),
    (rf"/db/{_N}/value/{_I}", "value"),
    (rf"/db/{_N}/problems", "problems"),
    (rf"/db/{_N}/transform/{_I}", "transform"),
    (rf"/db/{_N}/transform/{_I}/(test|train-\d)\.png", "transformed"),
    (rf"/db/{_N}/status/(overview|check)\.json", "status"),
))


@dataclass
class Response:
    """An answer: status, content type, body, and any other headers."""

    status: int
    body: bytes = b""
    content_type: str = "text/html; charset=utf-8"
    headers: list[tuple[str, str]] = field(default_factory=list)
    etag: str | None = None


class _NotFoundError(Exception):
    """The request names nothing served here (a 404 with this message)."""


class _BadRequestError(Exception):
    """A parameter that is not what its route takes (a 400 with this message)."""


def lmdb_paths(paths: Sequence[str | os.PathLike]) -> list[Path]:
    """The LMDBs to serve: each path that is an LMDB, and every LMDB under each folder that is not one.

    Raises:
        LmdbNotFoundError: a folder holds no LMDB.
    """
    found: list[Path] = []
    for given in paths:
        path = Path(given)
        if path.is_dir() and not (path / "data.mdb").exists():
            # lmdb_dataset imports torch: only a folder of LMDBs needs its search, so `serve` starts without it
            from .lmdb_dataset import find_lmdbs

            under = find_lmdbs(path)
            if not under:
                raise LmdbNotFoundError(f"{path}: no LMDB under this folder (no data.mdb, no single-file LMDB)")
            found += under
        else:
            found.append(path)
    unique: dict[str, Path] = {}
    for path in found:
        unique.setdefault(os.path.realpath(path), path)
    return list(unique.values())


class HostRule:
    """Which Host headers name this server: the address it listens on (and `localhost` for loopback).

    Listening on every address (`0.0.0.0`, `::`), any IP address is accepted, and the machine's own
    names: a DNS-rebinding page can only send its own host name, which is none of these.
    """

    def __init__(self, host: str, port: int) -> None:
        self.port = port
        name = host.strip("[]").lower()
        self.wildcard = name in ("", "0.0.0.0", "::")
        self.loopback = name == "localhost" or _is_loopback(name)
        self.names = {name}
        if self.loopback:
            self.names |= {"localhost", "127.0.0.1", "::1"}
        if self.wildcard:
            self.names |= {"localhost", socket.gethostname().lower(), socket.getfqdn().lower()}

    def allows(self, header: str | None) -> bool:
        if not header or len(header) > 300:
            return False
        try:
            parts = urlsplit("//" + header)
            port = parts.port if parts.port is not None else 80
        except ValueError:
            return False
        name = (parts.hostname or "").lower()
        if port != self.port or parts.username is not None or parts.path or not name:
            return False
        return name in self.names or (self.wildcard and _is_ip(name))


def _is_ip(name: str) -> bool:
    try:
        ipaddress.ip_address(name)
    except ValueError:
        return False
    return True


def _is_loopback(name: str) -> bool:
    return _is_ip(name) and ipaddress.ip_address(name).is_loopback


class LmdbApp:
    """The answers to requests, without sockets: security checks, then the route's page.

    Args:
        lmdbs: the LMDBs served, numbered in order.
        port: the port listened on (the Host header must carry it).
        host: the address listened on.
        token: the token every request must carry (None: none needed, on loopback).
        transforms: what the transform page shows (None: it says how to give one).
    """

    def __init__(self, lmdbs: Sequence[ServedLmdb], port: int, host: str = DEFAULT_HOST, token: str | None = None,
                 transforms: Transforms | None = None) -> None:
        self.lmdbs = list(lmdbs)
        self.port = port
        self.hosts = HostRule(host, port)
        self.token = token
        self.transforms = transforms
        self.cookie = f"caffe_lmdb_token_{port}"

    def handle(self, method: str, target: str, headers: Any) -> Response:
        """The answer to one request (`headers`: a mapping with `get`, as `http.server` gives)."""
        if not self.hosts.allows(headers.get("Host")):
            return _message(HTTPStatus.MISDIRECTED_REQUEST, "Wrong host",
                            "This server answers only requests addressed to it (Host header): a page of another "
                            "site cannot read it through a DNS name pointing here.")
        if method not in ("GET", "HEAD"):
            response = _message(HTTPStatus.METHOD_NOT_ALLOWED, "Method not allowed",
                                "This server only reads: GET and HEAD.")
            response.headers.append(("Allow", "GET, HEAD"))
            return response
        path, _, query_text = target.partition("?")
        try:
            query = parse_qs(query_text, keep_blank_values=True, max_num_fields=20)
        except ValueError:
            return _message(HTTPStatus.BAD_REQUEST, "Bad request", "Too many query parameters.")
        if self.token is not None:
            refused = self._check_token(path, query, headers)
            if refused is not None:
                return refused
        try:
            return self._route(path, query)
        except _NotFoundError as exc:
            return _message(HTTPStatus.NOT_FOUND, "Not found", str(exc))
        except _BadRequestError as exc:
            return _message(HTTPStatus.BAD_REQUEST, "Bad request", str(exc))
        except CaffeLmdbError as exc:  # the LMDB went away or was replaced while served: say so, keep serving
            return _message(HTTPStatus.INTERNAL_SERVER_ERROR, "Cannot read the LMDB", str(exc))

    def _check_token(self, path: str, query: dict[str, list[str]], headers: Any) -> Response | None:
        given = query.pop("token", [None])[0]
        if given is not None and hmac.compare_digest(given.encode(), self.token.encode()):
            rest = urlencode(query, doseq=True)
            response = Response(HTTPStatus.SEE_OTHER, headers=[("Location", path + (f"?{rest}" if rest else ""))])
            response.headers.append(("Set-Cookie", f"{self.cookie}={self.token}; Path=/; HttpOnly; SameSite=Lax"))
            return response
        cookies = SimpleCookie()
        with contextlib.suppress(CookieError):
            cookies.load(headers.get("Cookie") or "")
        kept = cookies.get(self.cookie)
        if kept is not None and hmac.compare_digest(kept.value.encode(), self.token.encode()):
            return None
        return _message(HTTPStatus.FORBIDDEN, "Token needed",
                        "Open the URL caffe-lmdb serve printed when it started: it carries the token.")

    # ------------------------------------------------------------------ routes

    def _route(self, path: str, query: dict[str, list[str]]) -> Response:
        for pattern, name in _ROUTES:
            match = pattern.fullmatch(path)
            if match is None:
                continue
            if name == "index":
                return _html(index_page(self.lmdbs))
            if name == "static":
                if match.group(1) not in STATIC_FILES:
                    raise _NotFoundError(f"no static file {match.group(1)}")
                content_type, body = STATIC_FILES[match.group(1)]
                return Response(HTTPStatus.OK, body, content_type, [("Cache-Control", "no-cache")])
            lmdb = self._lmdb(match.group(1))
            handler: Callable[..., Response] = getattr(self, f"_{name}")
            return handler(lmdb, *match.groups()[1:], query=query)
        raise _NotFoundError(f"nothing is served at {path[:200]}")

    def _lmdb(self, number: str) -> ServedLmdb:
        position = int(number)
        if position >= len(self.lmdbs):
            raise _NotFoundError(f"no LMDB number {position} (this server has {len(self.lmdbs)})")
        return self.lmdbs[position]

    def _overview(self, lmdb: ServedLmdb, query: dict[str, list[str]]) -> Response:
        return _html(overview_page(lmdb, lmdb.overview(), [] if lmdb.datum else lmdb.target_kinds()))

    def _gallery(self, lmdb: ServedLmdb, query: dict[str, list[str]]) -> Response:
        size = _number(query, "size")
        size = DEFAULT_PAGE if size is None else min(max(size, 1), MAX_PAGE)
        label = _number(query, "label") if lmdb.datum else None
        key = _text(query, "key")
        if key:
            return self._search(lmdb, key, size)
        start = max(_number(query, "start") or 0, 0)
        at = _number(query, "at")
        if at is not None:
            start = lmdb.position_of(_index(lmdb, at), label)
        if label is not None:
            job = lmdb.overview()
            if not job.finished:
                return _html(waiting_page(lmdb, job, "The class filter needs every record's label: counting them"))
        page = lmdb.page(start, size, label)
        if page is None:  # the count the class filter needs failed: the overview says why
            return _message(HTTPStatus.INTERNAL_SERVER_ERROR, "No class filter", f"Counting the records failed: "
                            f"{lmdb.overview().error}", lmdb)
        return _html(gallery_page(lmdb, page, [lmdb.record(i) for i in page.indices], _known_labels(lmdb)))

    def _search(self, lmdb: ServedLmdb, key: str, size: int) -> Response:
        index, found = lmdb.find(key)
        if index is not None:
            exact = found == key.encode("utf-8", "surrogateescape")
            target = record_url(lmdb, index) if exact else gallery_url(lmdb, index, size)
            return Response(HTTPStatus.SEE_OTHER, headers=[("Location", target)])
        notice = (f"No key starts with {key!r}." if found is None else
                  f"The LMDB has key {key_text(found)!r}, but the key list shown here does not (a stale keys file?).")
        page = lmdb.page(0, size)
        body = gallery_page(lmdb, page, [lmdb.record(i) for i in page.indices], _known_labels(lmdb), notice)
        return _html(body, HTTPStatus.NOT_FOUND)

    def _record(self, lmdb: ServedLmdb, index: str, query: dict[str, list[str]]) -> Response:
        record = lmdb.record(_index(lmdb, int(index)))
        return _html(record_page(lmdb, record, self.transforms, DEFAULT_PAGE))

    def _thumb(self, lmdb: ServedLmdb, index: str, query: dict[str, list[str]]) -> Response:
        body, problem = lmdb.thumbnail(_index(lmdb, int(index)))
        return _png(body, problem, etag=f"{_etag(lmdb)}-{index}-thumb")

    def _image(self, lmdb: ServedLmdb, index: str, query: dict[str, list[str]]) -> Response:
        i, part = _index(lmdb, int(index)), _part(lmdb, query)
        try:
            body, problem = png_bytes(lmdb.picture(i, part), compress_level=1), None
        except IndexError as exc:
            raise _NotFoundError(str(exc)) from None
        except CaffeLmdbError as exc:
            body, problem = png_bytes(placeholder(str(exc), 2 * THUMB_SIDE)), str(exc)
        return _png(body, problem, etag=f"{_etag(lmdb)}-{index}-{part}")

    def _download(self, lmdb: ServedLmdb, index: str, query: dict[str, list[str]]) -> Response:
        i, part = _index(lmdb, int(index)), _part(lmdb, query)
        try:
            body, suffix = lmdb.original(i, part)
        except IndexError as exc:
            raise _NotFoundError(str(exc)) from None
        except CaffeLmdbError as exc:
            return _message(HTTPStatus.UNPROCESSABLE_ENTITY, "Cannot make the image", str(exc), lmdb)
        return _attachment(body, _file_name(lmdb, i, suffix))

    def _value(self, lmdb: ServedLmdb, index: str, query: dict[str, list[str]]) -> Response:
        i = _index(lmdb, int(index))
        try:
            body = lmdb.values(i)
        except CaffeLmdbError as exc:
            return _message(HTTPStatus.UNPROCESSABLE_ENTITY, "Cannot read the value", str(exc), lmdb)
        return _attachment(body, _file_name(lmdb, i, ".datum" if lmdb.datum else ".bin"))

    def _problems(self, lmdb: ServedLmdb, query: dict[str, list[str]]) -> Response:
        if _text(query, "run"):
            lmdb.check(start=True)
            return Response(HTTPStatus.SEE_OTHER, headers=[("Location", f"/db/{lmdb.number}/problems")])
        return _html(problems_page(lmdb, lmdb.check()))

    def _transform(self, lmdb: ServedLmdb, index: str, query: dict[str, list[str]]) -> Response:
        i = _index(lmdb, int(index))
        record = lmdb.record(i)
        draws: list[Any] = []
        if self.transforms is not None:
            try:
                pixels = lmdb.pixels(i, self.transforms.test.record_pixels)
                draws = [draw(self.transforms, name, pixels, i) for name in self.transforms.names()]
            except (CaffeLmdbError, TransformError) as exc:
                draws.append(str(exc))
        return _html(transform_page(lmdb, record, self.transforms, draws, DEFAULT_PAGE))

    def _transformed(self, lmdb: ServedLmdb, index: str, name: str, query: dict[str, list[str]]) -> Response:
        i = _index(lmdb, int(index))
        if self.transforms is None or name not in self.transforms.names():
            raise _NotFoundError(f"no transform draw {name}")
        try:
            picture = draw_picture(self.transforms, name, lmdb.pixels(i, self.transforms.test.record_pixels), i)
            body, problem = png_bytes(picture), None
        except CaffeLmdbError as exc:
            body, problem = png_bytes(placeholder(str(exc), THUMB_SIDE)), str(exc)
        return _png(body, problem)

    def _status(self, lmdb: ServedLmdb, what: str, query: dict[str, list[str]]) -> Response:
        job = lmdb.overview() if what == "overview" else lmdb.check()
        if job is None:
            raise _NotFoundError(f"no {what} work for this LMDB")
        return Response(HTTPStatus.OK, json.dumps(job.status()).encode(), "application/json",
                        [("Cache-Control", "no-store")])


def _known_labels(lmdb: ServedLmdb) -> list[int]:
    """The labels the class menu offers: those counted (once the overview is done), else the class file's."""
    job = lmdb.overview()
    if job is not None and job.finished and job.result is not None:
        return sorted(job.result.info.labels)
    return list(range(len(lmdb.classes))) if lmdb.classes else []


def _number(query: dict[str, list[str]], name: str) -> int | None:
    text = _text(query, name)
    if not text:
        return None
    if not re.fullmatch(r"-?\d{1,12}", text):
        raise _BadRequestError(f"{name} must be a whole number, not {text[:40]!r}")
    return int(text)


def _text(query: dict[str, list[str]], name: str) -> str:
    values = query.get(name)
    return values[-1].strip()[:1000] if values else ""


def _index(lmdb: ServedLmdb, index: int) -> int:
    if not 0 <= index < len(lmdb):
        raise _NotFoundError(f"{lmdb.name} has no record {index} (it has {len(lmdb)}: 0 to {len(lmdb) - 1})")
    return index


def _part(lmdb: ServedLmdb, query: dict[str, list[str]]) -> int:
    part = _number(query, "part") or 0
    if not 0 <= part < 8:
        raise _NotFoundError(f"no image {part} in a sample")
    return part


def _etag(lmdb: ServedLmdb) -> str:
    return f"{lmdb.number}-" + "-".join(str(part) for part in lmdb.identity)


def _file_name(lmdb: ServedLmdb, index: int, suffix: str) -> str:
    """A download's file name from the record's key: letters, digits, `._-` kept, the rest `_`."""
    key = key_text(lmdb.record_key(index)).rsplit("/", 1)[-1]
    name = re.sub(r"[^A-Za-z0-9._-]", "_", key).lstrip(".")[:120] or f"record-{index}"
    return name if name.lower().endswith(suffix) else name + suffix


def _html(page: str, status: int = HTTPStatus.OK) -> Response:
    return Response(status, page.encode("utf-8"), headers=[("Cache-Control", "no-store")])


def _message(status: int, title: str, text: str, lmdb: ServedLmdb | None = None) -> Response:
    return _html(message_page(title, text, lmdb), status)


def _png(body: bytes, problem: str | None, etag: str | None = None) -> Response:
    headers = [("Cache-Control", "no-cache")]
    if problem is not None:  # the placeholder's reason, for tools (the page shows it as text)
        headers.append(("X-Caffe-Lmdb-Problem", problem.encode("ascii", "replace").decode()[:300]))
    return Response(HTTPStatus.OK, body, "image/png", headers, etag=f'"{etag}"' if etag else None)


def _attachment(body: bytes, name: str) -> Response:
    return Response(HTTPStatus.OK, body, "application/octet-stream",
                    [("Content-Disposition", f'attachment; filename="{name}"'), ("Cache-Control", "no-store")])


# --------------------------------------------------------------------------- the server

class _Handler(BaseHTTPRequestHandler):
    """Hands each request to the server's `LmdbApp` and writes its answer (with the security headers)."""

    server: LmdbServer
    protocol_version = "HTTP/1.1"
    server_version = "caffe-lmdb"
    sys_version = ""
    timeout = 120
    disable_nagle_algorithm = True  # headers and body go out as two writes: no 40 ms wait for a delayed ACK

    def do_GET(self) -> None:
        self._answer()

    def do_HEAD(self) -> None:
        self._answer()

    def __getattr__(self, name: str) -> Any:
        if name.startswith("do_"):  # every other method: the app answers 405
            return self._answer
        raise AttributeError(name)

    def _answer(self) -> None:
        if self.command not in ("GET", "HEAD"):
            self.close_connection = True  # its body, if any, is not read: do not parse it as a request
        try:
            response = self.server.app.handle(self.command, self.path, self.headers)
        except Exception:  # a bug answers 500 and the server goes on
            logger.exception("serve: %s %s failed", self.command, self.path[:200])
            response = _message(HTTPStatus.INTERNAL_SERVER_ERROR, "Server error", "See the server's log.")
        if response.etag is not None and self.headers.get("If-None-Match") == response.etag:
            response = Response(HTTPStatus.NOT_MODIFIED, etag=response.etag)
        self.send_response(response.status)
        if response.status != HTTPStatus.NOT_MODIFIED:
            self.send_header("Content-Type", response.content_type)
        for name, value in response.headers:
            self.send_header(name, value)
        if response.etag is not None:
            self.send_header("ETag", response.etag)
        self.send_header("Content-Length", str(len(response.body)))
        self.end_headers()
        if self.command != "HEAD" and response.body:
            self.wfile.write(response.body)

    def end_headers(self) -> None:
        for name, value in SECURITY_HEADERS:
            self.send_header(name, value)
        super().end_headers()

    def version_string(self) -> str:
        return self.server_version

    def log_message(self, format: str, *args: Any) -> None:
        logger.debug("serve: %s " + format, self.address_string(), *args)


class LmdbServer(ThreadingHTTPServer):
    """The HTTP server of `caffe-lmdb serve`: one thread per connection, answers from `app`."""

    daemon_threads = True
    block_on_close = False

    def __init__(self, host: str, port: int, lmdbs: Sequence[ServedLmdb], transforms: Transforms | None,
                 thumbnails: ByteCache | None = None) -> None:
        #: The thumbnail cache the LMDBs share.
        self.thumbnails = thumbnails if thumbnails is not None else ByteCache()
        self.address_family = socket.AF_INET6 if ":" in host else socket.AF_INET
        try:
            super().__init__((host.strip("[]"), port), _Handler)
        except OSError as exc:
            raise ServeError(f"cannot listen on {_netloc(host, port)}: {os_error_reason(exc)}"
                             + (" (choose another with --port, or --port 0 for any free one)"
                                if exc.errno == errno.EADDRINUSE else "")) from None
        self.host = host
        bound_port = self.server_address[1]
        token = None if HostRule(host, bound_port).loopback else secrets.token_urlsafe(24)
        self.app = LmdbApp(lmdbs, bound_port, host, token, transforms)

    def server_bind(self) -> None:
        # HTTPServer.server_bind looks the host's name up (socket.getfqdn): slow where DNS is, and unused here
        socketserver.TCPServer.server_bind(self)
        self.server_name, self.server_port = str(self.server_address[0]), self.server_address[1]

    def handle_error(self, request: Any, client_address: Any) -> None:
        logger.debug("serve: connection from %s ended with an error", client_address, exc_info=True)

    @property
    def url(self) -> str:
        """The URL to open (with the token, when one is needed)."""
        host = socket.gethostname() if self.app.hosts.wildcard else self.host
        query = f"?token={self.app.token}" if self.app.token is not None else ""
        return f"http://{_netloc(host, self.app.port)}/{query}"


def _netloc(host: str, port: int) -> str:
    host = host.strip("[]")
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def make_server(
    paths: Sequence[str | os.PathLike],
    host: str = DEFAULT_HOST,
    port: int = DEFAULT_PORT,
    *,
    transforms: Transforms | None = None,
    max_pixels: int = MAX_PIXELS,
) -> LmdbServer:
    """Open the LMDBs (folders: every LMDB under them) and bind the server; `serve_forever()` runs it.

    Raises:
        LmdbFormatError, CorruptLmdbError: an LMDB is missing, not an LMDB, or damaged.
        ServeError: the address cannot be listened on (e.g. the port is taken).
    """
    thumbnails = ByteCache()
    lmdbs = [ServedLmdb(path, number, thumbnails, max_pixels) for number, path in enumerate(lmdb_paths(paths))]
    return LmdbServer(host, port, lmdbs, transforms, thumbnails)


def serve(
    paths: Sequence[str | os.PathLike],
    host: str = DEFAULT_HOST,
    port: int = DEFAULT_PORT,
    *,
    transforms: Transforms | None = None,
    max_pixels: int = MAX_PIXELS,
    announce: Callable[[str], object] = print,
) -> None:
    """Serve LMDBs until Ctrl-C: look inside them in a web browser, read-only (see the module docstring).

    Args:
        paths: LMDBs, or folders holding LMDBs.
        host: the address to listen on; anything but loopback needs the printed token.
        port: the port; 0 takes any free one.
        transforms: what the transform page shows (`serve_transform.transforms_from`).
        max_pixels: images over this many pixels are not decoded.
        announce: called with the lines to print at start (the URL).

    Raises:
        As `make_server`.
    """
    server = make_server(paths, host, port, transforms=transforms, max_pixels=max_pixels)
    try:
        count = len(server.app.lmdbs)
        announce(f"Serving {count} LMDB{'s' if count != 1 else ''} at {server.url} (read-only; Ctrl-C stops it)")
        if server.app.token is not None:
            announce("Anyone who can reach this address and has the URL above can read the LMDBs.")
        server.serve_forever()
    except KeyboardInterrupt:  # Ctrl-C: the way to stop it
        pass
    finally:
        server.server_close()
