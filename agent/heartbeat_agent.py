#!/usr/bin/env python3
"""StackSense heartbeat agent: tells the StackSense server that this host is up.

It POSTs a small JSON heartbeat to the server every INTERVAL seconds (30 by default)
and keeps doing so, whatever the network or the server does, until it is stopped.

The first heartbeat goes at start, the second 0.5 to 1.5 intervals later (a random phase,
so hosts that start together spread over the interval), then every interval on that phase.
A blip is retried within the beat (at most 4 requests). After a failed beat: one request
per beat, at most one interval apart, until 10 beats in a row succeed; meanwhile those that
succeed come up to 90 s apart, leaving a struggling server's capacity to the hosts it has
not heard. Retry-After is honoured (up to 10 minutes). See the policy functions below.

Run it:
    STACKSENSE_SERVER_ID=42 STACKSENSE_API_URL=https://stacksense.example.com \\
        ./heartbeat_agent.py
    ./heartbeat_agent.py --once          # one heartbeat, print the answer ("test connection")
    ./heartbeat_agent.py --check-config  # print the effective configuration

Settings come from, in order of precedence: the command line, the environment
(STACKSENSE_*), the JSON file ~/.stacksense_heartbeat.conf (or --config / STACKSENSE_CONFIG),
then the defaults. Two server APIs are spoken: the legacy one, addressed by server id
(POST {api_url}/api/heartbeat/{id}/), and the token one (POST {api_url}/api/agent/heartbeat/
with "Authorization: Bearer <token>"), used whenever a token is configured.

Under systemd (Type=notify) it reports READY=1, STATUS=, WATCHDOG=1 and STOPPING=1 on
$NOTIFY_SOCKET and keeps its state file in $STATE_DIRECTORY (mode 0600; it only ever replaces
a regular file: a path naming a device, a FIFO or a link is left alone, with one warning).

Bounded in time, memory and trust (nothing the server, a proxy or a setting sends may stop
the heartbeats):
- Every HTTP exchange (connect, proxy CONNECT, TLS handshake, headers, body) ends at the
  configured timeout, whatever the peer does: requests' own timeout is per read, so a guard
  thread per exchange shuts the exchange's sockets down at the deadline (the sockets are
  registered by the connection classes of our HTTPAdapter, a duplicate descriptor of each so
  that TLS wrapping does not hide them). All the addresses of a name share that deadline
  (Happy Eyeballs, RFC 8305: the next address is tried after CONNECT_STAGGER_S beside the
  last), so addresses that drop packets cost a quarter second each, not a timeout each. Only
  the DNS lookup cannot be cut short; see the watchdog below.
- Nothing is kept between beats: connections are closed after every exchange, cookies are
  never stored or sent, and nothing is read from the environment but the proxy settings (no
  ~/.netrc, whose credentials would replace the token, no REQUESTS_CA_BUNDLE).
- Answers are streamed; their head (status line and headers, interim 1xx answers included,
  which are skipped as RFC 9110 says) is read up to MAX_HEAD_BYTES and their body up to
  MAX_BODY_BYTES (64 KiB each; a StackSense answer is a few hundred bytes), never decoded
  beyond it (Accept-Encoding: identity); a longer head or body fails the attempt. JSON of any
  shape, depth or type, Retry-After in any form and odd status lines are parsed defensively;
  ids are compared as numbers ("7" is server 7).
- An unexpected exception inside one beat is logged with its traceback (at most every
  FAILURE_SUMMARY_EVERY_S, else one line) and the beat counts as failed; the loop goes on.
  Only a bug outside the beat ends the process (exit 70).
- Server text that reaches the logs or the state file has control characters escaped, and
  every secret the agent holds (the token, the proxy's user:password; raw, percent-encoded or
  base64 as in Basic) is scrubbed from it, and again from every log line, the state file and
  --once's output: a server or proxy that echoes the request gives nothing away.
- The failure log is rate-limited by kind (an HTTP status, a timeout, a refused connection,
  ...), not by exact text: a server whose error text carries a new request id every time is
  summarised like any other.
- A TLS certificate verification failure, and a 407 from the proxy, are definite failures
  (not retried) with a hint: STACKSENSE_CA_BUNDLE, or the proxy credentials.
- Settings are checked up front (exit 78, one line): ids are ASCII digits, the token is what a
  Bearer token may hold (RFC 6750: A-Z a-z 0-9 - . _ ~ + / then = padding), the URL has no
  user:password@, no empty ? or #, a valid ASCII host (write an international name in its
  xn-- form) and port; the config and token files are regular files of bounded size (a FIFO
  or a device is refused, never opened for a blocking read), UTF-8 JSON of any nesting.

The proxy is chosen as requests chooses it (HTTPS_PROXY / HTTP_PROXY / ALL_PROXY, NO_PROXY);
written without a scheme it is http://. The start-up log says which one is used, its
credentials redacted; a proxy URL with a ? or # (an unencoded one in the password), a bad port
or an unknown scheme is a configuration error, reported without its credentials.

Watchdog: WATCHDOG=1 is sent every WATCHDOG_USEC/2 while the loop waits, and by the guard
thread while an exchange is in flight, but never past that exchange's deadline: a loop stuck
anywhere (a DNS lookup that never returns, a bug) stops the pings and systemd restarts it.

Signals: SIGTERM and SIGINT stop the agent (exit 0) within a second, even mid-request. The
SIGHUP handler is the program's first instruction: a SIGHUP during start-up never ends it.
SIGHUP re-reads the token file when the token came from one (STACKSENSE_API_TOKEN_FILE or the
systemd credential): a valid new token is used from the next beat, which first asks the
server whose token it is; an invalid one is refused with one log line and the old token is
kept. Otherwise SIGHUP is logged and ignored; it never ends the agent.

Exit codes:
    0   stopped by SIGTERM/SIGINT; --once succeeded; --check-config found the config valid
    1   --once: the heartbeat failed
    64  the command line could not be parsed (EX_USAGE)
    70  internal error: the loop crashed (EX_SOFTWARE); systemd restarts it
    78  a setting is invalid, or the server belongs to another id (EX_CONFIG); do not restart
        (also with stderr or stdout closed: the message is then lost, the status is not)

Needs Python 3.6+ and requests 2.25+; nothing else.
"""

import signal
import threading

# A SIGHUP that comes before the loop listens (systemd's reload right after a restart) must not
# end the agent: from the first instruction it is only noted, and run_daemon() acts on it.
HANGUP = threading.Event()
if __name__ == "__main__":
    signal.signal(signal.SIGHUP, lambda *_args: HANGUP.set())

import argparse  # noqa: E402
import base64  # noqa: E402
import contextlib  # noqa: E402
import email.utils  # noqa: E402
import errno  # noqa: E402
import http.client  # noqa: E402
import http.cookiejar  # noqa: E402
import ipaddress  # noqa: E402
import json  # noqa: E402
import logging  # noqa: E402
import math  # noqa: E402
import os  # noqa: E402
import random  # noqa: E402
import re  # noqa: E402
import selectors  # noqa: E402
import socket  # noqa: E402
import stat  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from datetime import datetime, timezone  # noqa: E402
from urllib.parse import quote, unquote, urlsplit  # noqa: E402

try:
    import requests
    import requests.adapters
    import urllib3.connection
    import urllib3.connectionpool
    import urllib3.exceptions
except ImportError:  # an Ansible controller checking settings (settings_problems) needs none
    requests = None

AGENT_VERSION = "1.2.0"
AGENT_NAME = "stacksense-heartbeat"

DEFAULT_CONFIG_PATH = "~/.stacksense_heartbeat.conf"
DEFAULT_INTERVAL_S = 30.0
MIN_INTERVAL_S = 1.0
MAX_INTERVAL_S = 86400.0
DEFAULT_TIMEOUT_S = 10.0
DEFAULT_JITTER_FRACTION = 0.1
MAX_JITTER_FRACTION = 0.5
STATE_FILE_NAME = "state.json"
TOKEN_CREDENTIAL_NAME = "api_token"

# Within one beat: exponential backoff with full jitter, base doubling up to the cap, at
# most MAX_ATTEMPTS_PER_BEAT requests while calm, ONE after a failed beat (until
# CALM_AFTER_BEATS beats in a row succeed), never past the next beat's due time.
BACKOFF_BASE_S = 1.0
BACKOFF_CAP_S = 15.0
MAX_ATTEMPTS_PER_BEAT = 4
RETRYABLE_STATUS = (408, 429, 500, 502, 503, 504)

# What the agent accepts from the wire and from its files.
MAX_BODY_BYTES = 64 * 1024
# The status line and header lines of an answer, interim 1xx answers included: bounded like
# the body (http.client alone allows 100 lines of 64 KiB each). A StackSense answer's head is
# a few hundred bytes; a load balancer's cookies a few KiB.
MAX_HEAD_BYTES = 64 * 1024
# RFC 8305's Connection Attempt Delay: the next address of a name is tried when the last one
# has not connected within this, all of them within the exchange's one deadline.
CONNECT_STAGGER_S = 0.25
# The StackSense server stores agent_version in 50 characters and answers 500 to a longer one.
MAX_AGENT_VERSION_CHARS = 50
BODY_CHUNK_BYTES = 8192
MAX_SHOWN_CHARS = 200
MAX_CONFIG_FILE_BYTES = 64 * 1024
MAX_TOKEN_FILE_BYTES = 8192
MAX_TOKEN_CHARS = 4096
ASCII_ID = re.compile(r"[0-9]{1,18}")
BEARER_TOKEN = re.compile(r"[A-Za-z0-9._~+/-]+=*")  # RFC 6750 b64token
HOST_LABEL = re.compile(r"[A-Za-z0-9_]([A-Za-z0-9_-]{0,61}[A-Za-z0-9_])?")
RETRY_AFTER_SECONDS = re.compile(r"[0-9]{1,15}(\.[0-9]{1,9})?")

# While failing, one summary line at most this often (the first failure and every change
# between healthy and failing are always logged).
FAILURE_SUMMARY_EVERY_S = 600.0

# The schedule and the retry policy (the policy functions after the configuration):
# A Retry-After counts for at most this long (in a beat and for the next beat): a proxy's
# "come back tomorrow" or a server clock far ahead must not silence the host for hours.
MAX_RETRY_AFTER_S = 600.0
# The StackSense server shows a host offline after this long without a heartbeat.
SERVER_OFFLINE_AFTER_S = 180.0
# After a failed beat the agent is congested until this many beats in a row succeed: one
# request per beat, and a beat that succeeds is followed by the next one later
# (congested_stretch), so the hosts still failing get the server's capacity.
CALM_AFTER_BEATS = 10
CONGESTED_STRETCH_MAX = 3

