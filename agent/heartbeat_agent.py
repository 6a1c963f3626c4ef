#!/usr/bin/env python3
"""StackSense heartbeat agent: tells the StackSense server that this host is up.

It POSTs a small JSON heartbeat to the server every INTERVAL seconds (30 by default)
and keeps doing so, whatever the network or the server does, until it is stopped.

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
$NOTIFY_SOCKET and keeps its state file in $STATE_DIRECTORY.

Exit codes:
    0   stopped by SIGTERM/SIGINT; --once succeeded; --check-config found the config valid
    1   --once: the heartbeat failed
    64  the command line could not be parsed (EX_USAGE)
    70  internal error: the loop crashed (EX_SOFTWARE); systemd restarts it
    78  a setting is invalid, or the server belongs to another id (EX_CONFIG); do not restart

Needs Python 3.6+ and requests 2.25+; nothing else.
"""

import argparse
import email.utils
import json
import logging
import math
import os
import random
import signal
import socket
import sys
import tempfile
import threading
import time
from datetime import datetime, timezone
from urllib.parse import urlsplit

import requests

AGENT_VERSION = "1.1.0"
AGENT_NAME = "stacksense-agent"

DEFAULT_CONFIG_PATH = "~/.stacksense_heartbeat.conf"
DEFAULT_INTERVAL_S = 30.0
MIN_INTERVAL_S = 1.0
MAX_INTERVAL_S = 86400.0
DEFAULT_TIMEOUT_S = 10.0
DEFAULT_JITTER_FRACTION = 0.1
MAX_JITTER_FRACTION = 0.5
STATE_FILE_NAME = "state.json"
TOKEN_CREDENTIAL_NAME = "api_token"

# Within one beat: exponential backoff with full jitter, base doubling up to the cap,
# at most MAX_ATTEMPTS_PER_BEAT requests, and never past the next beat's due time.
BACKOFF_BASE_S = 1.0
BACKOFF_CAP_S = 15.0
MAX_ATTEMPTS_PER_BEAT = 4
RETRYABLE_STATUS = (408, 429, 500, 502, 503, 504)

# While failing, one summary line at most this often (the first failure and every change
# between healthy and failing are always logged).
FAILURE_SUMMARY_EVERY_S = 600.0

SYSLOG_PRIORITY = {logging.DEBUG: 7, logging.INFO: 6, logging.WARNING: 4, logging.ERROR: 3}

EX_OK = 0
EX_FAILED = 1
EX_USAGE = 64
EX_SOFTWARE = 70
EX_CONFIG = 78

STATUS_HINTS = {
    301: "the server redirected; check STACKSENSE_API_URL (scheme, host and path prefix)",
    401: "the server rejected the API token; check STACKSENSE_API_TOKEN / the token file",
    403: "this server refuses legacy heartbeats; configure an API token (STACKSENSE_API_TOKEN)",
    404: "the server does not know this server id; check STACKSENSE_SERVER_ID",
    405: "the server does not accept heartbeats at this address; check STACKSENSE_API_URL",
}

log = logging.getLogger(AGENT_NAME)


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


# --------------------------------------------------------------------------- parsing


def parse_server_id(value):
    if isinstance(value, bool) or not str(value).strip().isdigit() or int(value) < 1:
        raise ValueError("expected a positive integer, e.g. 42")
    return int(value)


def parse_api_url(value):
    parts = urlsplit(str(value).strip())
    if parts.scheme not in ("http", "https"):
        raise ValueError("expected an http:// or https:// URL, e.g. https://stacksense.example.com")
    if not parts.hostname:
        raise ValueError("expected a URL with a host name, e.g. https://stacksense.example.com")
    if parts.query or parts.fragment:
        raise ValueError("expected a URL without ?query or #fragment")
    try:
        parts.port  # noqa: B018 - a bad port raises ValueError only when read
    except ValueError:
        raise ValueError("expected a valid port number after the host name") from None
    return str(value).strip().rstrip("/")


