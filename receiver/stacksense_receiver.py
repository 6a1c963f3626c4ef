#!/usr/bin/env python3
"""StackSense reference receiver: a small stand-in for the heartbeat API.

THIS IS NOT THE STACKSENSE MONITORING SERVER. It is a test double used by
this repository's tests, by Molecule scenarios and by the local demo. By
default it answers like the real server (upstream Praveenamin/stacksense at 996e90c; the
file:line of each behaviour is noted beside the code that mimics it, and in
../../shared/REAL_SERVER.md of the project's notes); it has no database, no users and keeps
everything in memory.

Agent-facing API (mirrors the real server):
  POST /api/agent/heartbeat/  token API, header "Authorization: Bearer <token>"
                              (the token may be padded with spaces, as the real
                              server strips it); 200 with any or no body, 401 for
                              a missing/malformed/unknown token. The body's
                              agent_version is stored; a body that is not a JSON
                              object wipes the stored version; over 50 characters
                              is an HTTP 500; other fields are ignored.
  GET  /api/agent/ping/       token check: 200 {"status", "server_id",
                              "server_name", "authenticated"}, or 401.
  POST /api/heartbeat/<id>/   legacy API. Refused by default, as the real server
                              refuses it: 403 HTML "CSRF verification failed", or,
                              with a csrftoken cookie and a matching X-CSRFToken
                              header, 401 {"error": "authentication required"};
                              nothing is recorded. With --accept-legacy (older
                              servers): 200 for a known id (whatever the body),
                              404 JSON for an unknown id.
                              Either way: 301 to the slashed path if the slash is
                              missing, 405 (Allow: POST) for other methods.
  Any other path              404 with Django's HTML "Not Found" page, like the
                              real server (a non-numeric id too).

One token per server (upstream core/models.py:1117, a OneToOneField): each server holds at
most one token, and minting a new one (POST /_receiver/servers/<id>/token, what the real
server's `manage.py create_agent_token` does) makes the old one stop at once.

Receiver-only endpoints (do not exist on the real server):
  GET    /                    HTML status page (refreshes every 5 s)
  GET    /api/status/         servers with online/offline state
  GET    /api/heartbeats/     accepted heartbeats (?server_id=N&source=IP)
  GET    /api/requests/       every agent-facing request, failed ones too
  GET    /_receiver/fault     the injected fault ({"status": null} if none)
  PUT    /_receiver/fault     {"status": 500} makes every /api/heartbeat/... and
                              /api/agent/... request answer 500 until
                              {"status": null} is PUT
  DELETE /_receiver/records   forget recorded heartbeats and requests
  GET    /_receiver/servers   [{"id", "name", "credential": null or {"token_hash"
                              (SHA-256 hex, as upstream stores it), "token_prefix"}}]
  POST   /_receiver/servers/<id>/token
                              mint or rotate the server's token: {"id", "name",
                              "token", "rotated"}; the old token stops at once

Run:  python3 receiver/stacksense_receiver.py --listen 127.0.0.1:8080 \
          --server 1:web-01:TOKEN1 --server 2:web-02:TOKEN2 [--accept-legacy]
      HTTPS: add --tls-cert server.pem --tls-key server.key (PEM files; the
      certificate file may hold the chain after the server's certificate).
Import:  make_server(servers, host="127.0.0.1", port=0, ...) -> server with
         .url, .serve_forever(), .shutdown(), .server_close() and .store.

Standard library only; runs on Python 3.6+.
"""

import argparse
import collections
import datetime
import hashlib
import html
import http.cookies
import http.server
import json
import re
import secrets
import signal
import socket
import socketserver
import ssl
import sys
import threading
import time
from urllib.parse import parse_qs, urlsplit

VERSION = "1.0.0"
PROG = "stacksense-receiver"
DEFAULT_LISTEN = "127.0.0.1:8080"
DEFAULT_OFFLINE_AFTER = 180.0  # upstream core/views.py:71 OFFLINE_THRESHOLD_SECONDS, in seconds
MAX_AGENT_VERSION_CHARS = 50  # upstream core/models.py:786 CharField(max_length=50)
CSRF_COOKIE = "csrftoken"
TOKEN_PREFIX_CHARS = 8  # upstream AgentCredential.token_prefix: the token's first 8 characters
MAX_BODY_BYTES = 64 * 1024
MAX_RECORDS = 100000  # per list; the oldest records are dropped beyond this
UNSAFE_METHODS = ("POST", "PUT", "PATCH", "DELETE")
FAULT_PREFIXES = ("/api/heartbeat/", "/api/agent/")
SERVER_ID_IN_PATH = re.compile(r"/api/heartbeat/([0-9]+)/?")
BEARER_PREFIX = "Bearer "
TLS_HANDSHAKE_TIMEOUT_S = 10
EXIT_CONFIG_ERROR = 2
EXIT_LISTEN_ERROR = 1