SYSLOG_PRIORITY = {logging.DEBUG: 7, logging.INFO: 6, logging.WARNING: 4, logging.ERROR: 3}

EX_OK = 0
EX_FAILED = 1
EX_USAGE = 64
EX_SOFTWARE = 70
EX_CONFIG = 78

# What a refusal means, by status; LEGACY_HINTS first in legacy mode. The StackSense server
# refuses the legacy API: 403 with Django's CSRF page, or 401 {"error": "authentication
# required"} when a CSRF cookie came along.
LEGACY_REFUSED_HINT = ("this StackSense server refuses the legacy API (POST /api/heartbeat/<id>/); "
                       "it takes heartbeats with an API token, one per server: create this "
                       "server's token (the dashboard's Add server, or manage.py "
                       "create_agent_token <id>) and set STACKSENSE_API_TOKEN or the token file "
                       "(the role's stacksense_api_token)")
LEGACY_HINTS = {
    401: LEGACY_REFUSED_HINT,
    403: LEGACY_REFUSED_HINT,
    404: "there is no heartbeat endpoint for this server id at this address; check "
         "STACKSENSE_SERVER_ID and STACKSENSE_API_URL",
}
STATUS_HINTS = {
    301: "the server redirected; check STACKSENSE_API_URL (scheme, host and path prefix)",
    401: "the server rejected the API token; check STACKSENSE_API_TOKEN / the token file",
    403: "the server refused this token or host; check STACKSENSE_API_TOKEN / the token file",
    404: "there is no heartbeat endpoint at this address; check STACKSENSE_API_URL",
    405: "the server does not accept heartbeats at this address; check STACKSENSE_API_URL",
    407: "the proxy wants credentials or refused them; check the user and password in the "
         "proxy URL (HTTPS_PROXY / HTTP_PROXY; the role's stacksense_https_proxy)",
}
PROXY_AUTH_HINT = STATUS_HINTS[407]
CA_BUNDLE_HINT = ("not retried; set STACKSENSE_CA_BUNDLE (the role's stacksense_ca_certificate "
                  "or stacksense_ca_bundle) to the CA that signed the server's certificate")

log = logging.getLogger(AGENT_NAME)


# ------------------------------------------------------------------------------------- text helpers


def printable(text):
    """`text` with control and other unprintable characters escaped (\\x1b, \\n, \\u202e)."""
    if text.isprintable():
        return text
    return "".join(char if char.isprintable() else char.encode("unicode_escape").decode("ascii")
                   for char in text)


def shorten(text, limit=MAX_SHOWN_CHARS):
    return text if len(text) <= limit else text[:limit] + "..."


def redact_url(url):
    """`url` with any user:password@ replaced by <redacted>@, scheme or not.

    Up to the last @: a password written with an unencoded # ? / or @ stays hidden too.
    """
    scheme, sep, rest = url.partition("://")
    if not sep or not re.fullmatch(r"[A-Za-z][A-Za-z0-9+.-]*", scheme):
        scheme, sep, rest = "", "", url
    if "@" not in rest:
        return url
    return scheme + sep + "<redacted>@" + rest.rsplit("@", 1)[1]


def proxy_secrets(proxy):
    """Every form in which the proxy URL's credentials may come back: the user:password
    part raw and percent-decoded, the password alone in both forms and percent-encoded, and
    the base64 of user:password that a Basic Proxy-Authorization carries."""
    if not proxy:
        return []
    rest = proxy.partition("://")[2] or proxy
    if "@" not in rest:
        return []
    userinfo = rest.rsplit("@", 1)[0]
    user, _colon, password = userinfo.partition(":")
    decoded = unquote(user) + ":" + unquote(password)
    basic = base64.b64encode(decoded.encode("latin-1", "replace")).decode("ascii")
    forms = [userinfo, decoded, basic]
    if password:
        forms += [password, unquote(password), quote(unquote(password), safe="")]
    return forms


def format_duration(seconds):
    seconds = round(seconds)
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"


# ------------------------------------------------------------------------------------ configuration


class ConfigError(Exception):
    """A setting is invalid; the message names it, its source, its value and the fix."""


class Setting:
    """One configuration value: where it may come from and how it is checked."""

    def __init__(self, name, env, flag, parse, default=None, secret=False, help=""):
        self.name = name  # also the key in the JSON config file
        self.env = env
        self.flag = flag
        self.parse = parse
        self.default = default
        self.secret = secret
        self.help = help


def parse_server_id(value):
    if isinstance(value, int) and not isinstance(value, bool):
        value = str(value)
    text = value.strip() if isinstance(value, str) else ""
    if not ASCII_ID.fullmatch(text) or int(text) < 1:
        raise ValueError("expected a positive integer of ASCII digits, e.g. 42")
    return int(text)


def parse_api_url(value):
    example = "e.g. https://stacksense.example.com"
    text = value.strip() if isinstance(value, str) else ""
    if any(ord(char) > 127 for char in text):
        raise ValueError("expected an ASCII URL; write an international host name in its "
                         "xn-- (IDNA) form, " + example)
    if any(not char.isprintable() or char.isspace() for char in text):
        raise ValueError("expected a URL without spaces or control characters, " + example)
    try:
        parts = urlsplit(text)
        port = parts.port
    except ValueError:
        raise ValueError("expected a valid host and port number, " + example) from None
    if parts.scheme not in ("http", "https") or not text.lower().startswith(parts.scheme + "://"):
        raise ValueError("expected an http:// or https:// URL, " + example)
    if "@" in parts.netloc:
        raise ValueError("expected a URL without user:password@; StackSense authenticates "
                         "with the API token (STACKSENSE_API_TOKEN), not with the URL")
    if "?" in text or "#" in text:
        raise ValueError("expected a URL without ?query or #fragment")
    if not parts.hostname:
        raise ValueError("expected a URL with a host name, " + example)
    if not valid_host(parts.hostname, parts.netloc.startswith("[")):
        raise ValueError("expected a valid host name or IP address, " + example)
    if port == 0 or parts.netloc.endswith(":"):
        raise ValueError("expected a valid port number (1-65535) after the host name")
    return text.rstrip("/")


def valid_host(host, bracketed):
    """An ASCII DNS name (letters, digits, - and _ in labels), an IPv4 or a [IPv6] address."""
    if bracketed:
        try:
            return ipaddress.ip_address(host).version == 6
        except ValueError:
            return False
    labels = host[:-1].split(".") if host.endswith(".") else host.split(".")
    if len(host) > 253 or not all(HOST_LABEL.fullmatch(label) for label in labels):
        return False
    if all(label.isdigit() for label in labels):  # looks like an IPv4 address: must be one
        try:
            ipaddress.IPv4Address(host.rstrip("."))
        except ValueError:
            return False
    return True


def parse_seconds(low, high):
    def parse(value):
        seconds = None
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            try:
                seconds = float(value)
            except (ValueError, OverflowError):
                seconds = None
        if seconds is None or math.isnan(seconds):
            raise ValueError("expected a number of seconds")
        if not (low <= seconds <= high):
            raise ValueError(f"expected seconds between {low:g} and {high:g}")
        return seconds

    return parse


def parse_fraction(value):
    fraction = None
    if isinstance(value, (str, int, float)) and not isinstance(value, bool):
        try:
            fraction = float(value)
        except (ValueError, OverflowError):
            fraction = None
    if fraction is None or not (0 <= fraction <= MAX_JITTER_FRACTION):
        raise ValueError(f"expected a fraction between 0 and {MAX_JITTER_FRACTION:g}")
    return fraction


def parse_token(value):
    token = value.strip() if isinstance(value, str) else ""
    if not BEARER_TOKEN.fullmatch(token) or len(token) > MAX_TOKEN_CHARS:
        raise ValueError(f"expected the token alone: up to {MAX_TOKEN_CHARS} of the "
                         "characters a Bearer token holds (A-Z a-z 0-9 - . _ ~ + /, then = "
                         "padding)")
    return token


def parse_path(value):
    if not isinstance(value, str) or not value.strip():
        raise ValueError("expected a file path")
    if "\0" in value:
        raise ValueError("expected a path without a NUL character")
    return os.path.expanduser(value)


def parse_readable_file(value):
    path = parse_path(value)
    if not os.path.isfile(path) or not os.access(path, os.R_OK):
        raise ValueError("expected a readable file (a regular one, not a directory or a FIFO)")
    return path


def parse_state_file(value):
    path = parse_path(value)
    if path.endswith("/"):
        raise ValueError("expected a file path, e.g. /var/lib/stacksense-heartbeat/state.json")
    return path


def parse_log_level(value):
    level = str(value).strip().lower()
    if level not in ("debug", "info", "warning", "error"):
        raise ValueError("expected one of debug, info, warning, error")
    return level


SETTINGS = (
    Setting("server_id", "STACKSENSE_SERVER_ID", "--server-id", parse_server_id,
            help="server id from the StackSense dashboard (legacy API; optional with a token)"),
    Setting("api_url", "STACKSENSE_API_URL", "--api-url", parse_api_url,
            help="base URL of the StackSense server, e.g. https://stacksense.example.com"),
    Setting("interval", "STACKSENSE_INTERVAL", "--interval",
            parse_seconds(MIN_INTERVAL_S, MAX_INTERVAL_S), DEFAULT_INTERVAL_S,
            help="seconds between heartbeats (default 30)"),
    Setting("timeout", "STACKSENSE_TIMEOUT", "--timeout",
            parse_seconds(0.1, MAX_INTERVAL_S), DEFAULT_TIMEOUT_S,
            help="seconds to wait for one answer; below the interval (default 10)"),
    Setting("api_token", "STACKSENSE_API_TOKEN", None, parse_token, secret=True,
            help="API token: selects the token API (environment or file only)"),
    Setting("api_token_file", "STACKSENSE_API_TOKEN_FILE", "--api-token-file",
            parse_readable_file,
            help="file holding the API token (default: $CREDENTIALS_DIRECTORY/api_token)"),
    Setting("ca_bundle", "STACKSENSE_CA_BUNDLE", "--ca-bundle", parse_readable_file,
            help="CA bundle to verify the server's certificate with"),
    Setting("state_file", "STACKSENSE_STATE_FILE", "--state-file", parse_state_file,
            help="JSON file recording the last attempt (default: $STATE_DIRECTORY/state.json)"),
    Setting("log_level", "STACKSENSE_LOG_LEVEL", "--log-level", parse_log_level, "info",
            help="debug, info, warning or error (default info; -v is debug)"),
    Setting("jitter", "STACKSENSE_JITTER", "--jitter", parse_fraction, DEFAULT_JITTER_FRACTION,
            help="while failing, each beat comes up to this fraction of the interval early "
                 "(default 0.1)"),
)


