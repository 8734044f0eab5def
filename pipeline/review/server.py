"""`make review`: a local web page to go through an audit's findings and decide.

The audit (`make audit`) lists suspects; only a person can say whether a photo
in `dogs/` that the probe calls a cat is mislabelled, a cat-and-dog photo, or
fine. This server shows the findings with thumbnails and records each decision
in the dataset's decisions file (`pipeline.decisions`), which training applies.

Standard library only (`http.server`, threads), plus Pillow for thumbnails: no
web framework to install, nothing to build. Bound to 127.0.0.1, never to other
hosts: it serves image files to whoever connects. It also refuses requests whose
Host header is not its own address (a web page elsewhere could otherwise point
a DNS name at 127.0.0.1 and read the API) and POSTs that are not JSON from its
own origin (a cross-site form cannot send application/json without asking).

API (JSON; errors are {"error": "<one line>"} with a 4xx status):

- GET  /api/meta: audit path, class names, audit counts, sections with totals,
  decision counts.
- GET  /api/items?section=label|duplicates|leaks|outliers&offset=0&limit=50:
  {"section", "total", "offset", "limit", "items": [...]}; each item's members
  carry id, split, label, sha256, thumb URL and current decision (or null).
- GET  /api/decisions: {"decisions": [rows of the decisions file, latest per image], "counts"}.
- POST /api/decisions {"id", "decision", "label"?, "sha256"?}: records one
  decision; 409 when `sha256` is given and the file's bytes no longer match it.
- GET  /thumb/data/<id>?size=N, /thumb/audit/<file>?size=N: JPEG thumbnails of
  files under the data folder or the audit folder only.
"""

from __future__ import annotations

import json
import logging
import signal
import threading
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, quote, unquote, urlsplit

from pipeline.decisions import DecisionStore, dataset_of, decision_counts, decisions_path, digest_cache_for
from pipeline.digests import DigestCache
from pipeline.errors import ConfigError
from pipeline.review.files import Forbidden, NotFound, Thumbnails, Unreadable, resolve_under
from pipeline.review.sections import SECTIONS, Audit, find_audit, read_audit

log = logging.getLogger(__name__)

STATIC = Path(__file__).resolve().parent / "static"
#: The only files served from static/: a fixed table, so no request path reaches the disk.
STATIC_FILES = {
    "/": ("index.html", "text/html; charset=utf-8"),
    "/index.html": ("index.html", "text/html; charset=utf-8"),
    "/app.js": ("app.js", "text/javascript; charset=utf-8"),
    "/style.css": ("style.css", "text/css; charset=utf-8"),
}
DEFAULT_LIMIT, MAX_LIMIT = 50, 500
MAX_BODY = 64 << 10
HOST = "127.0.0.1"


class HttpError(Exception):
    """A request answered with `status` and a one-line JSON error."""

    def __init__(self, status: HTTPStatus, message: str) -> None:
        super().__init__(message)
        self.status = status