# pattern: full path; methods: HTTP method -> handler method name;
# csrf: protected by the real server's CSRF middleware (legacy API only);
# observer: receiver-only read/admin endpoint, not recorded in /api/requests/.
Route = collections.namedtuple("Route", "pattern methods csrf observer")
ROUTES = (
    Route(re.compile(r"/api/heartbeat/(?P<server_id>[0-9]+)/"),
          {"POST": "api_legacy_heartbeat"}, True, False),
    Route(re.compile(r"/api/agent/heartbeat/"),
          {"POST": "api_token_heartbeat"}, False, False),
    Route(re.compile(r"/api/agent/ping/"), {"GET": "api_token_ping"}, False, False),
    Route(re.compile(r"/api/status/"), {"GET": "api_status"}, False, True),
    Route(re.compile(r"/api/heartbeats/"), {"GET": "api_heartbeats"}, False, True),
    Route(re.compile(r"/api/requests/"), {"GET": "api_requests"}, False, True),
    Route(re.compile(r"/_receiver/fault"),
          {"GET": "admin_get_fault", "PUT": "admin_put_fault"}, False, True),
    Route(re.compile(r"/_receiver/records"),
          {"DELETE": "admin_clear_records"}, False, True),
    Route(re.compile(r"/_receiver/servers"), {"GET": "admin_list_servers"}, False, True),
    Route(re.compile(r"/_receiver/servers/(?P<server_id>[0-9]+)/token"),
          {"POST": "admin_mint_token"}, False, True),
    Route(re.compile(r"/"), {"GET": "html_status_page"}, False, True),
)

# upstream core/middleware.py:86 (RBACMiddleware, after the CSRF check passed): an API
# path without a logged-in user.
AUTHENTICATION_REQUIRED = "authentication required"

# Django's page for an unknown path when DEBUG is off (the real server's answer).
NOT_FOUND_PAGE = """<!doctype html>
<html lang="en">
<head>
  <title>Not Found</title>
</head>
<body>
  <h1>Not Found</h1><p>The requested resource was not found on this server.</p>
</body>
</html>
"""

# Django's page for an unhandled error when DEBUG is off.
SERVER_ERROR_PAGE = """<!doctype html>
<html lang="en">
<head>
  <title>Server Error (500)</title>
</head>
<body>
  <h1>Server Error (500)</h1><p></p>
</body>
</html>
"""

CSRF_FAILURE_PAGE = """<!DOCTYPE html>
<html lang="en">
<head><meta charset="utf-8"><title>403 Forbidden</title></head>
<body>
<div id="summary">
  <h1>Forbidden <span>(403)</span></h1>
  <p>CSRF verification failed. Request aborted.</p>
</div>
</body>
</html>
"""

STATUS_PAGE = """<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta http-equiv="refresh" content="5">
<title>StackSense reference receiver</title>
<style>
body { font-family: sans-serif; margin: 2em; }
table { border-collapse: collapse; }
th, td { border: 1px solid #ccc; padding: 0.3em 0.8em; text-align: left; }
.online { color: #fff; background: #2e7d32; }
.offline { color: #fff; background: #c62828; }
</style>
</head>
<body>
<h1>StackSense reference receiver</h1>
<p>Test stand-in, not the StackSense monitoring server.
A server is offline after %(offline_after)s s without a heartbeat.</p>
<table>
<tr><th>ID</th><th>Name</th><th>Agent version</th><th>Last heartbeat</th><th>State</th></tr>
%(rows)s
</table>
</body>
</html>
"""


class ConfigError(ValueError):
    """Bad server list, listen address or option: reported as one line, exit 2."""


class ApiError(Exception):
    """An error answer: HTTP status, message for the JSON body, extra headers."""

    def __init__(self, status, message, headers=None, page=None):
        Exception.__init__(self, message)
        self.status = status
        self.message = message
        self.headers = headers or {}
        self.page = page  # an HTML page to answer instead of {"error": message}


def iso_utc(timestamp):
    """Format a POSIX timestamp as ISO 8601 UTC with milliseconds."""
    moment = datetime.datetime.fromtimestamp(timestamp, datetime.timezone.utc)
    return moment.isoformat(timespec="milliseconds")


def bearer_token(header):
    """The token of a "Bearer <token>" header, stripped like the real server does, else None.

    "Bearer   tok " gives "tok"; "bearer tok", "Token tok" and "Bearer " give None. A token
    with a space inside ("Bearer tok extra") is returned as it is and matches no server.
    """
    if not header or not header.startswith(BEARER_PREFIX):
        return None
    return header[len(BEARER_PREFIX):].strip() or None