SETTINGS_BY_NAME = {s.name: s for s in SETTINGS}


def read_small_file(path, limit):
    """The bytes of the regular file at `path`, at most `limit` of them.

    Raises OSError when it cannot be opened, ValueError saying why it is not acceptable. The
    file is opened without blocking, so a FIFO or a device cannot hang the start-up.
    """
    if "\0" in path:
        raise ValueError("the path holds a NUL character")
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise ValueError("it is not a regular file")
        small_file = os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise
    with small_file:
        data = small_file.read(limit + 1)
    if len(data) > limit:
        raise ValueError(f"it is larger than {limit} bytes")
    return data


def read_config_file(path, required):
    """Return the JSON object in `path` ({} when it is absent and not `required`)."""
    example = '{"server_id": 42, "api_url": "https://..."}'
    try:
        data = read_small_file(path, MAX_CONFIG_FILE_BYTES)
    except FileNotFoundError:
        if required:
            raise ConfigError(f"config file {path} does not exist; create it or fix --config / "
                              "STACKSENSE_CONFIG") from None
        return {}
    except OSError as error:
        raise ConfigError(f"config file {path} cannot be read ({error.strerror or error}); "
                          "fix its permissions") from None
    except ValueError as error:
        raise ConfigError(f"config file {path} cannot be used: {error}; expected a small "
                          f"regular file holding a JSON object such as {example}") from None
    try:
        values = json.loads(data.decode("utf-8"))
    except UnicodeDecodeError:
        raise ConfigError(f"config file {path} is not UTF-8 text; expected a JSON object such "
                          f"as {example}") from None
    except RecursionError:
        raise ConfigError(f"config file {path} nests too deeply to be read; expected a flat "
                          f"JSON object such as {example}") from None
    except ValueError as error:
        raise ConfigError(f"config file {path} is not valid JSON ({error}); expected an object "
                          f"such as {example}") from None
    if not isinstance(values, dict):
        raise ConfigError(f"config file {path} must hold a JSON object, e.g. {example}")
    unknown = sorted(set(values) - set(SETTINGS_BY_NAME))
    if unknown:
        raise ConfigError("config file {} has unknown key {}; known keys: {}".format(
            path, shorten(repr(unknown[0])), ", ".join(s.name for s in SETTINGS)))
    return values


def shown_value(setting, raw):
    """How a bad raw value appears in the error: secrets hidden, URL credentials redacted."""
    if setting.secret:
        return "(hidden)"
    if isinstance(raw, str):
        return shorten(repr(redact_url(raw)))
    if raw is None or isinstance(raw, (bool, int, float)):
        return shorten(repr(raw))
    return "a JSON " + ("list" if isinstance(raw, list) else "object")


def pick(setting, args, env, file_values, file_path):
    """Return (raw value, where it came from) for one setting, by precedence."""
    cli_value = getattr(args, setting.name, None) if setting.flag else None
    if cli_value is not None:
        return cli_value, f"command line {setting.flag}"
    if env.get(setting.env, "").strip():
        return env[setting.env], f"environment {setting.env}"
    if setting.name in file_values and file_values[setting.name] not in (None, ""):
        return file_values[setting.name], f"config file {file_path} key {setting.name!r}"
    return None, "default"


def load_config(args, env):
    """Build the effective configuration, or raise ConfigError naming the bad setting.

    Precedence: command line > environment > config file > defaults. `env` is a mapping
    (os.environ in production) so callers and tests need not patch the process environment.
    The config file is --config, else $STACKSENSE_CONFIG, else ~/.stacksense_heartbeat.conf
    (which may be absent). Systemd's $STATE_DIRECTORY and $CREDENTIALS_DIRECTORY supply the
    defaults of the state file and the token file.
    """
    explicit_path = args.config or env.get("STACKSENSE_CONFIG", "").strip()
    file_path = expand_home(explicit_path or DEFAULT_CONFIG_PATH, env)
    file_values = read_config_file(file_path, required=bool(explicit_path))
    config = {"config_file": file_path if (file_values or explicit_path) else None,
              "token_file_in_use": None}
    sources = {}
    for setting in SETTINGS:
        raw, source = pick(setting, args, env, file_values, file_path)
        sources[setting.name] = source
        if raw is None:
            config[setting.name] = setting.default
            continue
        try:
            config[setting.name] = setting.parse(raw)
        except ValueError as error:
            raise ConfigError(setting_problem(setting, source, raw, error)) from None
    apply_derived_defaults(config, sources, env)
    problems = consistency_problems(config, sources, config["api_token"] is not None)
    if problems:
        raise ConfigError(problems[0])
    check_proxy(proxy_for(config["api_url"]))
    return config, sources


def setting_problem(setting, source, raw, error):
    """The one-line message for a value that `setting.parse` refused."""
    return f"{setting.name} ({source}) is {shown_value(setting, raw)}: {error}"


def expand_home(path, env):
    """Expand a leading ~ with the HOME of `env`, falling back to the password database."""
    if path.startswith("~/") and env.get("HOME"):
        return os.path.join(env["HOME"], path[2:])
    return os.path.expanduser(path)


def apply_derived_defaults(config, sources, env):
    """Fill in the defaults that depend on other values or on systemd's environment."""
    if sources["timeout"] == "default":
        config["timeout"] = default_timeout(config["interval"])
    state_dir = env.get("STATE_DIRECTORY", "").split(":")[0]
    if config["state_file"] is None and state_dir:
        config["state_file"] = os.path.join(state_dir, STATE_FILE_NAME)
        sources["state_file"] = "systemd $STATE_DIRECTORY"
    credentials_dir = env.get("CREDENTIALS_DIRECTORY", "")
    credential = os.path.join(credentials_dir, TOKEN_CREDENTIAL_NAME)
    if config["api_token_file"] is None and credentials_dir and os.path.isfile(credential):
        config["api_token_file"] = credential
        sources["api_token_file"] = f"systemd credential {TOKEN_CREDENTIAL_NAME}"
    if config["api_token"] is None and config["api_token_file"]:
        config["api_token"] = read_token_file(config["api_token_file"], sources["api_token_file"])
        config["token_file_in_use"] = config["api_token_file"]
        sources["api_token"] = sources["api_token_file"]


def read_token_file(path, source):
    """The token in the file at `path` (the whole file, surrounding white space stripped)."""
    try:
        data = read_small_file(path, MAX_TOKEN_FILE_BYTES)
    except OSError as error:
        raise ConfigError(f"api_token_file ({source}) is {path!r}: cannot be read "
                          f"({error.strerror or error}); fix its permissions") from None
    except ValueError as error:
        raise ConfigError(f"api_token_file ({source}) is {path!r}: {error}; expected a small "
                          "regular file holding the token alone") from None
    try:
        return parse_token(data.decode("ascii"))
    except ValueError:  # UnicodeDecodeError included; the token itself is never shown
        raise ConfigError(f"api_token_file ({source}) is {path!r}: the file is empty or holds "
                          "more than one token; expected the token alone (A-Z a-z 0-9 "
                          "- . _ ~ + /, then = padding)") from None


def default_timeout(interval):
    """The timeout when none is set: DEFAULT_TIMEOUT_S, or half the interval when that is less."""
    return DEFAULT_TIMEOUT_S if interval > DEFAULT_TIMEOUT_S else interval / 2.0


def consistency_problems(config, sources, token_given):
    """What is wrong between the settings (each parsed alone already): one line each."""
    problems = []
    if config["api_url"] is None:
        problems.append("api_url is not set: set STACKSENSE_API_URL (or 'api_url' in the "
                        "config file), e.g. https://stacksense.example.com")
    if config["server_id"] is None and not token_given:
        problems.append("server_id is not set: set STACKSENSE_SERVER_ID to the id shown in "
                        "the StackSense dashboard, or configure an API token")
    if config["timeout"] >= config["interval"]:
        problems.append(timeout_problem(config, sources))
    return problems


def timeout_problem(config, sources):
    return "timeout ({}) is {:g}: expected fewer seconds than the interval ({:g} s)".format(
        sources["timeout"], config["timeout"], config["interval"])


def check_proxy(proxy):
    """Refuse a proxy URL that cannot mean what its writer meant (ConfigError), quietly.

    A password with an unencoded # ? / or @ would be cut at that character, and the rest
    taken for the host or a fragment; its parts are never shown.
    """
    problem = proxy_problem(proxy)
    if problem:
        raise ConfigError(problem + " (set in HTTPS_PROXY, HTTP_PROXY or ALL_PROXY)")


def proxy_problem(proxy):
    """Why the proxy URL (from HTTPS_PROXY, HTTP_PROXY or ALL_PROXY) is unusable, or None."""
    if not proxy:
        return None
    shown = redact_url(proxy)
    fix = ("expected [http://][user:password@]host:port, with # ? / @ % in the user or the "
           "password percent-encoded (%23 %3F %2F %40 %25)")
    text = proxy if "://" in proxy else "http://" + proxy
    try:
        parts = urlsplit(text)
        parts.port  # noqa: B018 (raises ValueError for a port that is not a number)
    except ValueError:
        return f"the proxy URL {shown!r} is not valid: {fix}"
    if parts.query or parts.fragment or "?" in text or "#" in text or not parts.hostname:
        return f"the proxy URL {shown!r} is not valid: {fix}"
    if parts.scheme.lower() not in ("http", "https", "socks4", "socks4a", "socks5", "socks5h"):
        return f"the proxy URL {shown!r} has an unknown scheme: {fix}"
    return None


def proxy_for(url):
    """The proxy URL requests takes from the environment for `url` (honouring NO_PROXY).

    Written without a scheme, it is an http:// proxy (requests would fail on one with
    credentials: "agent:pw@proxy:3128" reads as scheme "agent").
    """
    try:
        proxy = requests.utils.select_proxy(url, requests.utils.get_environ_proxies(url))
    except (ValueError, OSError):
        return None
    if proxy and "://" not in proxy:
        proxy = "http://" + proxy
    return proxy


# Settings whose check needs the host's files (existence, readability): settings_problems()
# checks only that they are paths.
HOST_FILE_SETTINGS = ("api_token_file", "ca_bundle")


PROXY_VARIABLES = ("https_proxy", "http_proxy", "all_proxy")