def parse_seconds(low, high):
    def parse(value):
        try:
            seconds = float(value)
        except (TypeError, ValueError):
            seconds = None
        if seconds is None or isinstance(value, bool) or math.isnan(seconds):
            raise ValueError("expected a number of seconds")
        if not (low <= seconds <= high):
            raise ValueError(f"expected seconds between {low:g} and {high:g}")
        return seconds

    return parse


def parse_fraction(value):
    try:
        fraction = float(value)
    except (TypeError, ValueError):
        fraction = None
    if fraction is None or isinstance(value, bool) or not (0 <= fraction <= MAX_JITTER_FRACTION):
        raise ValueError(f"expected a fraction between 0 and {MAX_JITTER_FRACTION:g}")
    return fraction


def parse_token(value):
    token = str(value).strip()
    if not token or any(c.isspace() for c in token):
        raise ValueError("expected a non-empty token without spaces")
    return token


def parse_readable_file(value):
    path = os.path.expanduser(str(value))
    if not os.path.isfile(path) or not os.access(path, os.R_OK):
        raise ValueError("expected a readable file")
    return path


def parse_state_file(value):
    path = os.path.expanduser(str(value))
    if not path or path.endswith("/"):
        raise ValueError("expected a file path, e.g. /var/lib/stacksense-agent/state.json")
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
            help="spread each beat by +- this fraction of the interval (default 0.1)"),
)
SETTINGS_BY_NAME = {s.name: s for s in SETTINGS}


# --------------------------------------------------------------------------- config loading


def read_config_file(path, required):
    """Return the JSON object in `path` ({} when it is absent and not `required`)."""
    try:
        with open(path) as config_file:
            text = config_file.read()
    except FileNotFoundError:
        if required:
            raise ConfigError(f"config file {path} does not exist; create it or fix --config / "
                              "STACKSENSE_CONFIG") from None
        return {}
    except OSError as error:
        raise ConfigError(f"config file {path} cannot be read ({error.strerror or error}); "
                          "fix its permissions") from None
    try:
        values = json.loads(text)
    except ValueError as error:
        raise ConfigError(f"config file {path} is not valid JSON ({error}); expected an object "
                          'such as {"server_id": 42, "api_url": "https://..."}') from None
    if not isinstance(values, dict):
        raise ConfigError(f"config file {path} must hold a JSON object, e.g. "
                          '{"server_id": 42, "api_url": "https://..."}')
    unknown = sorted(set(values) - set(SETTINGS_BY_NAME))
    if unknown:
        raise ConfigError("config file {} has unknown key {!r}; known keys: {}".format(
            path, unknown[0], ", ".join(s.name for s in SETTINGS)))
    return values


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
    config = {"config_file": file_path if (file_values or explicit_path) else None}
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
            shown = "(hidden)" if setting.secret else repr(raw)
            raise ConfigError(f"{setting.name} ({source}) is {shown}: {error}") from None
    apply_derived_defaults(config, sources, env)
    check_consistency(config, sources)
    return config, sources


def expand_home(path, env):
    """Expand a leading ~ with the HOME of `env`, falling back to the password database."""
    if path.startswith("~/") and env.get("HOME"):
        return os.path.join(env["HOME"], path[2:])
    return os.path.expanduser(path)


def apply_derived_defaults(config, sources, env):
    """Fill in the defaults that depend on other values or on systemd's environment."""
    if config["timeout"] >= config["interval"] and sources["timeout"] == "default":
        config["timeout"] = config["interval"] / 2.0
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
        sources["api_token"] = sources["api_token_file"]


def read_token_file(path, source):
    try:
        with open(path) as token_file:
            return parse_token(token_file.read())
    except OSError as error:
        raise ConfigError(f"api_token_file ({source}) is {path!r}: cannot be read "
                          f"({error.strerror or error}); fix its permissions") from None
    except ValueError:
        raise ConfigError(f"api_token_file ({source}) is {path!r}: the file is empty or holds "
                          "spaces; expected the token alone") from None