def is_valid_token(token):
    """A configured token: a non-empty string without white space."""
    return isinstance(token, str) and bool(token) and not any(c.isspace() for c in token)


def find_route(path):
    """Return (route, match) for a path, or (None, None)."""
    for route in ROUTES:
        match = route.pattern.fullmatch(path)
        if match:
            return route, match
    return None, None


# ---------------------------------------------------------------- servers


def _validate_server(entry, where):
    """Check one {"id", "name", "token"} entry; return a normalised copy."""
    if not isinstance(entry, dict):
        raise ConfigError(f"{where}: must be an object with id and name")
    unknown = sorted(set(entry) - {"id", "name", "token"})
    if unknown:
        raise ConfigError(f"{where}: unknown key(s): {', '.join(unknown)}")
    server_id, name, token = entry.get("id"), entry.get("name"), entry.get("token")
    if isinstance(server_id, bool) or not isinstance(server_id, int) or server_id < 1:
        raise ConfigError(f"{where}: id must be a positive integer")
    if not isinstance(name, str) or not name.strip():
        raise ConfigError(f"{where}: name must be a non-empty string")
    if token is not None and not is_valid_token(token):
        raise ConfigError(f"{where}: token must be a non-empty string without spaces")
    return {"id": server_id, "name": name, "token": token}


def validate_servers(servers):
    """Validate a list of server dicts (ids and tokens unique); raise ConfigError."""
    if not isinstance(servers, list):
        raise ConfigError("servers must be a list of objects")
    result, ids, tokens = [], set(), {}
    for index, entry in enumerate(servers):
        server = _validate_server(entry, f"server #{index + 1}")
        if server["id"] in ids:
            raise ConfigError(f"duplicate server id {server['id']}")
        if server["token"] is not None and server["token"] in tokens:
            first = tokens[server["token"]]
            raise ConfigError(f"server id {server['id']} reuses the token of server id {first}")
        ids.add(server["id"])
        if server["token"] is not None:
            tokens[server["token"]] = server["id"]
        result.append(server)
    return result


def load_servers_file(path):
    """Read a JSON list of servers from a file; raise ConfigError on any problem."""
    try:
        with open(path, encoding="utf-8") as handle:
            data = json.load(handle)
    except OSError as exc:
        raise ConfigError(f"cannot read servers file {path}: {exc.strerror or exc}") from None
    except ValueError as exc:
        raise ConfigError(f"servers file {path} is not valid JSON: {exc}") from None
    if not isinstance(data, list):
        raise ConfigError(f"servers file {path}: expected a JSON list of objects")
    return data


def parse_server_flag(text):
    """Parse --server ID:NAME or ID:NAME:TOKEN into a server dict."""
    parts = text.split(":", 2)
    if len(parts) < 2 or not parts[0].isdigit():
        raise ConfigError(f"--server {text!r}: expected ID:NAME or ID:NAME:TOKEN")
    server = {"id": int(parts[0]), "name": parts[1]}
    if len(parts) == 3:
        server["token"] = parts[2]
    return server


def make_tls_context(cert_file, key_file):
    """A server-side TLS context for --tls-cert/--tls-key; None when neither is given."""
    if cert_file is None and key_file is None:
        return None
    if cert_file is None or key_file is None:
        raise ConfigError("--tls-cert and --tls-key go together: give both for HTTPS, "
                          "or neither for plain HTTP")
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    try:
        context.load_cert_chain(cert_file, key_file)
    except (OSError, ssl.SSLError) as exc:
        raise ConfigError(f"cannot load the certificate {cert_file} with the key {key_file}: "
                          f"{getattr(exc, 'strerror', None) or exc}") from None
    return context


def parse_listen(text):
    """Parse HOST:PORT (or [IPv6]:PORT) into (host, port)."""
    host, _, port = text.rpartition(":")
    host = host[1:-1] if host.startswith("[") and host.endswith("]") else host
    if not host or not port.isdigit() or int(port) > 65535:
        raise ConfigError(f"--listen {text!r}: expected HOST:PORT, e.g. 127.0.0.1:8080")
    return host, int(port)


# ---------------------------------------------------------------- store