def env_settings(env, settings=SETTINGS):
    """`settings` as `env` (the unit's or the cron file's variables) sets them: parsed values
    or defaults, their sources, and one-line problems. Values that are not strings are taken
    as str(value); the host-file settings are only checked to be paths. With no problem, a
    timeout left unset is default_timeout(interval)."""
    config, sources, problems = {}, {}, []
    for setting in settings:
        raw = env.get(setting.env)
        raw = "" if raw is None else raw if isinstance(raw, str) else str(raw)
        config[setting.name], sources[setting.name] = setting.default, "default"
        if not raw.strip():
            continue
        sources[setting.name] = f"environment {setting.env}"
        parse = parse_path if setting.name in HOST_FILE_SETTINGS else setting.parse
        try:
            config[setting.name] = parse(raw)
        except ValueError as error:
            problems.append(setting_problem(setting, sources[setting.name], raw, error))
    if not problems and sources.get("timeout") == "default":
        config["timeout"] = default_timeout(config["interval"])
    return config, sources, problems


def settings_problems(env):
    """What the agent would refuse in the environment `env`, as one-line messages ([] if none).

    `env` maps STACKSENSE_* (and proxy) variables to their values as the unit or the cron
    file passes them (see env_settings). The checks are the loader's own parsers and
    consistency rules, without those that need the host: the token, CA and state files are
    only checked to be paths, and a token counts as given when STACKSENSE_API_TOKEN,
    STACKSENSE_API_TOKEN_FILE or CREDENTIALS_DIRECTORY (systemd's LoadCredential=) is set.
    Every proxy variable that is set is checked, whether or not NO_PROXY exempts the server.
    Pure: no file, network or `requests` is touched. An interval too long for the server's
    offline window is offline_window_problem()'s: the agent runs with it; the role refuses it.
    """
    config, sources, problems = env_settings(env)
    if not problems:
        token_given = any(str(env.get(name) or "").strip() for name in (
            "STACKSENSE_API_TOKEN", "STACKSENSE_API_TOKEN_FILE", "CREDENTIALS_DIRECTORY"))
        problems = consistency_problems(config, sources, token_given)
    for name in PROXY_VARIABLES:
        for key in (name, name.upper()):
            problem = proxy_problem(str(env.get(key) or "").strip())
            if problem:
                problems.append(f"{key}: {problem}")
    return problems


TIMING_SETTINGS = tuple(SETTINGS_BY_NAME[name] for name in ("interval", "timeout", "jitter"))


def derived_settings(env):
    """The values the agent derives from the timing settings of `env`, for the role.

    {"interval": s, "timeout": s, "jitter": fraction, "watchdog_s": seconds for systemd's
    WatchdogSec=}. Only STACKSENSE_INTERVAL, STACKSENSE_TIMEOUT and STACKSENSE_JITTER count
    (the URL, the id and the rest need not be set). The timeout is the one set, else
    default_timeout(interval). The watchdog is four timeouts and at least a minute: the agent
    pings it while it waits and during every exchange, which ends at the timeout; only a DNS
    lookup cannot be cut short, and the margin leaves a slow resolver room without hiding a
    stuck loop for long. Raises ValueError with the first problem of those settings.
    """
    config, sources, problems = env_settings(env, TIMING_SETTINGS)
    if not problems and config["timeout"] >= config["interval"]:
        problems = [timeout_problem(config, sources)]
    if problems:
        raise ValueError(problems[0])
    values = {name: config[name] for name in ("interval", "timeout", "jitter")}
    values["watchdog_s"] = max(60, math.ceil(values["timeout"] * 4))
    return values


def longest_silence_s(interval, timeout):
    """(longest silence the server may see, longest beat) for this interval and timeout.

    The retry policy (with_retries): a beat is one request, retried on a blip up to
    MAX_ATTEMPTS_PER_BEAT times with backoff (BACKOFF_BASE_S doubling to BACKOFF_CAP_S),
    each try ending at the timeout, and the beat ends before the next one is due. So after a
    heartbeat that was heard, the next can arrive as late as one interval plus such a beat.
    """
    backoff = sum(min(BACKOFF_CAP_S, BACKOFF_BASE_S * 2 ** n)
                  for n in range(MAX_ATTEMPTS_PER_BEAT - 1))
    beat = min(interval, MAX_ATTEMPTS_PER_BEAT * timeout + backoff)
    return interval + beat, beat


def offline_window_problem(env):
    """Why the timing settings of `env` cannot keep the host online on the server, or None.

    The server shows a host offline after SERVER_OFFLINE_AFTER_S without a heartbeat; the
    longest silence (longest_silence_s) must fit inside. The message says the largest
    interval that fits with the timeout as set (or its default for each interval). None too
    when derived_settings() refuses the settings: settings_problems() says why.
    """
    try:
        derived = derived_settings(env)
    except ValueError:
        return None
    interval, timeout = derived["interval"], derived["timeout"]
    longest, beat = longest_silence_s(interval, timeout)
    if longest <= SERVER_OFFLINE_AFTER_S:
        return None
    timeout_set = bool(str(env.get("STACKSENSE_TIMEOUT") or "").strip())
    fits = [i for i in range(1, int(SERVER_OFFLINE_AFTER_S) + 1)
            if longest_silence_s(i, timeout if timeout_set else default_timeout(i))[0]
            <= SERVER_OFFLINE_AFTER_S]
    fix = f"set STACKSENSE_INTERVAL to at most {max(fits)}" if fits else "lower STACKSENSE_TIMEOUT"
    return (f"interval (environment STACKSENSE_INTERVAL) is {interval:g} s with a timeout of "
            f"{timeout:g} s: a beat that meets a blip retries for up to {beat:g} s "
            f"({MAX_ATTEMPTS_PER_BEAT} tries), so the server could hear nothing for {longest:g} s, "
            f"past the {SERVER_OFFLINE_AFTER_S:g} s after which it shows the host offline. "
            f"Fix: {fix}.")


def describe_config(config, sources):
    """One line per setting: value and source, the token redacted."""
    lines = []
    for setting in SETTINGS:
        value = config[setting.name]
        if setting.secret and value is not None:
            value = "<redacted>"
        lines.append(printable(f"{setting.name} = {value} ({sources[setting.name]})"))
    return lines


# ---------------------------------------------------------------- the schedule and the retry policy


# Pure functions of (state, clock, random source), and the one object holding what they
# remember between beats (PolicyMemory). Agent.run() and with_retries() call them, and so does
# the fleet simulation (bench/fleet_load.py), which imports this file.


def next_slot_after(slot, interval, now):
    """The first slot of the fixed-rate schedule strictly after `now`.

    Slots are slot + k * interval; missed slots are skipped, never caught up in a burst.
    """
    missed = max(0, math.floor((now - slot) / interval))
    return slot + (missed + 1) * interval


def jitter_offset(rng, interval, jitter_fraction):
    """How much earlier than its slot a failing agent's next beat comes (<= 0)."""
    return -rng.uniform(0, jitter_fraction) * interval


def phase_anchor(first_beat_at, interval, rng):
    """This agent's place in the interval, drawn once, after its first beat.

    The first beat goes at start; the second comes uniformly 0.5 to 1.5 intervals later,
    and from then on every interval after it. So a fleet that (re)started in the same
    second is spread evenly over one interval from its second beat on. The phase is random
    rather than derived from /etc/machine-id: cloned VMs and containers often share that
    file, and hosts sharing a phase would beat in lockstep for ever.
    """
    return first_beat_at + (rng.random() - 0.5) * interval


def next_beat_slot(slot, interval, now, calm_beats, jitter_fraction, rng, not_before=None):
    """When the next beat goes, given the last beat's slot and the calm beats (calm_after).

    Calm: the next slot of the fixed-rate schedule (next_slot_after), so the agent keeps
    its phase and a fleet keeps the even spread it settled on.
    The last beat failed: up to jitter_fraction of an interval EARLIER (jitter_offset),
    never later, and the schedule moves with it: failing agents do not hit a busy server in
    the same order beat after beat, and each is heard within one interval of the server's
    return (about 1 + jitter_fraction / 2 requests per interval).
    Congested (it succeeded, but a beat failed within the last CALM_AFTER_BEATS): the slot
    congested_stretch() intervals on. A server that turns hosts away gets fewer requests
    from those it just heard, and its capacity goes to the hosts that are still failing.
    A server's Retry-After (not_before) skips the slots before it; missed slots are never
    caught up in a burst.
    """
    if calm_beats == 0:
        slot += jitter_offset(rng, interval, jitter_fraction)
    if not_before is not None:
        now = max(now, not_before)
    slot = next_slot_after(slot, interval, now)
    if 0 < calm_beats < CALM_AFTER_BEATS:
        slot += (congested_stretch(interval) - 1) * interval
    return slot