# ------------------------------------------------------------------ the app
class ReviewApp:
    """What requests act on: one audit, its decision store and the file caches (no module state)."""

    def __init__(self, audit: Audit, store: DecisionStore) -> None:
        self.audit = audit
        self.store = store
        self.digests = DigestCache(digest_cache_for(store.path))
        self.thumbnails = Thumbnails()

    def meta(self) -> dict[str, Any]:
        return {
            **self.audit.summary(),
            "decisions_file": str(self.store.path),
            "decisions": decision_counts(self.store.current()),
        }

    def items(self, section: str, offset: int, limit: int) -> dict[str, Any]:
        """One page of a section, its members' sha256 and decisions looked up now (only this page's files are read)."""
        if section not in SECTIONS:
            raise HttpError(
                HTTPStatus.BAD_REQUEST, f"Expected section in {', '.join(SECTIONS)}. Received: {section!r}."
            )
        if offset < 0 or not 1 <= limit <= MAX_LIMIT:
            raise HttpError(
                HTTPStatus.BAD_REQUEST,
                f"Expected offset >= 0 and limit in 1..{MAX_LIMIT}. Received: offset={offset}, limit={limit}.",
            )
        every = self.audit.sections[section]
        page = []
        for item in every[offset : offset + limit]:
            page.append(
                {
                    **item,
                    "members": [self._member(m) for m in item["members"]],
                    "context": [self._member(m, decisions=False) for m in item.get("context", [])],
                }
            )
        return {"section": section, "total": len(every), "offset": offset, "limit": limit, "items": page}

    def _member(self, member: Mapping[str, Any], *, decisions: bool = True) -> dict[str, Any]:
        out = {**member, "thumb": None, "sha256": None, "decision": None, "missing": True}
        if self.audit.data_dir is None:
            return out
        try:
            path = resolve_under(self.audit.data_dir, member["id"])
        except (Forbidden, NotFound):
            return out
        out["thumb"] = "/thumb/data/" + quote(member["id"])
        out["missing"] = False
        if decisions:
            out["sha256"] = self.digests.of(path)
            found = self.store.get(out["sha256"]) if out["sha256"] else None
            out["decision"] = found.to_dict() if found else None
        return out

    def decide(self, payload: Any) -> dict[str, Any]:
        """Records one decision named by image id; the sha256 is computed here from the file, never trusted."""
        if not isinstance(payload, dict) or not isinstance(payload.get("id"), str):
            raise HttpError(
                HTTPStatus.BAD_REQUEST,
                'Expected a JSON object {"id": "<path in the data folder>", "decision": ..., "label": ...}.',
            )
        if self.audit.data_dir is None:
            raise HttpError(HTTPStatus.CONFLICT, "This audit names no image files (tfds?); decisions need files.")
        path = self._resolve("data", payload["id"])
        digest = self.digests.of(path)
        if digest is None:
            raise HttpError(HTTPStatus.NOT_FOUND, f"Cannot read {payload['id']!r}; was it moved?")
        if payload.get("sha256") and payload["sha256"] != digest:
            raise HttpError(HTTPStatus.CONFLICT, f"{payload['id']} changed since the page listed it; reload the page.")
        try:
            row = self.store.record(
                digest, payload["id"], str(payload.get("decision", "")), str(payload.get("label") or "")
            )
        except ConfigError as err:
            raise HttpError(HTTPStatus.BAD_REQUEST, str(err)) from None
        return {"decision": row.to_dict(), "counts": decision_counts(self.store.current())}

    def decisions(self) -> dict[str, Any]:
        current = self.store.current()
        return {"decisions": [d.to_dict() for d in current.values()], "counts": decision_counts(current)}

    def thumbnail(self, root: str, relative: str, size: int | None) -> bytes:
        try:
            return self.thumbnails.get(self._resolve(root, relative), size)
        except Unreadable as err:
            raise HttpError(HTTPStatus.UNSUPPORTED_MEDIA_TYPE, str(err)) from None
        except NotFound as err:
            raise HttpError(HTTPStatus.NOT_FOUND, str(err)) from None

    def _resolve(self, root: str, relative: str) -> Path:
        folder = {"data": self.audit.data_dir, "audit": self.audit.folder}.get(root)
        if folder is None:
            raise HttpError(HTTPStatus.NOT_FOUND, f"No folder {root!r} to serve files from.")
        try:
            return resolve_under(folder, relative)
        except Forbidden as err:
            raise HttpError(HTTPStatus.FORBIDDEN, f"Refused: {err}.") from None
        except NotFound as err:
            raise HttpError(HTTPStatus.NOT_FOUND, f"{err}.") from None


# ------------------------------------------------------------------ HTTP
class Handler(BaseHTTPRequestHandler):
    """Routes requests to the server's `ReviewApp`; every answer is JSON, a JPEG, or a static file."""

    server: ReviewServer
    protocol_version = "HTTP/1.1"

    def do_GET(self) -> None:
        self._answer(self._get)

    def do_POST(self) -> None:
        self._answer(self._post)

    def _answer(self, route) -> None:
        try:
            self._check_origin()
            status, ctype, body, headers = route(urlsplit(self.path))
        except HttpError as err:
            log.info("review: %s %s -> %d %s", self.command, self.path, err.status, err)
            status, ctype, body, headers = err.status, "application/json", _json({"error": str(err)}), {}
            if self.command == "POST":  # its body may be unread: the connection cannot carry another request
                self.close_connection = True
                headers = {"Connection": "close"}
        except Exception:  # a bug: answer 500 and keep serving; the traceback goes to the log
            log.exception("review: %s %s failed", self.command, self.path)
            status, ctype, body, headers = (
                HTTPStatus.INTERNAL_SERVER_ERROR,
                "application/json",
                _json({"error": "internal error; see the server's log"}),
                {},
            )
        self.send_response(status)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("X-Content-Type-Options", "nosniff")
        for name, value in {"Cache-Control": "no-store", **headers}.items():
            self.send_header(name, value)
        self.end_headers()
        self.wfile.write(body)

    def _check_origin(self) -> None:
        """Host (and Origin, when sent) must be this server's own address: see the module docstring."""
        port = self.server.server_address[1]
        mine = {f"{HOST}:{port}", f"localhost:{port}"}
        if self.headers.get("Host") not in mine:
            raise HttpError(
                HTTPStatus.FORBIDDEN, f"Host {self.headers.get('Host')!r} refused; open http://{HOST}:{port}/."
            )
        origin = self.headers.get("Origin")
        if origin and origin.split("://", 1)[-1] not in mine:
            raise HttpError(HTTPStatus.FORBIDDEN, f"Cross-origin request from {origin!r} refused.")

    def _get(self, url):
        app = self.server.app
        query = {k: v[-1] for k, v in parse_qs(url.query).items()}
        if url.path in STATIC_FILES:
            name, ctype = STATIC_FILES[url.path]
            return HTTPStatus.OK, ctype, (STATIC / name).read_bytes(), {"Cache-Control": "no-cache"}
        if url.path == "/api/meta":
            return HTTPStatus.OK, "application/json", _json(app.meta()), {}
        if url.path == "/api/items":
            offset, limit = _ints(query, offset=0, limit=DEFAULT_LIMIT)
            return HTTPStatus.OK, "application/json", _json(app.items(query.get("section", ""), offset, limit)), {}
        if url.path == "/api/decisions":
            return HTTPStatus.OK, "application/json", _json(app.decisions()), {}
        if url.path.startswith("/thumb/"):
            root, _, relative = url.path[len("/thumb/") :].partition("/")
            (size,) = _ints(query, size=160)
            body = app.thumbnail(root, unquote(relative), size)
            return HTTPStatus.OK, "image/jpeg", body, {"Cache-Control": "private, max-age=60"}
        raise HttpError(HTTPStatus.NOT_FOUND, f"No page {url.path!r}.")

    def _post(self, url):
        if url.path != "/api/decisions":
            raise HttpError(HTTPStatus.NOT_FOUND, f"No POST endpoint {url.path!r}; decisions go to /api/decisions.")
        if (self.headers.get("Content-Type") or "").split(";")[0].strip() != "application/json":
            raise HttpError(HTTPStatus.UNSUPPORTED_MEDIA_TYPE, "Expected Content-Type: application/json.")
        length = int(self.headers.get("Content-Length") or 0)
        if not 0 < length <= MAX_BODY:
            raise HttpError(HTTPStatus.BAD_REQUEST, f"Expected a JSON body of 1..{MAX_BODY} bytes. Received {length}.")
        try:
            payload = json.loads(self.rfile.read(length))
        except ValueError as err:
            raise HttpError(HTTPStatus.BAD_REQUEST, f"The body is not JSON ({err}).") from None
        return HTTPStatus.OK, "application/json", _json(self.server.app.decide(payload)), {}

    def log_message(self, format: str, *args) -> None:  # noqa: A002 (the base class's name)
        log.debug("review: " + format, *args)