class Store:
    """Thread-safe in-memory record of servers, heartbeats, requests and the fault."""

    def __init__(self, servers, clock=time.time, offline_after=DEFAULT_OFFLINE_AFTER,
                 record_path=None):
        self._lock = threading.Lock()
        self._clock = clock
        self.offline_after = offline_after
        self._servers = collections.OrderedDict((s["id"], dict(s)) for s in servers)
        # The one token of each server lives in its entry; _tokens is only the reverse index
        # (token -> id). validate_servers() refused a token given to two servers.
        self._tokens = dict((s["token"], s["id"]) for s in servers if s.get("token"))
        self._fault = None
        self._record = None
        if record_path is not None:
            try:  # kept open until close(), hence no "with"
                self._record = open(record_path, "a", encoding="utf-8")  # noqa: SIM115
            except OSError as exc:
                raise ConfigError(
                    f"cannot open record file {record_path}: {exc.strerror or exc}") from None
        self.clear()

    def now(self):
        return self._clock()

    def close(self):
        with self._lock:
            if self._record is not None:
                self._record.close()
                self._record = None

    def clear(self):
        """Forget heartbeats, requests and last-seen state (servers stay)."""
        with self._lock:
            self._heartbeats = collections.deque(maxlen=MAX_RECORDS)
            self._requests = collections.deque(maxlen=MAX_RECORDS)
            self._seen = {}

    def server_by_id(self, server_id):
        with self._lock:
            server = self._servers.get(server_id)
            return dict(server) if server else None

    def server_by_token(self, token):
        with self._lock:
            server = self._servers.get(self._tokens.get(token))
            return dict(server) if server else None

    def credentials(self):
        """Each server's id, name and credential as upstream stores it (the token's SHA-256
        and its first characters, never the token), or None when it has no token."""
        with self._lock:
            return [{"id": server["id"], "name": server["name"],
                     "credential": None if server["token"] is None else {
                         "token_hash": hashlib.sha256(server["token"].encode()).hexdigest(),
                         "token_prefix": server["token"][:TOKEN_PREFIX_CHARS]}}
                    for server in self._servers.values()]

    def mint_token(self, server_id):
        """Give a server a new token, as upstream AgentCredential.generate_for_server does
        (core/models.py: update_or_create on the server's one credential): the old token,
        if any, stops at once. Returns (server, token, rotated) or None for an unknown id."""
        token = secrets.token_urlsafe(32)
        with self._lock:
            server = self._servers.get(server_id)
            if server is None:
                return None
            rotated = server["token"] is not None
            if rotated:
                del self._tokens[server["token"]]
            server["token"] = token
            self._tokens[token] = server_id
            return dict(server), token, rotated

    def register(self, server_id):
        """Add server-<id> if unknown (--accept-any); return the server."""
        with self._lock:
            server = self._servers.setdefault(
                server_id, {"id": server_id, "name": f"server-{server_id}", "token": None})
            return dict(server)

    def fault(self):
        with self._lock:
            return self._fault

    def set_fault(self, status):
        """Answer every agent-facing request with this status (400-599), or None."""
        if status is not None and (isinstance(status, bool) or not isinstance(status, int)
                                   or not 400 <= status <= 599):
            raise ValueError("fault status must be an integer 400-599 or null")
        with self._lock:
            self._fault = status

    def add_heartbeat(self, server_id, agent_version, source, api):
        """Record an accepted heartbeat; return the record."""
        now = self._clock()
        record = {"server_id": server_id, "agent_version": agent_version,
                  "source": source, "time": iso_utc(now), "api": api}
        with self._lock:
            self._heartbeats.append(record)
            seen = self._seen.setdefault(server_id, {"count": 0})
            seen.update(time=now, agent_version=agent_version, count=seen["count"] + 1)
            self._append_to_record_file(record)
        return dict(record)

    def _append_to_record_file(self, record):
        if self._record is None:
            return
        try:
            self._record.write(json.dumps(record) + "\n")
            self._record.flush()
        except (OSError, ValueError) as exc:
            print(f"{PROG}: cannot write record file: {exc}", file=sys.stderr, flush=True)

    def add_request(self, method, path, status, source, server_id):
        record = {"method": method, "path": path, "status": status, "source": source,
                  "time": iso_utc(self._clock()), "server_id": server_id}
        with self._lock:
            self._requests.append(record)

    def heartbeats(self, server_id=None, source=None):
        with self._lock:
            return _select(self._heartbeats, server_id, source)

    def requests(self, server_id=None, source=None):
        with self._lock:
            return _select(self._requests, server_id, source)

    def status(self):
        """Return {"offline_after_s", "servers": [...]} as served by /api/status/."""
        now = self._clock()
        with self._lock:
            rows = [self._status_row(server, self._seen.get(server_id), now)
                    for server_id, server in self._servers.items()]
        offline_after = self.offline_after
        if float(offline_after).is_integer():
            offline_after = int(offline_after)
        return {"offline_after_s": offline_after, "servers": rows}

    def _status_row(self, server, seen, now):
        seen = seen or {"time": None, "agent_version": None, "count": 0}
        age = None if seen["time"] is None else round(now - seen["time"], 3)
        return {"id": server["id"], "name": server["name"],
                "online": age is not None and age <= self.offline_after,
                "last_heartbeat": None if seen["time"] is None else iso_utc(seen["time"]),
                "seconds_since_heartbeat": age,
                "agent_version": seen["agent_version"], "heartbeats": seen["count"]}