def check_consistency(config, sources):
    if config["api_url"] is None:
        raise ConfigError("api_url is not set: set STACKSENSE_API_URL (or 'api_url' in the "
                          "config file), e.g. https://stacksense.example.com")
    if config["server_id"] is None and config["api_token"] is None:
        raise ConfigError("server_id is not set: set STACKSENSE_SERVER_ID to the id shown in "
                          "the StackSense dashboard, or configure an API token")
    if config["timeout"] >= config["interval"]:
        raise ConfigError("timeout ({}) is {:g}: expected fewer seconds than the interval "
                          "({:g} s)".format(sources["timeout"], config["timeout"],
                                            config["interval"]))


def describe_config(config, sources):
    """One line per setting: value and source, the token redacted."""
    lines = []
    for setting in SETTINGS:
        value = config[setting.name]
        if setting.secret and value is not None:
            value = "<redacted>"
        lines.append(f"{setting.name} = {value} ({sources[setting.name]})")
    return lines


# --------------------------------------------------------------------------- systemd, state


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
    """The agent's state as JSON, replaced atomically after every attempt."""

    def __init__(self, path):
        self.path = path
        self.failed = False

    def write(self, state):
        if not self.path:
            return
        directory = os.path.dirname(os.path.abspath(self.path))
        try:
            fd, temp_path = tempfile.mkstemp(prefix=".state-", dir=directory)
            try:
                with os.fdopen(fd, "w") as temp_file:
                    json.dump(state, temp_file, indent=2, sort_keys=True)
                    temp_file.write("\n")
                os.chmod(temp_path, 0o644)
                os.replace(temp_path, self.path)
            except BaseException:
                os.unlink(temp_path)
                raise
        except OSError as error:
            if not self.failed:
                log.warning("cannot write state file %s (%s); heartbeats continue",
                            self.path, error)
            self.failed = True
            return
        if self.failed:
            log.info("state file %s is writable again", self.path)
        self.failed = False


# --------------------------------------------------------------------------- one heartbeat


class BeatResult:
    """What one heartbeat (with its retries) came to."""

    def __init__(self, ok, attempts, status=None, error=None, answer=None):
        self.ok = ok
        self.attempts = attempts
        self.status = status  # the last HTTP status, None when no answer came
        self.error = error  # why it failed, with a hint where one helps
        self.answer = answer  # the server's JSON answer, when it sent one

    @property
    def server_name(self):
        return (self.answer or {}).get("server_name") if isinstance(self.answer, dict) else None


class Attempt:
    """One HTTP exchange: ok, retryable, or a definite failure."""

    def __init__(self, ok=False, retryable=False, status=None, error=None, answer=None,
                 retry_after_s=None):
        self.ok = ok
        self.retryable = retryable
        self.status = status
        self.error = error
        self.answer = answer
        self.retry_after_s = retry_after_s


def parse_retry_after(value, now_wall):
    """Seconds to wait from a Retry-After header (delta-seconds or HTTP date), or None."""
    if not value:
        return None
    value = value.strip()
    if value.isdigit():
        return float(value)
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError, IndexError):
        return None
    if when is None:
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=timezone.utc)
    return max(0.0, when.timestamp() - now_wall)


def describe_answer(response):
    body = response.text.strip().replace("\n", " ")
    return body[:200] + ("..." if len(body) > 200 else "")


def judge_response(response, confirmed_by):
    """Turn an HTTP response into an Attempt; the retry policy's table lives here.

    A 2xx counts only when its JSON sets `confirmed_by` to true ("heartbeat_received" for a
    heartbeat, "authenticated" for the token ping): a proxy's or portal's 200 page is a failure.
    """
    status = response.status_code
    try:
        answer = response.json()
    except ValueError:
        answer = None
    if status in RETRYABLE_STATUS or status >= 500:
        retry_after = parse_retry_after(response.headers.get("Retry-After"), time.time())
        return Attempt(retryable=True, status=status, answer=answer, retry_after_s=retry_after,
                       error=f"HTTP {status}: {describe_answer(response)}")
    if 200 <= status < 300:
        if isinstance(answer, dict) and answer.get(confirmed_by) is True:
            return Attempt(ok=True, status=status, answer=answer)
        return Attempt(status=status, answer=answer, error=(
            f"HTTP {status} without {confirmed_by}=true: {describe_answer(response)} "
            "(check that STACKSENSE_API_URL points at the StackSense server)"))
    hint = STATUS_HINTS.get(status, "the server refused the heartbeat")
    return Attempt(status=status, answer=answer,
                   error=f"HTTP {status}: {describe_answer(response)} ({hint})")