def _json(value: Any) -> bytes:
    return json.dumps(value).encode()


def _ints(query: Mapping[str, str], **defaults: int) -> list[int]:
    try:
        return [int(query.get(name, default)) for name, default in defaults.items()]
    except ValueError:
        raise HttpError(
            HTTPStatus.BAD_REQUEST, f"Expected integers for {', '.join(defaults)}. Received: {dict(query)}."
        ) from None


class ReviewServer(ThreadingHTTPServer):
    """A threaded HTTP server on 127.0.0.1 carrying its `ReviewApp` (handlers reach it as `self.server.app`)."""

    daemon_threads = True

    def __init__(self, app: ReviewApp, port: int = 0) -> None:
        self.app = app
        super().__init__((HOST, port), Handler)

    @property
    def url(self) -> str:
        return f"http://{HOST}:{self.server_address[1]}/"


# ------------------------------------------------------------------ start, stop
def open_server(
    audit: str | Path, *, port: int = 0, data_dir: str | Path | None = None, decisions: str | Path | None = None
) -> ReviewServer:
    """Reads the audit, locks its decisions (LockError if another server has them), binds 127.0.0.1:port.

    `audit` is an audit folder, or a folder of them (the latest is served). The
    decisions file defaults to the dataset's, beside the audit folders
    (`pipeline.decisions.decisions_path`). The caller runs `serve_forever` and, when
    done, `close_server`.
    """
    read = read_audit(find_audit(Path(audit)), Path(data_dir) if data_dir else None)
    path = Path(decisions) if decisions else decisions_path(read.folder.parent, dataset_of(read.record["features"]))
    store = DecisionStore(path, read.class_names).open()
    try:
        return ReviewServer(ReviewApp(read, store), port)
    except OSError as err:
        store.close()
        raise ConfigError(
            f"Cannot listen on {HOST}:{port} ({err.strerror}). Choose another PORT (0 picks a free one)."
        ) from None


def close_server(server: ReviewServer) -> None:
    server.server_close()
    server.app.digests.save()
    server.app.store.close()


@contextmanager
def running(audit: str | Path, **options) -> Iterator[ReviewServer]:
    """A server answering in a background thread for the block (tests, notebooks)."""
    server = open_server(audit, **options)
    thread = threading.Thread(
        target=server.serve_forever, kwargs={"poll_interval": 0.05}, name="review-server", daemon=True
    )
    thread.start()
    try:
        yield server
    finally:
        server.shutdown()
        thread.join()
        close_server(server)


def serve(server: ReviewServer) -> None:
    """Serves until Ctrl-C or SIGTERM, then releases the decisions file (`kill` stops it as Ctrl-C does)."""
    previous = signal.signal(signal.SIGTERM, _stop)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        log.info("review: stopped; decisions are in %s", server.app.store.path)
    finally:
        signal.signal(signal.SIGTERM, previous)
        close_server(server)


def _stop(signum, frame) -> None:
    raise KeyboardInterrupt