def _select(records, server_id, source):
    """Copies of the records matching server_id and source (None = any)."""
    return [dict(record) for record in records
            if (server_id is None or record["server_id"] == server_id)
            and (source is None or record["source"] == source)]


def render_status_page(status):
    """The HTML status page for a Store.status() snapshot."""
    rows = []
    for server in status["servers"]:
        age = server["seconds_since_heartbeat"]
        state = "online" if server["online"] else "offline"
        cells = (server["id"], server["name"], server["agent_version"] or "-",
                 "never" if age is None else f"{age:.0f} s ago")
        rows.append("<tr>{}<td class=\"{}\">{}</td></tr>".format(
            "".join(f"<td>{html.escape(str(cell))}</td>" for cell in cells), state, state))
    if not rows:
        rows.append('<tr><td colspan="5">No servers configured.</td></tr>')
    return STATUS_PAGE % {"offline_after": html.escape(str(status["offline_after_s"])),
                          "rows": "\n".join(rows)}


# ---------------------------------------------------------------- handler


class ReceiverHandler(http.server.BaseHTTPRequestHandler):
    """Routes one request (see ROUTES), answers it, records and logs it."""

    server_version = "stacksense-receiver/" + VERSION

    def version_string(self):
        return self.server_version

    def do_GET(self):
        self._handle()

    do_HEAD = do_POST = do_PUT = do_PATCH = do_DELETE = do_GET

    def _handle(self):
        url = urlsplit(self.path)
        self._status, self._query = None, parse_qs(url.query)
        route, match = find_route(url.path)
        self._server_id = self._identify(url.path)
        self._recorded_path = url.path if route is None or not route.observer else None
        try:
            self._body = self._read_body()
            self._respond(url, route, match)
        except ApiError as exc:
            if exc.page is not None:
                self._send(exc.status, "text/html; charset=utf-8", exc.page.encode("utf-8"))
            else:
                self._send_json(exc.status, {"error": exc.message}, exc.headers)
        self._log_request_line()

    def _respond(self, url, route, match):
        fault = self.server.store.fault()
        if fault is not None and url.path.startswith(FAULT_PREFIXES):
            raise ApiError(fault, f"Injected fault (HTTP {fault})")
        if route is None:
            return self._redirect_or_not_found(url)
        if route.csrf and not self.server.accept_legacy and self.command in UNSAFE_METHODS:
            return self._refuse_legacy()
        method = "GET" if self.command == "HEAD" else self.command
        if method not in route.methods:
            raise ApiError(405, "Method not allowed", {"Allow": ", ".join(route.methods)})
        getattr(self, route.methods[method])(**match.groupdict())

    def _refuse_legacy(self):
        """The real server's answers to a legacy POST (upstream core/urls.py:34 routes it to
        core/views.py:293, which is neither CSRF-exempt nor public, core/permissions.py:80-90):
        Django's CsrfViewMiddleware refuses it with its 403 page unless the csrftoken cookie
        comes with the same token in X-CSRFToken; then RBACMiddleware answers 401 JSON
        (core/middleware.py:86). Nothing is recorded either way."""
        cookie = http.cookies.SimpleCookie()
        try:
            cookie.load(self.headers.get("Cookie", ""))
        except http.cookies.CookieError:
            cookie = {}
        csrf = cookie[CSRF_COOKIE].value if CSRF_COOKIE in cookie else None
        if csrf and self.headers.get("X-CSRFToken") == csrf:
            raise ApiError(401, AUTHENTICATION_REQUIRED)
        return self._send(403, "text/html; charset=utf-8", CSRF_FAILURE_PAGE.encode("utf-8"))

    def _redirect_or_not_found(self, url):
        """Like Django's APPEND_SLASH: 301 to path + "/" if that is a route; else its HTML 404."""
        if url.path.endswith("/") or find_route(url.path + "/")[0] is None:
            return self._send(404, "text/html; charset=utf-8", NOT_FOUND_PAGE.encode("utf-8"))
        location = url.path + "/" + ("?" + url.query if url.query else "")
        self._send(301, "text/html; charset=utf-8", b"", {"Location": location})

    def _identify(self, path):
        """The server id a request is about, if known (path id or valid token)."""
        match = SERVER_ID_IN_PATH.fullmatch(path)
        if match:
            return int(match.group(1))
        if path.startswith("/api/agent/"):
            token = bearer_token(self.headers.get("Authorization"))
            server = self.server.store.server_by_token(token)
            return server["id"] if server else None
        return None

    def _read_body(self):
        if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
            self.close_connection = True
            raise ApiError(411, "Content-Length required")
        raw = self.headers.get("Content-Length", "0").strip()
        length = int(raw) if raw.isdigit() else -1
        if length < 0 or length > MAX_BODY_BYTES:
            self.close_connection = True
            raise ApiError(400 if length < 0 else 413,
                           "Invalid Content-Length" if length < 0 else "Request body too large")
        return self.rfile.read(length)

    def _json_body(self):
        """The request body as a JSON object, or ApiError 400 (receiver-only endpoints)."""
        try:
            data = json.loads(self._body.decode("utf-8"))
        except ValueError:
            raise ApiError(400, "Request body must be valid JSON") from None
        if not isinstance(data, dict):
            raise ApiError(400, "Request body must be a JSON object")
        return data

    def _agent_version(self):
        """The body's agent_version, or None: like the real server, a heartbeat is accepted
        whatever its body, and an empty body, one that is not JSON or not an object stores
        None, wiping the version the server had (upstream core/agent_api.py:1001-1008 then
        _update_heartbeat, :135). A version that is not a string is recorded as its JSON
        text; one longer than 50 characters fails the database column (core/models.py:786):
        HTTP 500, nothing recorded."""
        try:
            data = json.loads(self._body.decode("utf-8")) if self._body else None
        except ValueError:
            return None
        version = data.get("agent_version") if isinstance(data, dict) else None
        if version is not None and not isinstance(version, str):
            version = json.dumps(version)
        if version is not None and len(version) > MAX_AGENT_VERSION_CHARS:
            raise ApiError(500, "Server Error (500)", page=SERVER_ERROR_PAGE)
        return version

    def _token_server(self):
        """The server of the request's token, or the real server's 401 answers."""
        token = bearer_token(self.headers.get("Authorization"))
        if token is None:
            raise ApiError(401, "missing or malformed Authorization header",
                           {"WWW-Authenticate": "Bearer"})
        server = self.server.store.server_by_token(token)
        if server is None:
            raise ApiError(401, "invalid or disabled token", {"WWW-Authenticate": "Bearer"})
        return server

    def _filters(self):
        """server_id / source query filters for the listing endpoints."""
        server_id = self._query.get("server_id", [None])[0]
        if server_id is not None and not server_id.isdigit():
            raise ApiError(400, "server_id must be an integer")
        source = self._query.get("source", [None])[0]
        return {"server_id": None if server_id is None else int(server_id), "source": source}

    # -- agent-facing API

    def api_legacy_heartbeat(self, server_id):
        store, server_id = self.server.store, int(server_id)
        server = store.server_by_id(server_id)
        if server is None and not (self.server.accept_any and server_id >= 1):
            raise ApiError(404, "Server not found")  # upstream core/views.py:301
        version = self._agent_version()
        server = server or store.register(server_id)
        record = store.add_heartbeat(server["id"], version, self.client_address[0], "legacy")
        self._send_json(200, {"status": "ok", "server_id": server["id"],
                              "server_name": server["name"], "heartbeat_received": True,
                              "timestamp": record["time"]})

    def api_token_heartbeat(self):
        """upstream core/agent_api.py:993-1012: reads only agent_version."""
        server = self._token_server()
        version = self._agent_version()
        self.server.store.add_heartbeat(server["id"], version, self.client_address[0], "token")
        self._send_json(200, {"status": "ok", "heartbeat_received": True})

    def api_token_ping(self):
        """upstream core/agent_api.py:976-990."""
        server = self._token_server()
        self._send_json(200, {"status": "ok", "server_id": server["id"],
                              "server_name": server["name"], "authenticated": True})

    # -- receiver-only endpoints

    def api_status(self):
        self._send_json(200, self.server.store.status())

    def api_heartbeats(self):
        self._send_json(200, self.server.store.heartbeats(**self._filters()))

    def api_requests(self):
        self._send_json(200, self.server.store.requests(**self._filters()))

    def admin_get_fault(self):
        self._send_json(200, {"status": self.server.store.fault()})

    def admin_put_fault(self):
        body = self._json_body()
        if "status" not in body:
            raise ApiError(400, 'Expected {"status": <400-599 or null>}')
        try:
            self.server.store.set_fault(body["status"])
        except ValueError as exc:
            raise ApiError(400, str(exc)) from None
        self._send_json(200, {"status": self.server.store.fault()})

    def admin_clear_records(self):
        self.server.store.clear()
        self._send_json(200, {"status": "ok"})

    def admin_list_servers(self):
        self._send_json(200, self.server.store.credentials())

    def admin_mint_token(self, server_id):
        minted = self.server.store.mint_token(int(server_id))
        if minted is None:
            raise ApiError(404, f"No server with id {server_id}")
        server, token, rotated = minted
        self._send_json(200, {"id": server["id"], "name": server["name"], "token": token,
                              "rotated": rotated})

    def html_status_page(self):
        page = render_status_page(self.server.store.status())
        self._send(200, "text/html; charset=utf-8", page.encode("utf-8"))

    # -- output

    def _send(self, status, content_type, body, headers=None):
        self._status = status
        if self._recorded_path is not None:
            # Recorded before answering: a client that has its answer finds it in /api/requests/.
            self.server.store.add_request(self.command, self._recorded_path, status,
                                          self.client_address[0], self._server_id)
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        for name, value in sorted((headers or {}).items()):
            self.send_header(name, value)
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def _send_json(self, status, data, headers=None):
        self._send(status, "application/json", json.dumps(data).encode("utf-8"), headers)

    def _log_request_line(self):
        now = iso_utc(self.server.store.now())
        line = f"{now} {self.client_address[0]} {self.command} {self.path} {self._status}"
        if self._server_id is not None:
            line += f" server_id={self._server_id}"
        self.server.log(line)

    def log_request(self, code="-", size="-"):
        """Silenced: _handle logs one line per request itself."""

    def log_message(self, format, *args):
        """http.server's own messages (malformed requests), one line to the log."""
        now = iso_utc(self.server.store.now())
        self.server.log(f"{now} {self.client_address[0]} {format % args}")