class Agent:
    """Sends heartbeats. Time, waiting, randomness and HTTP are injected for the tests."""

    def __init__(self, config, session=None, clock=time.monotonic, stop=None, rng=None,
                 notifier=None, state_file=None):
        self.config = config
        self.session = session or requests.Session()
        self.clock = clock
        self.stop = stop or threading.Event()
        self.rng = rng or random.Random()
        self.notifier = notifier or Notifier({})
        self.state_file = state_file or StateFile(config.get("state_file"))
        self.mode = "token" if config.get("api_token") else "legacy"
        self.identified = False
        self.health = Health(clock)
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
        """One HTTP exchange, never raising for network trouble."""
        headers = {"User-Agent": f"{AGENT_NAME}/{AGENT_VERSION}"}
        if self.mode == "token":
            headers["Authorization"] = "Bearer " + self.config["api_token"]
        try:
            response = self.session.request(
                method, url, json=body, headers=headers, timeout=self.config["timeout"],
                allow_redirects=False, verify=self.config.get("ca_bundle") or True)
        except requests.Timeout:
            return Attempt(retryable=True, error="no answer within {:g} s from {}".format(
                self.config["timeout"], self.config["api_url"]))
        except requests.exceptions.SSLError as error:
            return Attempt(retryable=True, error="TLS error talking to {}: {} (check "
                           "STACKSENSE_CA_BUNDLE)".format(self.config["api_url"], error))
        except requests.ConnectionError as error:
            return Attempt(retryable=True, error="cannot connect to {}: {}".format(
                self.config["api_url"], short_reason(error)))
        except requests.RequestException as error:
            return Attempt(retryable=True, error="request to {} failed: {}".format(
                self.config["api_url"], error))
        return judge_response(response, confirmed_by)

    def with_retries(self, method, url, body, confirmed_by, give_up_at):
        """Send until success, a definite failure, or the time or attempts run out.

        Retried: connection errors, timeouts, 408, 429 and 5xx. Not retried: other 4xx,
        redirects, and 2xx answers that do not confirm the heartbeat. Between attempts the
        wait is exponential backoff with full jitter (uniform in 0..min(cap, base * 2**n)),
        or the server's Retry-After when it sends one. No attempt starts unless its whole
        timeout fits before `give_up_at` (on the monotonic clock), so a beat never runs
        into the next one; at most MAX_ATTEMPTS_PER_BEAT requests are sent.
        Returns (Attempt, number of attempts, stopped).
        """
        attempts = 0
        while True:
            attempt = self.request(method, url, body, confirmed_by)
            attempts += 1
            if attempt.ok or not attempt.retryable or attempts >= MAX_ATTEMPTS_PER_BEAT:
                return attempt, attempts, False
            backoff = min(BACKOFF_CAP_S, BACKOFF_BASE_S * 2 ** (attempts - 1))
            pause = self.rng.uniform(0, backoff)
            if attempt.retry_after_s is not None:
                pause = attempt.retry_after_s
            if self.clock() + pause + self.config["timeout"] > give_up_at:
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
        host cannot heartbeat into another server's row.
        """
        url = self.config["api_url"] + "/api/agent/ping/"
        attempt, _, _ = self.with_retries("GET", url, None, "authenticated", give_up_at)
        if not attempt.ok:
            return attempt
        expected, actual = self.config["server_id"], attempt.answer.get("server_id")
        if expected is not None and actual is not None and expected != actual:
            raise ConfigError(
                "server_id is {} but the API token belongs to server {} ({!r}); fix "
                "STACKSENSE_SERVER_ID or the token".format(
                    expected, actual, attempt.answer.get("server_name")))
        self.identified = True
        self.state["server_name"] = attempt.answer.get("server_name")
        if actual is not None:
            self.state["server_id"] = actual
        log.info("API token accepted: this host is server %r (id %s)",
                 self.state["server_name"], actual)
        return None

    def beat_once(self, give_up_at=None):
        """Send one heartbeat, retrying within the beat; record and return the result."""
        if give_up_at is None:
            give_up_at = self.clock() + self.config["interval"]
        failed = None
        if self.mode == "token" and not self.identified:
            failed = self.identify(give_up_at)
        attempts = 0
        if failed is None:
            body = {"agent_version": AGENT_VERSION}
            attempt, attempts, _ = self.with_retries("POST", self.heartbeat_url(), body,
                                                     "heartbeat_received", give_up_at)
        else:
            attempt, attempts = failed, 1
        result = BeatResult(attempt.ok, attempts, attempt.status, attempt.error, attempt.answer)
        self.record(result)
        return result

    def record(self, result):
        now = utc_now_iso()
        self.state["last_attempt_at"] = now
        self.state["last_status"] = result.status
        if result.ok:
            self.state["last_success_at"] = now
            self.state["last_error"] = None
            self.state["consecutive_failures"] = 0
            self.state["server_name"] = result.server_name or self.state["server_name"]
        else:
            self.state["last_error"] = result.error
            self.state["consecutive_failures"] += 1
        self.state_file.write(self.state)
        self.health.report(result, self.state)
        self.notifier.notify("STATUS=" + self.health.status_line(self.state))

    # -- the loop

    def run(self):
        """Beat now, then every interval at a fixed rate, jittered, until stopped."""
        slot = self.clock()
        while not self.stop.is_set():
            next_slot = next_slot_after(slot, self.config["interval"], self.clock())
            self.beat_once(give_up_at=next_slot)
            slot = next_slot_after(slot, self.config["interval"], self.clock())
            beat_at = slot + jitter_offset(self.rng, self.config["interval"],
                                           self.config["jitter"])
            if self.wait(beat_at - self.clock()):
                break


def short_reason(error):
    """The innermost reason of a requests ConnectionError, without urllib3's wrapping."""
    reason = error
    while reason.args and isinstance(reason.args[0], BaseException):
        reason = reason.args[0]
    text = str(getattr(reason, "reason", None) or reason)
    # urllib3 prefixes the connection object's repr: keep only the operating system's words
    return text.split(": ", 1)[-1] if text.startswith(("<", "HTTP")) else text