def congested_stretch(interval):
    """Intervals between the beats of a congested agent that succeed (1 to 3).

    As many as fit in half the server's offline window, and at most CONGESTED_STRETCH_MAX
    (half of a window of 6 intervals, for servers set to a shorter window), so after a
    stretched beat there is room for several failing beats (one interval apart) before the
    host shows offline: 3 at the default 30 s interval (a beat every 90 s), 1 from 90 s on.
    """
    return max(1, min(CONGESTED_STRETCH_MAX, int(SERVER_OFFLINE_AFTER_S / 2 // interval)))


def calm_after(calm_beats, ok):
    """Successful beats in a row, counted up to CALM_AFTER_BEATS; 0 after a failed beat."""
    return min(CALM_AFTER_BEATS, calm_beats + 1) if ok else 0


def attempts_allowed(consecutive_failures, calm_beats=CALM_AFTER_BEATS):
    """The retry budget of a beat: MAX_ATTEMPTS_PER_BEAT while calm, else one request.

    Retries within a beat help with a blip, not with an outage: there they multiply the
    load of a server that is trying to recover. Once a beat has failed, each beat sends
    one request until CALM_AFTER_BEATS beats in a row have succeeded.
    """
    if consecutive_failures == 0 and calm_beats >= CALM_AFTER_BEATS:
        return MAX_ATTEMPTS_PER_BEAT
    return 1


def retry_pause(attempt, attempts, budget, now, timeout, give_up_at, rng):
    """Seconds to wait before the next attempt of this beat, or None to end the beat.

    None when the attempt succeeded, failed definitely, or used up the beat's `budget`
    (attempts_allowed). Else the server's Retry-After, or exponential backoff with full
    jitter (uniform in 0..min(cap, base * 2**n)); None too when the next attempt's whole
    timeout would not fit before `give_up_at`, so a beat never runs into the next one.
    """
    if attempt.ok or not attempt.retryable or attempts >= budget:
        return None
    if attempt.retry_after_s is not None:
        pause = attempt.retry_after_s
    else:
        backoff = min(BACKOFF_CAP_S, BACKOFF_BASE_S * 2 ** (attempts - 1))
        pause = rng.uniform(0, backoff)
    if now + pause + timeout > give_up_at:
        return None
    return pause


def retry_not_before(attempt, now):
    """The earliest time of the next beat after this attempt: Retry-After, capped, or None."""
    if attempt.ok or attempt.retry_after_s is None:
        return None
    return now + min(attempt.retry_after_s, MAX_RETRY_AFTER_S)


class PolicyMemory:
    """What the schedule and the retry policy remember between beats, in one place.

    failed_beats: failed beats in a row (Agent.record() counts them; the state file's
        consecutive_failures, the logs' "N beats failed");
    calm_beats: successful beats in a row, up to CALM_AFTER_BEATS (Agent.run() counts them
        with calm_after(); attempts_allowed() and next_beat_slot() read them);
    not_before: the server's Retry-After for the next beat (with_retries() keeps it,
        retry_not_before(); next_beat_slot() reads it).
    bench/fleet_load.py keeps the same three per simulated host.
    """

    def __init__(self):
        self.failed_beats = 0
        self.calm_beats = CALM_AFTER_BEATS
        self.not_before = None


# ---------------------------------------------------------------------- the wire: reading an answer


class BeatResult:
    """What one heartbeat (with its retries) came to."""

    def __init__(self, ok, attempts, status=None, error=None, answer=None, kind=None):
        self.ok = ok
        self.attempts = attempts
        self.status = status  # the last HTTP status, None when no answer came
        self.error = error  # why it failed, with a hint where one helps
        self.answer = answer  # the server's JSON answer, when it sent one
        self.kind = kind  # what failed (Attempt.kind), None on success

    @property
    def server_name(self):
        return wire_text(self.answer.get("server_name")) if isinstance(self.answer, dict) else None


class Attempt:
    """One HTTP exchange: ok, retryable, or a definite failure."""

    def __init__(self, ok=False, retryable=False, status=None, error=None, answer=None,
                 retry_after_s=None, kind=None):
        self.ok = ok
        self.retryable = retryable
        self.status = status
        # What failed, for the failure log's rate limit: the text may change every time (a
        # request id, a port), the kind does not.
        self.kind = kind or (f"HTTP {status}" if status else None)
        self.error = printable(error) if error else error  # it may quote the server
        self.answer = answer
        self.retry_after_s = retry_after_s


def parse_retry_after(value, now_wall):
    """Seconds to wait from a Retry-After header, at most MAX_RETRY_AFTER_S, or None.

    Delta-seconds (a decimal fraction is tolerated) or an HTTP date; anything else (negative,
    garbage, a date that cannot be read) is None, and the backoff decides.
    """
    value = value.strip() if isinstance(value, str) else ""
    if RETRY_AFTER_SECONDS.fullmatch(value):
        return min(float(value), MAX_RETRY_AFTER_S)
    try:
        when = email.utils.parsedate_to_datetime(value)
        if when.tzinfo is None:
            when = when.replace(tzinfo=timezone.utc)
        seconds = when.timestamp() - now_wall
    except (TypeError, ValueError, IndexError, OverflowError, AttributeError):
        return None  # parsedate_to_datetime raises TypeError or ValueError, by version
    return min(max(0.0, seconds), MAX_RETRY_AFTER_S)


def parse_answer(data):
    """The JSON value in the body (any type), or None when it is not UTF-8 JSON."""
    if not data:
        return None
    try:
        return json.loads(data.decode("utf-8"))
    except (ValueError, RecursionError):  # UnicodeDecodeError is a ValueError
        return None


def describe_body(data, scrub):
    """The body for a log line: secrets scrubbed from all of it, then shortened."""
    if data is None:
        return f"(an answer over {MAX_BODY_BYTES // 1024} KiB, not read)"
    return shorten(scrub(" ".join(data.decode("utf-8", "replace").split())))


def wire_id(value):
    """A server id from the wire as a number (7 and "7" are server 7), or None."""
    if isinstance(value, str) and ASCII_ID.fullmatch(value.strip()):
        value = int(value)
    if isinstance(value, int) and not isinstance(value, bool) and value > 0:
        return value
    return None


def wire_text(value):
    """A name from the wire, fit for a log line and the state file, or None."""
    return shorten(printable(value)) if isinstance(value, str) else None


def judge_response(status, headers, data, confirmed_by, scrub=str, legacy=False):
    """Turn an HTTP answer into an Attempt; the retry policy's table lives here.

    `data` is the body, None when it was longer than MAX_BODY_BYTES. A 2xx counts only when its
    JSON is an object setting `confirmed_by` to true ("heartbeat_received" for a heartbeat,
    "authenticated" for the token ping): a proxy's or portal's 200 page is a failure. The
    body quoted in the error goes through `scrub` first (a peer may echo the request).
    """
    answer = parse_answer(data)
    if status in RETRYABLE_STATUS or status >= 500:
        retry_after = parse_retry_after(headers.get("Retry-After"), time.time())
        return Attempt(retryable=True, status=status, answer=answer, retry_after_s=retry_after,
                       error=f"HTTP {status}: {describe_body(data, scrub)}")
    if 200 <= status < 300:
        if isinstance(answer, dict) and answer.get(confirmed_by) is True:
            return Attempt(ok=True, status=status, answer=answer)
        return Attempt(status=status, answer=answer, error=(
            f"HTTP {status} without {confirmed_by}=true: {describe_body(data, scrub)} "
            "(check that STACKSENSE_API_URL points at the StackSense server)"))
    hint = (legacy and LEGACY_HINTS.get(status)) or STATUS_HINTS.get(
        status, "the server refused the heartbeat")
    return Attempt(status=status, answer=answer,
                   error=f"HTTP {status}: {describe_body(data, scrub)} ({hint})")


def read_capped(raw):
    """The body from a streamed urllib3 response, or None when longer than MAX_BODY_BYTES."""
    chunks, size = [], 0
    while size <= MAX_BODY_BYTES:
        chunk = raw.read(min(BODY_CHUNK_BYTES, MAX_BODY_BYTES + 1 - size), decode_content=False)
        if not chunk:
            return b"".join(chunks)
        chunks.append(chunk)
        size += len(chunk)
    return None


def short_reason(error):
    """The innermost reason of a requests ConnectionError, without urllib3's wrapping."""
    reason = error
    while reason.args and isinstance(reason.args[0], BaseException):
        reason = reason.args[0]
    text = str(getattr(reason, "reason", None) or reason)
    # urllib3 prefixes the connection object's repr: keep only the operating system's words
    return text.split(": ", 1)[-1] if text.startswith(("<", "HTTP")) else text


def broken_answer(error):
    """What broke, when `error` is the peer hanging up or answering something else than HTTP."""
    while error is not None:
        if isinstance(error, urllib3.exceptions.ProtocolError) and len(error.args) > 1:
            detail = error.args[-1]
            if isinstance(detail, OSError) and detail.strerror:
                return detail.strerror
            return shorten(repr(detail))
        if isinstance(error, (urllib3.exceptions.ProtocolError, http.client.HTTPException)):
            return shorten(str(error) or type(error).__name__)
        error = error.args[0] if error.args and isinstance(error.args[0], BaseException) \
            else None
    return None


class HeadTooLarge(http.client.HTTPException):
    """The answer's status line and headers passed MAX_HEAD_BYTES."""


class BoundedHead:
    """The answer's file while its head is read: readline() counts against a byte budget.

    http.client reads the status line and headers (and a proxy's answer to CONNECT) with
    readline(); every other call passes through untouched.
    """

    def __init__(self, fp, limit):
        self.fp = fp
        self.left = limit
        self.counting = True

    def readline(self, limit=-1):
        if not self.counting:
            return self.fp.readline(limit)
        cap = self.left + 1 if limit is None or limit < 0 else min(limit, self.left + 1)
        line = self.fp.readline(cap)
        self.left -= len(line)
        if self.left < 0:
            raise HeadTooLarge(f"its status line and headers are larger than "
                               f"{MAX_HEAD_BYTES // 1024} KiB")
        return line

    def __getattr__(self, name):
        return getattr(self.fp, name)


class BoundedResponse(http.client.HTTPResponse):
    """http.client's answer with its whole head bounded, and interim 1xx answers skipped.

    RFC 9110 15.2: a 1xx (102 Processing, 103 Early Hints) is interim and the final answer
    follows; http.client skips only 100 Continue. 101 is final: the agent asks no upgrade.
    """

    def __init__(self, sock, *args, **kwargs):
        super().__init__(sock, *args, **kwargs)
        self.fp = BoundedHead(self.fp, MAX_HEAD_BYTES)

    def begin(self):
        if self.headers is not None:
            return
        while True:
            super().begin()
            if not 100 <= self.status < 200 or self.status == 101:
                break
            self.headers = self.msg = None  # interim: read the next head
        if isinstance(self.fp, BoundedHead):
            self.fp.counting = False


def family_interleaved(addresses):
    """getaddrinfo()'s answers, alternating the address families (RFC 8305 section 4)."""
    by_family = {}
    for address in addresses:
        by_family.setdefault(address[0], []).append(address)
    queues, ordered = list(by_family.values()), []
    while any(queues):
        ordered += [queue.pop(0) for queue in queues if queue]
    return ordered


def connect_any(host, port, deadline, socket_options=()):
    """A socket connected to one of `host`'s addresses before the monotonic `deadline`.

    Happy Eyeballs (RFC 8305): the first address is tried; while it has not connected
    after CONNECT_STAGGER_S the next one is tried beside it, and so on; a refusal moves to
    the next at once. The first to connect wins, the others are closed. So an address that
    drops packets (a broken IPv6 route) costs a quarter second, not the whole timeout, and
    all addresses together never take longer than the one deadline. Raises socket.timeout
    at the deadline, else the last OSError. Only the DNS lookup cannot be cut short.
    """
    candidates = family_interleaved(socket.getaddrinfo(host, port, 0, socket.SOCK_STREAM))
    pending, last_error, next_try_at = {}, None, time.monotonic()
    selector = selectors.DefaultSelector()
    try:
        while True:
            now = time.monotonic()
            if now >= deadline:
                raise socket.timeout(f"no address of {host} connected in time")
            if candidates and (not pending or now >= next_try_at):
                family, kind, proto, _canonical, address = candidates.pop(0)
                sock = socket.socket(family, kind, proto)
                error = start_connect(sock, address, socket_options)
                if error is None:
                    pending[sock] = address
                    selector.register(sock, selectors.EVENT_WRITE)
                    next_try_at = now + CONNECT_STAGGER_S
                else:
                    sock.close()
                    last_error = error
                continue
            if not pending:
                raise last_error or OSError(f"{host} has no address")
            wait_until = min(next_try_at, deadline) if candidates else deadline
            for key, _events in selector.select(max(0.0, wait_until - now)):
                sock = key.fileobj
                selector.unregister(sock)
                del pending[sock]
                code = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
                if code == 0:
                    sock.settimeout(max(0.001, deadline - time.monotonic()))
                    return sock
                sock.close()
                last_error = OSError(code, os.strerror(code))
                next_try_at = now  # a refusal: the next address at once
    finally:
        for sock in pending:
            sock.close()
        selector.close()


def start_connect(sock, address, socket_options):
    """Begin a non-blocking connect; None when under way, else the OSError it met at once."""
    try:
        for option in socket_options or ():
            sock.setsockopt(*option)
        sock.setblocking(False)
        code = sock.connect_ex(address)
    except OSError as error:
        return error
    if code in (0, errno.EINPROGRESS, errno.EAGAIN, errno.EWOULDBLOCK):
        return None
    return OSError(code, os.strerror(code))


# ---------------------------------------------------------- the exchange guard and the HTTP session


EXCHANGE = threading.local()  # .guard: the ExchangeGuard of this thread's exchange, if any


class ExchangeGuard:
    """Ends one HTTP exchange at its deadline, whatever the peer does, and feeds the watchdog.

    A context manager around the exchange. Its thread pings the watchdog at once and every
    `ping_every_s` until the deadline, then shuts down every socket the exchange opened (to
    the server or the proxy), which ends a blocked connect, TLS handshake or read at once. It
    holds a duplicate descriptor of each socket: TLS wrapping detaches the original object.
    """

    def __init__(self, seconds, ping=None, ping_every_s=None):
        self.deadline = time.monotonic() + seconds
        self.ping = ping
        self.ping_every_s = ping_every_s
        self.expired = False
        self.sockets = []
        self.lock = threading.Lock()
        self.done = threading.Event()
        self.thread = threading.Thread(target=self.keep_time, name="exchange-deadline")
        self.thread.daemon = True

    def __enter__(self):
        EXCHANGE.guard = self
        self.thread.start()
        return self

    def __exit__(self, *exc_info):
        EXCHANGE.guard = None
        self.done.set()
        self.thread.join()
        with self.lock:
            for sock in self.sockets:
                sock.close()
            self.sockets = []
        return False

    def remaining_s(self):
        return max(0.001, self.deadline - time.monotonic())

    def watch(self, sock):
        with self.lock:
            copy = sock.dup()
            self.sockets.append(copy)
            if self.expired:
                shut_down(copy)

    def keep_time(self):
        if self.ping:  # at once too: the gap since the last ping stays below ping_every_s
            self.ping()
        while True:
            remaining = self.deadline - time.monotonic()
            if remaining <= 0:
                break
            if self.done.wait(min(remaining, self.ping_every_s or remaining)):
                return
            if self.ping and time.monotonic() < self.deadline:
                self.ping()
        with self.lock:
            self.expired = True
            for sock in self.sockets:
                shut_down(sock)


def shut_down(sock):
    with contextlib.suppress(OSError):  # already closed by the peer or by the exchange
        sock.shutdown(socket.SHUT_RDWR)


# The wire: requests with urllib3 connection classes of our own. Only the agent itself needs
# them; settings_problems() runs where requests may be missing (an Ansible controller).
if requests is not None:
    class WatchedConnection:
        """Mixin for urllib3's connection classes: one deadline for all the addresses of a
        name (connect_any), each new socket handed to the exchange's guard, and answers
        read with BoundedResponse."""

        response_class = BoundedResponse

        def _new_conn(self):
            guard = getattr(EXCHANGE, "guard", None)
            timeout = self.timeout if isinstance(self.timeout, (int, float)) else DEFAULT_TIMEOUT_S
            deadline = guard.deadline if guard is not None else time.monotonic() + timeout
            try:
                sock = connect_any(self._dns_host, self.port, deadline, self.socket_options)
            except socket.timeout:
                raise urllib3.exceptions.ConnectTimeoutError(
                    self, f"Connection to {self.host} timed out") from None
            except OSError as error:
                raise urllib3.exceptions.NewConnectionError(
                    self, f"Failed to establish a new connection: {error}") from None
            if guard is not None:
                guard.watch(sock)
            return sock

    class WatchedHTTPConnection(WatchedConnection, urllib3.connection.HTTPConnection):
        pass

    class WatchedHTTPSConnection(WatchedConnection, urllib3.connection.HTTPSConnection):
        pass

    class WatchedHTTPPool(urllib3.connectionpool.HTTPConnectionPool):
        ConnectionCls = WatchedHTTPConnection

    class WatchedHTTPSPool(urllib3.connectionpool.HTTPSConnectionPool):
        ConnectionCls = WatchedHTTPSConnection

    WATCHED_POOLS = {"http": WatchedHTTPPool, "https": WatchedHTTPSPool}

    class WatchedAdapter(requests.adapters.HTTPAdapter):
        """requests' adapter whose connections, direct or through an HTTP(S) proxy, are watched."""

        def init_poolmanager(self, *args, **kwargs):
            super().init_poolmanager(*args, **kwargs)
            self.poolmanager.pool_classes_by_scheme = WATCHED_POOLS

        def proxy_manager_for(self, proxy, **proxy_kwargs):
            manager = super().proxy_manager_for(proxy, **proxy_kwargs)
            if not proxy.lower().startswith("socks"):  # SOCKS has its own connection classes
                manager.pool_classes_by_scheme = WATCHED_POOLS
            return manager

    class NoCookies(http.cookiejar.DefaultCookiePolicy):
        """Keep no cookie: nothing a server or a load balancer sets is sent back."""

        def set_ok(self, cookie, request):
            return False

        def return_ok(self, cookie, request):
            return False

    NETWORK_ERRORS = (requests.RequestException, urllib3.exceptions.HTTPError,
                      http.client.HTTPException, OSError, ValueError)


def make_session():
    """requests' Session with nothing kept or looked up between beats.

    No cookie jar (NoCookies), and no environment lookups (trust_env off: no ~/.netrc, whose
    credentials would replace our Authorization header, no REQUESTS_CA_BUNDLE): the agent
    passes the proxy it chose (proxy_for) and its CA bundle with every request.
    """
    session = requests.Session()
    session.trust_env = False
    session.cookies.set_policy(NoCookies())
    # One connection per exchange: a pool of one (a pool of ten costs a queue of ten per beat)
    adapter = WatchedAdapter(pool_connections=1, pool_maxsize=1)
    session.mount("http://", adapter)
    session.mount("https://", adapter)
    return session


# ----------------------------------------------------------------------- systemd and the state file


class Notifier:
    """sd_notify(3) over $NOTIFY_SOCKET with the stdlib; silent when not under systemd."""

    def __init__(self, env):
        self.address = env.get("NOTIFY_SOCKET") or None
        if self.address and self.address.startswith("@"):
            self.address = "\0" + self.address[1:]  # abstract namespace socket
        watchdog_usec = env.get("WATCHDOG_USEC", "")
        watchdog_pid = env.get("WATCHDOG_PID", "")
        watched = watchdog_usec.isdigit() and watchdog_pid in ("", str(os.getpid()))
        self.watchdog_every_s = int(watchdog_usec) / 2e6 if watched else None
        self.failed = False

    def notify(self, message):
        if not self.address:
            return
        try:
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
            try:
                sock.connect(self.address)
                sock.sendall(message.encode("utf-8"))
            finally:
                sock.close()
        except OSError as error:
            if not self.failed:  # say it once; heartbeats matter more than notifications
                log.warning("cannot notify systemd on %s: %s", self.address, error)
            self.failed = True


def utc_now_iso():
    return datetime.now(timezone.utc).replace(microsecond=0).isoformat()


class StateFile:
    """The agent's state as JSON, replaced atomically after every attempt.

    Mode 0600 (readable by the agent's user and root). It only ever replaces a regular file
    or creates one: a path naming anything else (a device such as /dev/null, a FIFO, a
    directory, a symbolic link) is left alone, with one warning, also as root.
    """

    def __init__(self, path):
        self.path = path
        self.failed = False

    def write(self, state, scrub=str):
        if not self.path:
            return
        directory = os.path.dirname(os.path.abspath(self.path))
        try:
            self.check_replaceable()
            fd, temp_path = tempfile.mkstemp(prefix=".state-", dir=directory)  # mode 0600
            try:
                with os.fdopen(fd, "w") as temp_file:
                    # One line: json's C encoder (an indented dump is pure Python, 4x slower)
                    temp_file.write(json.dumps({key: scrub(value) if isinstance(value, str)
                                                else value for key, value in state.items()},
                                               sort_keys=True) + "\n")
                os.replace(temp_path, self.path)
            except BaseException:
                os.unlink(temp_path)
                raise
        except (OSError, ValueError) as error:
            if not self.failed:
                log.warning("cannot write state file %s (%s); heartbeats continue",
                            printable(self.path), error)
            self.failed = True
            return
        if self.failed:
            log.info("state file %s is writable again", printable(self.path))
        self.failed = False

    def check_replaceable(self):
        """Raise ValueError when the path names something other than a regular file."""
        try:
            mode = os.lstat(self.path).st_mode
        except FileNotFoundError:
            return
        if not stat.S_ISREG(mode):
            raise ValueError("it is not a regular file; it is left alone: point "
                             "STACKSENSE_STATE_FILE at a file path")


# ---------------------------------------------------------------------------------------- the agent


class Agent:
    """Sends heartbeats. Time, waiting, randomness and HTTP are injected for the tests."""

    def __init__(self, config, session=None, clock=time.monotonic, stop=None, rng=None,
                 notifier=None, state_file=None):
        self.config = config
        self.session = session or make_session()
        self.clock = clock
        self.stop = stop or threading.Event()
        self.rng = rng or random.Random()
        self.notifier = notifier or Notifier({})
        self.state_file = state_file or StateFile(config.get("state_file"))
        self.mode = "token" if config.get("api_token") else "legacy"
        self.identified = False
        self.health = Health(clock)
        self.traceback_logged_at = None
        self.proxy = proxy_for(config["api_url"])
        self.secrets = self.secret_forms()
        self.prepared_requests = {}
        self.memory = PolicyMemory()
        self.state = {
            "agent_version": AGENT_VERSION, "pid": os.getpid(), "started_at": utc_now_iso(),
            "api_url": config["api_url"], "mode": self.mode, "server_id": config["server_id"],
            "server_name": None, "last_attempt_at": None, "last_success_at": None,
            "last_error": None, "last_status": None, "consecutive_failures": 0,
        }

    # -- HTTP

    def heartbeat_url(self):
        if self.mode == "token":
            return self.config["api_url"] + "/api/agent/heartbeat/"
        return "{}/api/heartbeat/{}/".format(self.config["api_url"], self.config["server_id"])

    def request(self, method, url, body, confirmed_by):
        """One HTTP exchange, over within the timeout whatever the peer does; never raises for
        anything the network, a proxy or the server does.

        The answer is streamed and at most MAX_BODY_BYTES of it read; the connection is closed
        afterwards (a beat every 30 s gains nothing from keep-alive, and nothing accumulates).
        """
        prepared = self.prepared(method, url, body)
        guard = ExchangeGuard(self.config["timeout"], self.ping_watchdog,
                              self.notifier.watchdog_every_s)
        proxies = {"http": self.proxy, "https": self.proxy} if self.proxy else {}
        try:
            with guard:
                response = self.session.send(
                    prepared, stream=True, timeout=(guard.remaining_s(), guard.remaining_s()),
                    allow_redirects=False, verify=self.config.get("ca_bundle") or True,
                    proxies=proxies, cert=None)
                try:
                    data = read_capped(response.raw)
                    cut_off = guard.expired
                finally:
                    response.close()
        except NETWORK_ERRORS as error:
            return self.failed_exchange(error, guard.expired)
        finally:
            self.session.close()
        if cut_off:
            return self.failed_exchange(None, True)
        length = response.headers.get("Content-Length", "")
        if data is not None and ASCII_ID.fullmatch(length) and len(data) < int(length):
            # urllib3 2 raises IncompleteRead here; urllib3 1.26 (Debian 11, 12) does not
            return Attempt(retryable=True, kind="broken", error="the answer from {} broke off "
                           "after {} of its {} bytes".format(self.config["api_url"], len(data),
                                                             length))
        return judge_response(response.status_code, response.headers, data, confirmed_by,
                              self.scrub, self.mode == "legacy")

    def prepared(self, method, url, body):
        """The request, prepared once per method, URL and token: the same bytes every beat
        (requests' preparation, header merging and URL parsing, was a third of a beat's CPU)."""
        key = (method, url, self.config.get("api_token"))
        if key not in self.prepared_requests:
            headers = {"User-Agent": f"{AGENT_NAME}/{AGENT_VERSION}",
                       "Accept-Encoding": "identity"}
            if self.mode == "token":
                headers["Authorization"] = "Bearer " + self.config["api_token"]
            if len(self.prepared_requests) >= 2:  # a ping and a heartbeat; a new token
                self.prepared_requests.clear()
            self.prepared_requests[key] = self.session.prepare_request(
                requests.Request(method, url, json=body, headers=headers))
        return self.prepared_requests[key]

    def failed_exchange(self, error, cut_off):
        """The Attempt for an exchange that brought no complete answer."""
        api_url = self.config["api_url"]
        if cut_off or isinstance(error, requests.Timeout):
            return Attempt(retryable=True, kind="timeout", error="no answer within {:g} s from "
                           "{}{}".format(self.config["timeout"], api_url, " (cut off at the "
                                         "deadline: the peer was too slow)" if cut_off else ""))
        text = self.scrub(str(error))
        if "certificate verify failed" in text.lower():
            reason = re.search(r"certificate verify failed:?\s*([^()'\"]*)", text, re.I)
            return Attempt(kind="certificate", error="TLS certificate verify failed for {}: {} "
                           "({})".format(api_url, (reason.group(1).strip() if reason else "")
                                         or "untrusted certificate", CA_BUNDLE_HINT))
        # A proxy that wants other credentials answers the CONNECT with 407, or (tinyproxy,
        # for wrong ones) with 401: retrying would only repeat it.
        refused = re.search(r"\b(401|407)\b", text)
        proxy = redact_url(self.proxy or "?")
        if isinstance(error, requests.exceptions.ProxyError) and refused:
            code = refused.group(1)
            return Attempt(status=int(code), kind="proxy refused", error=f"the proxy {proxy} "
                           f"answered {code} to the tunnel request ({PROXY_AUTH_HINT})")
        if isinstance(error, requests.exceptions.SSLError):
            return Attempt(retryable=True, kind="tls", error=f"TLS error talking to {api_url}: "
                           f"{shorten(text)} (check STACKSENSE_CA_BUNDLE)")
        if isinstance(error, requests.exceptions.ProxyError):
            reason = self.scrub(short_reason(error))
            return Attempt(retryable=True, kind="proxy", error=f"cannot go through the proxy "
                           f"{proxy} to {api_url}: {reason}")
        broken = broken_answer(error)
        if broken:
            return Attempt(retryable=True, kind="broken", error=f"the answer from {api_url} "
                           f"broke off or was not HTTP: {self.scrub(broken)}")
        if isinstance(error, requests.ConnectionError):
            return Attempt(retryable=True, kind="connect", error=f"cannot connect to {api_url}: "
                           f"{self.scrub(short_reason(error))}")
        return Attempt(retryable=True, kind="request", error=f"request to {api_url} failed: "
                       f"{type(error).__name__}: {shorten(text)}")

    def secret_forms(self):
        """Every form of every secret the agent holds, longest first: the token raw,
        percent-encoded and in base64, and the proxy's credentials (proxy_secrets)."""
        token = self.config.get("api_token")
        forms = proxy_secrets(self.proxy)
        if token:
            forms += [token, quote(token, safe=""),
                      base64.b64encode(token.encode("ascii")).decode("ascii")]
        return sorted({form for form in forms if len(form) >= 3}, key=len, reverse=True)

    def scrub(self, text):
        """`text` without the secrets it could carry, in any of their forms (secret_forms).

        Applied to everything from the wire or an exception before it is shortened, and again
        by the log formatter, the state file and --once: a peer may echo the request.
        """
        for secret in self.secrets:
            if secret in text:
                text = text.replace(secret, "<redacted>")
        return text

    def with_retries(self, method, url, body, confirmed_by, give_up_at):
        """Send until success, a definite failure, or the beat's budget or time runs out.

        Retried: connection errors, timeouts, 408, 429 and 5xx. Not retried: other 4xx,
        redirects, and 2xx answers that do not confirm the heartbeat. The budget is
        attempts_allowed() (up to MAX_ATTEMPTS_PER_BEAT requests while calm, one after a
        failed beat), the pauses retry_pause(). A Retry-After also holds back the next beat
        (memory.not_before, read by run()). Returns (Attempt, number of attempts, stopped).
        """
        budget = attempts_allowed(self.memory.failed_beats, self.memory.calm_beats)
        attempts = 0
        while True:
            attempt = self.request(method, url, body, confirmed_by)
            attempts += 1
            now = self.clock()
            self.memory.not_before = retry_not_before(attempt, now)
            pause = retry_pause(attempt, attempts, budget, now, self.config["timeout"],
                                give_up_at, self.rng)
            if pause is None:
                return attempt, attempts, False
            log.debug("attempt %d failed (%s); retrying in %.1f s", attempts, attempt.error,
                      pause)
            if self.wait(pause):
                return attempt, attempts, True

    def wait(self, seconds):
        """Wait on the stop event, pinging the systemd watchdog; True when stopping."""
        deadline = self.clock() + max(0.0, seconds)
        while True:
            self.ping_watchdog()
            remaining = deadline - self.clock()
            if remaining <= 0:
                return self.stop.is_set()
            step = remaining
            if self.notifier.watchdog_every_s:
                step = min(step, self.notifier.watchdog_every_s)
            if self.stop.wait(step):
                return True

    def ping_watchdog(self):
        if self.notifier.watchdog_every_s:
            self.notifier.notify("WATCHDOG=1")

    # -- one beat

    def identify(self, give_up_at):
        """Token mode: ask the server who this token belongs to, once it answers.

        Raises ConfigError when the configured server id is not the token's server, so the
        host cannot heartbeat into another server's row. Ids are compared as numbers; an id
        that is not a number is not compared (logged).
        """
        url = self.config["api_url"] + "/api/agent/ping/"
        attempt = self.with_retries("GET", url, None, "authenticated", give_up_at)[0]
        if not attempt.ok:
            return attempt
        raw_id = attempt.answer.get("server_id")
        expected, actual = self.config["server_id"], wire_id(raw_id)
        name = wire_text(attempt.answer.get("server_name"))
        if actual is None and raw_id is not None:
            log.warning("the server's ping answer has a server_id that is not a number (%s); "
                        "not compared", shorten(printable(repr(raw_id))))
        if expected is not None and actual is not None and expected != actual:
            raise ConfigError(
                f"server_id is {expected} but the API token belongs to server {actual} "
                f"({name!r}); fix STACKSENSE_SERVER_ID or the token")
        self.identified = True
        self.state["server_name"] = name
        if actual is not None:
            self.state["server_id"] = actual
        log.info("API token accepted: this host is server %r (id %s)", name, actual)
        return None

    def beat_once(self, give_up_at=None):
        """Send one heartbeat, retrying within the beat; record and return the result.

        The last line of defence: an unexpected exception inside the beat is logged (with its
        traceback at most every FAILURE_SUMMARY_EVERY_S) and the beat counts as failed. Only
        ConfigError (the token belongs to another server) goes on up.
        """
        if give_up_at is None:
            give_up_at = self.clock() + self.config["interval"]
        try:
            result = self.attempt_beat(give_up_at)
        except ConfigError:
            raise
        except Exception as error:  # a bug must cost one beat, not the agent
            result = BeatResult(False, 1, error=self.internal_error(error), kind="internal")
        self.record(result)
        return result

    def attempt_beat(self, give_up_at):
        failed = None
        if self.mode == "token" and not self.identified:
            failed = self.identify(give_up_at)
        if failed is not None:
            return BeatResult(False, 1, failed.status, failed.error, failed.answer, failed.kind)
        body = {"agent_version": AGENT_VERSION}
        attempt, attempts = self.with_retries("POST", self.heartbeat_url(), body,
                                              "heartbeat_received", give_up_at)[:2]
        return BeatResult(attempt.ok, attempts, attempt.status, attempt.error, attempt.answer,
                          attempt.kind)

    def internal_error(self, error):
        """Log an unexpected error of one beat (rate-limited traceback); return its summary."""
        summary = printable(shorten(
            f"internal error: {type(error).__name__}: {self.scrub(str(error))}"))
        now = self.clock()
        if self.traceback_logged_at is None or \
                now - self.traceback_logged_at >= FAILURE_SUMMARY_EVERY_S:
            self.traceback_logged_at = now
            log.error("unexpected error in a beat, which counts as failed; the agent goes on "
                      "(please report this)", exc_info=True)
        else:
            log.debug("unexpected error in a beat again: %s", summary)
        return summary

    def reload_token(self):
        """SIGHUP: read the token file again; keep the current token if the new one is bad."""
        path = self.config.get("token_file_in_use")
        if not path:
            log.info("SIGHUP received: nothing to reload (%s); ignored",
                     "the token does not come from a file" if self.mode == "token"
                     else "legacy API, no token")
            return
        try:
            token = read_token_file(path, "SIGHUP")
        except ConfigError as error:
            log.warning("SIGHUP: keeping the current API token: %s", printable(str(error)))
            return
        if token == self.config["api_token"]:
            log.info("SIGHUP: token file %s re-read; the token is unchanged", printable(path))
            return
        self.config["api_token"] = token
        self.secrets = self.secret_forms() + self.secrets  # the old token may still be echoed
        self.identified = False
        log.info("SIGHUP: token file %s re-read; the new token is used from the next beat",
                 printable(path))

    def record(self, result):
        now = utc_now_iso()
        self.state["last_attempt_at"] = now
        self.state["last_status"] = result.status
        failed_before = self.memory.failed_beats
        self.memory.failed_beats = 0 if result.ok else failed_before + 1
        self.state["consecutive_failures"] = self.memory.failed_beats
        if result.ok:
            self.state["last_success_at"] = now
            self.state["last_error"] = None
            self.state["server_name"] = result.server_name or self.state["server_name"]
        else:
            self.state["last_error"] = self.scrub(result.error or "")
        self.state_file.write(self.state, self.scrub)
        self.health.report(result, self.state, failed_before if result.ok
                           else self.memory.failed_beats)
        self.notifier.notify("STATUS=" + self.health.status_line(self.state))

    # -- the loop

    def run(self):
        """Beat now, then every interval on this agent's own phase, until stopped.

        The schedule is phase_anchor() and next_beat_slot(), the retries attempts_allowed()
        and retry_pause(): pure functions of (state, clock, random source), which
        bench/fleet_load.py drives for 10,000 simulated agents.
        """
        interval, jitter = self.config["interval"], self.config["jitter"]
        slot, first = self.clock(), True
        while not self.stop.is_set():
            result = self.beat_once(give_up_at=next_slot_after(slot, interval, self.clock()))
            self.memory.calm_beats = calm_after(self.memory.calm_beats, result.ok)
            if first:
                slot, first = phase_anchor(slot, interval, self.rng), False
            slot = next_beat_slot(slot, interval, self.clock(), self.memory.calm_beats, jitter,
                                  self.rng, self.memory.not_before)
            if self.wait(slot - self.clock()):
                break


# ------------------------------------------------------------------------------------------ logging


class Health:
    """Logs changes between healthy and failing, and summarises long failures."""

    def __init__(self, clock):
        self.clock = clock
        self.healthy = None  # unknown until the first beat
        self.failing_since = None
        self.last_kind = None
        self.last_summary_at = None
        self.beats = 0

    def report(self, result, state, failed_beats):
        """Log one beat's result; `failed_beats`: the failed beats in a row, the one that
        just ended included (on success: those before it)."""
        self.beats += 1
        now = self.clock()
        if result.ok:
            self.report_success(result, state, now, failed_beats)
        else:
            self.report_failure(result, now, failed_beats)

    def report_success(self, result, state, now, failed_beats):
        if self.healthy is None:
            log.info("first heartbeat accepted by %s: server %r (id %s), agent %s",
                     state["api_url"], state["server_name"], state["server_id"], AGENT_VERSION)
        elif not self.healthy:
            log.info("heartbeats recovered after %s of failures (%d beats failed)",
                     format_duration(now - self.failing_since), failed_beats)
        else:
            log.debug("heartbeat accepted (%d attempt%s)", result.attempts,
                      "" if result.attempts == 1 else "s")
        self.healthy, self.failing_since = True, None
        self.last_kind = None

    def report_failure(self, result, now, failed_beats):
        if self.healthy is not False:
            self.failing_since = self.last_summary_at = now
            log.warning("heartbeat failed: %s", result.error)
        elif result.kind != self.last_kind:
            log.warning("heartbeat still failing, now: %s", result.error)
            self.last_summary_at = now
        elif now - self.last_summary_at >= FAILURE_SUMMARY_EVERY_S:
            log.warning("heartbeat failing for %s (%d beats): %s",
                        format_duration(now - self.failing_since), failed_beats,
                        result.error)
            self.last_summary_at = now
        else:
            log.debug("heartbeat failed: %s", result.error)
        self.healthy = False
        self.last_kind = result.kind

    def status_line(self, state):
        if self.healthy:
            return "heartbeat ok at {} ({} beats)".format(state["last_success_at"], self.beats)
        return "heartbeat failing ({} in a row): {}".format(
            state["consecutive_failures"], state["last_error"])


class ScrubbingFormatter(logging.Formatter):
    """Every line, traceback included, goes through `scrub` (the agent's, once it exists)."""

    scrub = staticmethod(str)

    def format(self, record):
        return self.scrub(super().format(record))


class JournalFormatter(ScrubbingFormatter):
    """'<N>message' so journald records the priority; journald adds the time itself."""

    def format(self, record):
        return f"<{SYSLOG_PRIORITY.get(record.levelno, 6)}>{super().format(record)}"


def setup_logging(level_name, env):
    """Log to stderr (the journal under systemd); return the formatter, to set its scrub."""
    handler = logging.StreamHandler(sys.stderr)
    if env.get("JOURNAL_STREAM"):
        formatter = JournalFormatter("%(message)s")
    else:
        formatter = ScrubbingFormatter("%(asctime)s %(levelname)s %(message)s",
                                       "%Y-%m-%dT%H:%M:%S%z")
    handler.setFormatter(formatter)
    log.handlers[:] = [handler]
    log.setLevel(getattr(logging, level_name.upper()))
    log.propagate = False
    return formatter


# --------------------------------------------------------------------------------------------- main


class UsageError(Exception):
    pass


class ArgumentParser(argparse.ArgumentParser):
    def error(self, message):
        raise UsageError(message)


def build_parser():
    parser = ArgumentParser(
        prog="heartbeat_agent.py",
        description="Send StackSense heartbeats from this host.",
        epilog="Precedence: command line > environment > config file > defaults. The API "
               "token is read from STACKSENSE_API_TOKEN, the config file, or a token file, "
               "never from the command line. Exit codes: 0 ok, 1 --once failed, 64 usage, "
               "78 invalid configuration.")
    parser.add_argument("--config", help="JSON config file (default ~/.stacksense_heartbeat"
                        ".conf, or $STACKSENSE_CONFIG)")
    for setting in SETTINGS:
        if setting.flag:
            parser.add_argument(setting.flag, dest=setting.name,
                                help=f"{setting.help} [{setting.env}]")
    parser.add_argument("-v", "--verbose", action="store_const", const="debug",
                        dest="log_level", help="log every beat (same as --log-level debug)")
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--once", action="store_true",
                      help="send one heartbeat, print the answer, exit 0 on success, 1 if not")
    mode.add_argument("--check-config", action="store_true",
                      help="print the effective configuration and exit (0 valid, 78 invalid)")
    mode.add_argument("--version", action="store_true", help="print the version and exit")
    return parser


def fail(message, status):
    """Say why on stderr, if there is one (it may be closed), and return the exit status."""
    with contextlib.suppress(AttributeError, OSError, ValueError):
        sys.stderr.write(f"{AGENT_NAME}: {printable(message)}\n")
        sys.stderr.flush()
    return status


def say(line):
    """Print to stdout, if there is one (it may be closed)."""
    with contextlib.suppress(AttributeError, OSError, ValueError):
        print(line, flush=True)


def run_once(agent):
    result = agent.beat_once()
    if result.ok:
        try:
            answer = shorten(agent.scrub(printable(json.dumps(result.answer, sort_keys=True))),
                             2000)
        except (TypeError, ValueError, RecursionError):
            answer = "(an answer too deep to show)"
        say(f"heartbeat accepted after {result.attempts} attempt(s): {answer}")
        return EX_OK
    say(f"heartbeat failed after {result.attempts} attempt(s): {agent.scrub(result.error)}")
    return EX_FAILED


def run_daemon(agent, notifier):
    """Run the loop in a worker thread so a stalled request never delays a stop."""
    outcome = {}

    def work():
        try:
            agent.run()
        except ConfigError as error:
            outcome["config_error"] = error
        except Exception:  # a bug: say so, and let systemd's Restart=on-failure restart us
            log.exception("the heartbeat loop stopped on an unexpected error")
            outcome["crashed"] = True
        agent.stop.set()

    hangup = HANGUP  # set by a SIGHUP since the first instruction
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda *_: agent.stop.set())
    signal.signal(signal.SIGHUP, lambda *_: hangup.set())
    notifier.notify("READY=1\nSTATUS=sending the first heartbeat")
    worker = threading.Thread(target=work, name="heartbeat")
    worker.daemon = True
    worker.start()
    while worker.is_alive() and not agent.stop.wait(0.5):
        if hangup.is_set():
            hangup.clear()
            agent.reload_token()
    notifier.notify("STOPPING=1")
    worker.join(0.5)
    if "config_error" in outcome:
        return fail("config error: {}".format(outcome["config_error"]), EX_CONFIG)
    if "crashed" in outcome:
        return EX_SOFTWARE
    log.info("stopping")
    return EX_OK


def log_proxy(agent):
    if agent.proxy:
        log.info("using the proxy %s for %s (from HTTPS_PROXY / HTTP_PROXY / ALL_PROXY; "
                 "NO_PROXY does not exempt it)", printable(redact_url(agent.proxy)),
                 agent.config["api_url"])


def main(argv=None, env=None):
    env = os.environ if env is None else env
    try:
        args = build_parser().parse_args(argv)
    except UsageError as error:
        return fail(f"{error} (see --help)", EX_USAGE)
    if args.version:
        say(f"{AGENT_NAME} {AGENT_VERSION}")
        return EX_OK
    try:
        config, sources = load_config(args, env)
    except ConfigError as error:
        return fail(f"config error: {error}", EX_CONFIG)
    if args.check_config:
        say("\n".join(describe_config(config, sources)))
        say("configuration is valid")
        return EX_OK
    formatter = setup_logging(config["log_level"], env)
    notifier = Notifier(env)
    agent = Agent(config, notifier=notifier)
    formatter.scrub = agent.scrub
    if args.once:
        log_proxy(agent)
        try:
            return run_once(agent)
        except ConfigError as error:
            return fail(f"config error: {error}", EX_CONFIG)
    log.info("%s %s starting (pid %d, %s API): %s", AGENT_NAME, AGENT_VERSION, os.getpid(),
             agent.mode, "; ".join(describe_config(config, sources)))
    log_proxy(agent)
    return run_daemon(agent, notifier)


if __name__ == "__main__":
    sys.exit(main())