# ---------------------------------------------------------------- server


class ReceiverServer(socketserver.ThreadingMixIn, http.server.HTTPServer):
    """Threaded HTTP(S) server holding the store, the options and the request log.

    With a TLS context each connection's handshake runs in its own thread (not in the
    accepting one), so a client that stalls or rejects the certificate holds up nobody.
    """

    daemon_threads = True
    allow_reuse_address = True

    def __init__(self, address, store, accept_legacy=False, accept_any=False, log=None,
                 tls_context=None):
        if ":" in address[0]:
            self.address_family = socket.AF_INET6
        self.store = store
        self.accept_legacy = accept_legacy
        self.accept_any = accept_any
        self.tls_context = tls_context
        self._log_stream = log
        self._log_lock = threading.Lock()
        http.server.HTTPServer.__init__(self, address, ReceiverHandler)

    def server_bind(self):
        # Skip HTTPServer.server_bind: its socket.getfqdn() can stall on DNS.
        socketserver.TCPServer.server_bind(self)
        self.server_name, self.server_port = self.server_address[:2]

    def finish_request(self, request, client_address):
        if self.tls_context is None:
            return http.server.HTTPServer.finish_request(self, request, client_address)
        request.settimeout(TLS_HANDSHAKE_TIMEOUT_S)
        with self.tls_context.wrap_socket(request, server_side=True) as tls_request:
            tls_request.settimeout(None)
            self.RequestHandlerClass(tls_request, client_address, self)
        return None

    @property
    def url(self):
        host, port = self.server_address[:2]
        if ":" in host:
            host = f"[{host}]"
        scheme = "http" if self.tls_context is None else "https"
        return f"{scheme}://{host}:{port}"

    def log(self, line):
        if self._log_stream is None:
            return
        with self._log_lock:
            try:
                self._log_stream.write(line + "\n")
                self._log_stream.flush()
            except (OSError, ValueError):
                pass

    def handle_error(self, request, client_address):
        error = sys.exc_info()[1]
        # A failed TLS handshake (e.g. the client does not trust the certificate) is one line.
        if isinstance(error, (ssl.SSLError, socket.timeout)):
            self.log(f"{iso_utc(self.store.now())} {client_address[0]} TLS handshake failed: "
                     f"{error}")
            return None
        if not isinstance(error, ConnectionError):
            return socketserver.TCPServer.handle_error(self, request, client_address)
        self.log(f"{iso_utc(self.store.now())} {client_address[0]} connection error: {error}")
        return None

    def server_close(self):
        http.server.HTTPServer.server_close(self)
        self.store.close()