def next_slot_after(slot, interval, now):
    """The first slot of the fixed-rate schedule strictly after `now`.

    Slots are slot + k * interval; missed slots are skipped, never caught up in a burst.
    """
    missed = max(0, math.floor((now - slot) / interval))
    return slot + (missed + 1) * interval


def jitter_offset(rng, interval, jitter_fraction):
    return rng.uniform(-jitter_fraction, jitter_fraction) * interval


# --------------------------------------------------------------------------- logging


class Health:
    """Logs changes between healthy and failing, and summarises long failures."""

    def __init__(self, clock):
        self.clock = clock
        self.healthy = None  # unknown until the first beat
        self.failing_since = None
        self.failed_beats = 0
        self.last_error = None
        self.last_summary_at = None
        self.beats = 0

    def report(self, result, state):
        self.beats += 1
        now = self.clock()
        if result.ok:
            self.report_success(result, state, now)
        else:
            self.report_failure(result, now)

    def report_success(self, result, state, now):
        if self.healthy is None:
            log.info("first heartbeat accepted by %s: server %r (id %s), agent %s",
                     state["api_url"], state["server_name"], state["server_id"], AGENT_VERSION)
        elif not self.healthy:
            log.info("heartbeats recovered after %s of failures (%d beats failed)",
                     format_duration(now - self.failing_since), self.failed_beats)
        else:
            log.debug("heartbeat accepted (%d attempt%s)", result.attempts,
                      "" if result.attempts == 1 else "s")
        self.healthy, self.failing_since, self.failed_beats = True, None, 0
        self.last_error = None

    def report_failure(self, result, now):
        self.failed_beats += 1
        if self.healthy is not False:
            self.failing_since = self.last_summary_at = now
            log.warning("heartbeat failed: %s", result.error)
        elif result.error != self.last_error:
            log.warning("heartbeat still failing, now: %s", result.error)
            self.last_summary_at = now
        elif now - self.last_summary_at >= FAILURE_SUMMARY_EVERY_S:
            log.warning("heartbeat failing for %s (%d beats): %s",
                        format_duration(now - self.failing_since), self.failed_beats,
                        result.error)
            self.last_summary_at = now
        else:
            log.debug("heartbeat failed: %s", result.error)
        self.healthy = False
        self.last_error = result.error

    def status_line(self, state):
        if self.healthy:
            return "heartbeat ok at {} ({} beats)".format(state["last_success_at"], self.beats)
        return "heartbeat failing ({} in a row): {}".format(
            state["consecutive_failures"], state["last_error"])