def make_server(servers, host="127.0.0.1", port=0, offline_after=DEFAULT_OFFLINE_AFTER,
                accept_legacy=False, accept_any=False, clock=time.time, record=None, log=None,
                tls_cert=None, tls_key=None):
    """Build a bound (not yet serving) receiver.

    servers: list of {"id": int, "name": str, "token": optional str}.
    record: optional file path; every accepted heartbeat is appended as a JSON line.
    log: optional text stream for one line per request (None = silent).
    tls_cert, tls_key: PEM files; both given: HTTPS (its .url says https://).
    accept_legacy: accept POST /api/heartbeat/<id>/ as older servers did (the real server
    refuses it); accept_any (auto-register unknown ids there) needs it.
    Raises ConfigError (a ValueError) for bad servers/options, OSError if it cannot bind.
    """
    if not offline_after > 0:
        raise ConfigError("offline_after must be a positive number of seconds")
    if accept_any and not accept_legacy:
        raise ConfigError("--accept-any registers ids on the legacy API: it needs "
                          "--accept-legacy too")
    tls_context = make_tls_context(tls_cert, tls_key)
    store = Store(validate_servers(servers), clock=clock, offline_after=offline_after,
                  record_path=record)
    try:
        return ReceiverServer((host, port), store, accept_legacy=accept_legacy,
                              accept_any=accept_any, log=log, tls_context=tls_context)
    except BaseException:
        store.close()
        raise


# ---------------------------------------------------------------- command line


class _Stop(BaseException):
    """Raised by the SIGTERM/SIGINT handler to leave serve_forever(). Not an Exception: a
    signal that lands while the main thread starts a request's thread would otherwise be
    caught by socketserver's handle_error (printed, then served on forever)."""


def _stop(signum, frame):
    raise _Stop()


def positive_float(text):
    try:
        value = float(text)
    except ValueError:
        value = float("nan")
    if not value > 0:
        raise argparse.ArgumentTypeError(f"expected a positive number of seconds, got {text!r}")
    return value


def build_parser():
    parser = argparse.ArgumentParser(
        prog=PROG, description="Reference StackSense heartbeat receiver for tests and demos "
                               "(NOT the StackSense monitoring server).")
    parser.add_argument("--listen", default=DEFAULT_LISTEN, metavar="HOST:PORT",
                        help="address to listen on; port 0 picks a free port (default %(default)s)")
    parser.add_argument("--servers", metavar="FILE",
                        help='JSON file: a list of {"id": 1, "name": "web-01", "token": "..."}')
    parser.add_argument("--server", action="append", default=[], metavar="ID:NAME[:TOKEN]",
                        help="add a server (repeatable)")
    parser.add_argument("--accept-any", action="store_true",
                        help="auto-register unknown numeric ids on the legacy API as server-<id> "
                             "(with --accept-legacy)")
    parser.add_argument("--accept-legacy", action="store_true",
                        help="accept legacy heartbeats (POST /api/heartbeat/<id>/) as older "
                             "servers did; by default they are refused like the real server "
                             "refuses them (403 CSRF page)")
    parser.add_argument("--offline-after", type=positive_float, default=DEFAULT_OFFLINE_AFTER,
                        metavar="SECONDS", help="offline after this long without a heartbeat "
                                                "(default %(default).0f)")
    parser.add_argument("--record", metavar="FILE",
                        help="also append every accepted heartbeat to FILE as a JSON line")
    parser.add_argument("--tls-cert", metavar="FILE",
                        help="serve HTTPS with this PEM certificate (chain); needs --tls-key")
    parser.add_argument("--tls-key", metavar="FILE",
                        help="the PEM private key of --tls-cert")
    return parser


def collect_servers(args):
    """Servers from --servers FILE then --server flags (validated by make_server)."""
    servers = load_servers_file(args.servers) if args.servers else []
    return servers + [parse_server_flag(text) for text in args.server]


def serve(server):
    """Serve until SIGTERM/SIGINT; return exit status 0."""
    signal.signal(signal.SIGTERM, _stop)
    signal.signal(signal.SIGINT, _stop)
    print(f"{PROG} listening on {server.url}", flush=True)
    try:
        server.serve_forever()
    except _Stop:
        pass
    finally:
        server.server_close()
    print(f"{PROG} stopped", flush=True)
    return 0


def main(argv=None):
    args = build_parser().parse_args(argv)
    try:
        host, port = parse_listen(args.listen)
        server = make_server(collect_servers(args), host=host, port=port,
                             offline_after=args.offline_after, accept_legacy=args.accept_legacy,
                             accept_any=args.accept_any, record=args.record, log=sys.stdout,
                             tls_cert=args.tls_cert, tls_key=args.tls_key)
    except ConfigError as exc:
        print(f"{PROG}: error: {exc}", file=sys.stderr)
        return EXIT_CONFIG_ERROR
    except OSError as exc:
        print(f"{PROG}: error: cannot listen on {args.listen}: {exc.strerror or exc}",
              file=sys.stderr)
        return EXIT_LISTEN_ERROR
    return serve(server)


if __name__ == "__main__":
    sys.exit(main())