def format_duration(seconds):
    seconds = round(seconds)
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"


class JournalFormatter(logging.Formatter):
    """'<N>message' so journald records the priority; journald adds the time itself."""

    def format(self, record):
        return f"<{SYSLOG_PRIORITY.get(record.levelno, 6)}>{super().format(record)}"


def setup_logging(level_name, env):
    handler = logging.StreamHandler(sys.stderr)
    if env.get("JOURNAL_STREAM"):
        handler.setFormatter(JournalFormatter("%(message)s"))
    else:
        formatter = logging.Formatter("%(asctime)s %(levelname)s %(message)s",
                                      "%Y-%m-%dT%H:%M:%S%z")
        handler.setFormatter(formatter)
    log.handlers[:] = [handler]
    log.setLevel(getattr(logging, level_name.upper()))
    log.propagate = False


# --------------------------------------------------------------------------- main


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
    sys.stderr.write(f"{AGENT_NAME}: {message}\n")
    return status


def run_once(agent):
    result = agent.beat_once()
    if result.ok:
        answer = json.dumps(result.answer, sort_keys=True)
        print(f"heartbeat accepted after {result.attempts} attempt(s): {answer}")
        return EX_OK
    print(f"heartbeat failed after {result.attempts} attempt(s): {result.error}")
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

    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda *_: agent.stop.set())
    notifier.notify("READY=1\nSTATUS=sending the first heartbeat")
    worker = threading.Thread(target=work, name="heartbeat")
    worker.daemon = True
    worker.start()
    while worker.is_alive() and not agent.stop.wait(0.5):
        pass
    notifier.notify("STOPPING=1")
    worker.join(0.5)
    if "config_error" in outcome:
        return fail("config error: {}".format(outcome["config_error"]), EX_CONFIG)
    if "crashed" in outcome:
        return EX_SOFTWARE
    log.info("stopping")
    return EX_OK


def main(argv=None, env=None):
    env = os.environ if env is None else env
    try:
        args = build_parser().parse_args(argv)
    except UsageError as error:
        return fail(f"{error} (see --help)", EX_USAGE)
    if args.version:
        print(f"{AGENT_NAME} {AGENT_VERSION}")
        return EX_OK
    try:
        config, sources = load_config(args, env)
    except ConfigError as error:
        return fail(f"config error: {error}", EX_CONFIG)
    if args.check_config:
        print("\n".join(describe_config(config, sources)))
        print("configuration is valid")
        return EX_OK
    setup_logging(config["log_level"], env)
    notifier = Notifier(env)
    agent = Agent(config, notifier=notifier)
    if args.once:
        try:
            return run_once(agent)
        except ConfigError as error:
            return fail(f"config error: {error}", EX_CONFIG)
    log.info("%s %s starting (pid %d, %s API): %s", AGENT_NAME, AGENT_VERSION, os.getpid(),
             agent.mode, "; ".join(describe_config(config, sources)))
    return run_daemon(agent, notifier)


if __name__ == "__main__":
    sys.exit(main())
