"""Hostile servers, proxies and certificates: the agent keeps beating, bounded, and says why.

Each case: a peer on loopback misbehaves, beat_once() returns a failed result (never raises),
the exchange ends within its deadline, memory stays bounded, and the next beat against a
healthy answer succeeds. Fake clock for the schedule; real (short) deadlines where the
deadline itself is under test.
"""

import base64
import logging
import os
import signal
import stat
import subprocess
import sys
import threading
import time
import tracemalloc
import urllib.parse

import pytest
from conftest import AGENT_PATH, Reply, ok_reply, run_agent_process
from hostile import (
    GOOD_ANSWER,
    ConnectProxy,
    DeadAddress,
    HostileServer,
    NotifyRecorder,
    answer,
    big_body,
    echo,
    endless_body,
    endless_headers,
    header_flood,
    interim_then,
    make_ca,
    reset,
    response,
    send_raw,
    silence,
    trickle,
)

TIMEOUT_S = 0.3
SLACK_S = 0.5  # scheduling on a busy 2-core machine


@pytest.fixture
def hostile():
    server = HostileServer()
    yield server
    server.close()


@pytest.fixture(autouse=True)
def no_proxy_from_the_test_environment(monkeypatch):
    for name in ("HTTPS_PROXY", "HTTP_PROXY", "ALL_PROXY", "https_proxy", "http_proxy",
                 "all_proxy", "NO_PROXY", "no_proxy"):
        monkeypatch.delenv(name, raising=False)


@pytest.fixture(scope="module")
def tls(tmp_path_factory):
    """(CA bundle path, server SSL context) of a throwaway CA."""
    return make_ca(tmp_path_factory.mktemp("ca"))


def timed_beat(agent):
    started = time.monotonic()
    result = agent.beat_once()
    return result, time.monotonic() - started


def traced_beat(agent):
    """timed_beat, plus the peak of Python's allocations during the beat, in bytes."""
    tracemalloc.start()
    try:
        result, elapsed = timed_beat(agent)
        return result, elapsed, tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def assert_bounded_failure_then_recovery(agent, hostile, result, elapsed):
    assert not result.ok
    assert elapsed <= result.attempts * (TIMEOUT_S + SLACK_S)
    hostile.script.clear()
    assert agent.beat_once().ok  # the same agent, a healthy answer: beating again


SLOW_PEERS = {
    "slow bytes in the status line and headers": trickle(endless_headers()),
    "slow bytes in the body": trickle(b"HTTP/1.1 200 OK\r\nContent-Length: 500\r\n\r\n"
                                      + b" " * 500, every_s=0.02),
    "a complete head, then a body that never comes": send_raw(
        b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\n{", then_wait_s=30),
    "accepts and never answers": silence,
}


@pytest.mark.parametrize("behaviour", SLOW_PEERS.values(), ids=list(SLOW_PEERS))
def test_a_slow_peer_costs_at_most_the_timeout_per_attempt(
        hostile, make_agent, behaviour):
    hostile.then(*[behaviour] * 4)
    agent = make_agent(hostile.url, timeout=TIMEOUT_S)
    result, elapsed = timed_beat(agent)
    assert "no answer within 0.3 s" in result.error
    assert result.attempts == 4  # retryable: the next attempt may find a healthy server
    assert_bounded_failure_then_recovery(agent, hostile, result, elapsed)


@pytest.mark.parametrize("behaviour", [endless_body(), big_body(50)],
                         ids=["endless body", "50 MB body"])
def test_a_huge_body_is_cut_at_64_kib_and_memory_stays_bounded(hostile, make_agent, behaviour):
    hostile.then(behaviour)
    agent = make_agent(hostile.url, timeout=5.0)
    result, elapsed, peak = traced_beat(agent)
    assert not result.ok and result.attempts == 1
    assert "answer over 64 KiB" in result.error
    assert peak < 1 << 20, f"peak Python allocations {peak} bytes"
    assert elapsed < 2.0
    assert agent.beat_once().ok


MALFORMED_ANSWERS = {
    "not JSON": answer(200, b"{not json"),
    "invalid UTF-8": answer(200, b'{"heartbeat_received": true, "x": "\xff\xfe"}'),
    "deeply nested JSON": answer(200, b"[" * 100000 + b"]" * 100000),
    "deeply nested inside an object": answer(
        200, b'{"heartbeat_received": true, "x": ' + b"[" * 100000 + b"]" * 100000 + b"}"),
    "a JSON list": answer(200, [GOOD_ANSWER]),
    "a JSON string": answer(200, '"heartbeat_received"'),
    "a JSON number": answer(200, b"1e999"),
    "a huge integer": answer(200, b"9" * 20000),
    "heartbeat_received as a string": answer(200, {"heartbeat_received": "true"}),
    "heartbeat_received as 1": answer(200, {"heartbeat_received": 1}),
    "an empty 200": answer(200, b""),
    "gzip although identity was asked for": answer(
        200, b"\x1f\x8b\x08\x00" + b"\x00" * 20, headers=[("Content-Encoding", "gzip")]),
    "a status line of garbage": send_raw(b"SSH-2.0-OpenSSH_9.2\r\n"),
    "a status code of letters": send_raw(b"HTTP/1.1 abc OK\r\n\r\n"),
    "a status code of 999": answer(999, {"error": "?"}),
    "HTTP/0.9: a body without a head": send_raw(b'{"heartbeat_received": true}'),
    "a header line of 100 KiB": send_raw(b"HTTP/1.1 200 OK\r\nX: " + b"a" * 102400 + b"\r\n"),
    "200 headers": send_raw(b"HTTP/1.1 200 OK\r\n" + b"X-A: b\r\n" * 200 + b"\r\n"),
    "two different Content-Lengths": send_raw(
        b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nContent-Length: 9\r\n\r\n{}"),
    "a body shorter than its Content-Length": send_raw(
        b'HTTP/1.1 200 OK\r\nContent-Length: 900\r\n\r\n{"heartbeat_received": true}'),
    "broken chunked encoding": send_raw(
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\nabc\r\n"),
    "a connection reset": reset,
    "a close before any byte": send_raw(b""),
    "5,000 1xx answers": send_raw(b"HTTP/1.1 100 Continue\r\n\r\n" * 5000),
}


@pytest.mark.parametrize("behaviour", MALFORMED_ANSWERS.values(), ids=list(MALFORMED_ANSWERS))
def test_a_malformed_answer_fails_the_beat_and_the_next_one_succeeds(
        hostile, make_agent, behaviour):
    hostile.then(*[behaviour] * 4)
    agent = make_agent(hostile.url, timeout=TIMEOUT_S)
    result, elapsed = timed_beat(agent)
    assert result.error
    assert_bounded_failure_then_recovery(agent, hostile, result, elapsed)


@pytest.mark.parametrize("value", [
    "99999999999999999999999", "1e308", "-5", "1.5", "soon", "", "7, 9",
    "Fri, 31 Dec 9999 23:59:59 GMT", "Mon, 01 Jan 1900 00:00:00 GMT", "Tue, 99 Foo 2026 99:99",
    "\u0663", "5\u00a0", "\x7f", "0x10",
])
def test_any_retry_after_value_gives_a_bounded_wait(hostile, make_agent, clock, value):
    header = value.encode("utf-8").decode("latin-1")
    hostile.then(answer(503, {"error": "busy"}, headers=[("Retry-After", header)]))
    agent = make_agent(hostile.url, timeout=TIMEOUT_S)
    result = agent.beat_once()
    assert result.attempts in (1, 2)
    assert result.ok == (result.attempts == 2)  # retried only when the wait fits the beat
    assert all(0 <= wait <= 30 for wait in clock.waits)


def test_a_fractional_retry_after_is_honoured(hostile, make_agent, clock):
    hostile.then(answer(429, {"error": "slow down"}, headers=[("Retry-After", "1.5")]))
    assert make_agent(hostile.url).beat_once().ok
    assert clock.waits == [1.5]


CONTROL_TEXT = "\x1b[2J\x1b[31mFAKE\r\nok: \x00\x07 \u202e\u0085 done"


def test_control_characters_from_the_server_are_escaped_in_logs_and_state(
        hostile, make_agent, caplog, tmp_path):
    hostile.then(answer(404, CONTROL_TEXT.encode("utf-8"), reason="Not Found\x1b[0m"))
    agent = make_agent(hostile.url)
    with caplog.at_level(logging.DEBUG, logger="stacksense-heartbeat"):
        result = agent.beat_once()
    state = (tmp_path / "state.json").read_text()
    logged = "".join(record.getMessage() for record in caplog.records)
    for text in (result.error, logged, state):
        assert not any(char in text for char in "\x1b\x00\x07\r\u202e\u0085")
    assert "\\x1b[31mFAKE" in result.error


@pytest.mark.parametrize(("server_id", "accepted"), [
    ("7", True), (7, True), (" 7 ", True), ("abc", True), ([7], True), (None, True),
    ({"id": 7}, True), (True, True), (7.5, True), (8, False), ("8", False),
])
def test_the_token_ping_compares_ids_as_numbers_whatever_their_type(
        hostile, make_agent, agent_module, server_id, accepted):
    hostile.then(answer(200, {"authenticated": True, "server_id": server_id,
                              "server_name": ["not", "a", "name"]}))
    agent = make_agent(hostile.url, server_id=7, api_token="tok-abc")
    if not accepted:
        with pytest.raises(agent_module.ConfigError, match="belongs to server 8"):
            agent.beat_once()
        return
    result = agent.beat_once()
    assert result.ok
    assert agent.state["server_id"] == 7 and agent.state["server_name"] == "web-01"


def test_a_server_whose_answers_change_type_never_stops_the_agent(hostile, make_agent):
    shapes = [{"heartbeat_received": True, "server_name": 5}, [], "x", 3, b"null",
              {"heartbeat_received": True, "server_name": {"a": 1}}, GOOD_ANSWER]
    hostile.then(*[answer(200, shape) for shape in shapes])
    agent = make_agent(hostile.url)
    results = [agent.beat_once() for _ in shapes]
    assert [r.ok for r in results] == [True, False, False, False, False, True, True]
    assert agent.state["server_name"] == "web-01"


def test_the_watchdog_keeps_being_pinged_while_a_peer_trickles(
        hostile, make_agent, agent_module, tmp_path):
    recorder = NotifyRecorder(tmp_path / "notify.sock")
    hostile.then(*[trickle(endless_headers())] * 4)
    agent = make_agent(hostile.url, timeout=0.6)
    agent.notifier = agent_module.Notifier({"NOTIFY_SOCKET": recorder.path,
                                            "WATCHDOG_USEC": "200000"})  # a ping every 0.1 s
    try:
        started = time.monotonic()
        result = agent.beat_once()
        ended = time.monotonic()
        time.sleep(0.05)
    finally:
        recorder.close()
    assert not result.ok and result.attempts == 4
    pings = [started, *recorder.pings(), ended]
    gaps = [later - earlier for earlier, later in zip(pings, pings[1:])]
    assert len(pings) >= 15
    assert max(gaps) < 0.1 + 0.25, gaps


def test_trickling_peers_leave_no_thread_and_no_socket_behind(hostile, make_agent):
    def open_descriptors():
        return len(os.listdir("/proc/self/fd"))

    agent = make_agent(hostile.url, timeout=0.2)
    assert agent.beat_once().ok
    before = open_descriptors()
    hostile.then(*[trickle(endless_headers(), every_s=0.01)] * 12)
    for _ in range(3):
        assert not agent.beat_once().ok
    assert not [t for t in threading.enumerate() if t.name == "exchange-deadline"]
    deadline = time.monotonic() + 3  # the server's side notices the hang-up at its next byte
    while open_descriptors() > before and time.monotonic() < deadline:
        time.sleep(0.05)
    assert open_descriptors() <= before
    hostile.script.clear()  # the retry budget leaves some of them unused
    assert agent.beat_once().ok


def test_an_unexpected_error_in_a_beat_is_logged_once_with_its_traceback_and_the_loop_goes_on(
        hostile, make_agent, clock, caplog):
    agent = make_agent(hostile.url)
    real_heartbeat_url = agent.heartbeat_url

    def broken():
        raise RuntimeError("a bug in the agent")

    agent.heartbeat_url = broken
    with caplog.at_level(logging.DEBUG, logger="stacksense-heartbeat"):
        first, second = agent.beat_once(), agent.beat_once()
        clock.now += 30
        agent.heartbeat_url = real_heartbeat_url
        third = agent.beat_once()
    assert not first.ok and "internal error: RuntimeError: a bug in the agent" in first.error
    assert not second.ok and third.ok
    tracebacks = [r for r in caplog.records if r.exc_info]
    assert len(tracebacks) == 1 and "goes on" in tracebacks[0].getMessage()
    assert agent.state["consecutive_failures"] == 0


# -- TLS and proxies


@pytest.fixture
def tls_server(tls):
    server = HostileServer(tls_context=tls[1])
    yield server
    server.close()


def test_a_certificate_from_an_unknown_ca_fails_once_with_a_ca_bundle_hint(
        tls_server, make_agent, tls):
    result = make_agent(tls_server.url).beat_once()
    assert not result.ok and result.attempts == 1
    assert tls_server.connections == 1
    assert "certificate verify failed" in result.error
    assert "STACKSENSE_CA_BUNDLE" in result.error and "stacksense_ca_certificate" in result.error
    assert make_agent(tls_server.url, ca_bundle=tls[0]).beat_once().ok


def test_the_deadline_holds_inside_tls(tls_server, make_agent, tls):
    tls_server.then(*[trickle(endless_headers())] * 4)
    agent = make_agent(tls_server.url, ca_bundle=tls[0], timeout=TIMEOUT_S)
    result, elapsed = timed_beat(agent)
    assert "no answer within" in result.error
    assert_bounded_failure_then_recovery(agent, tls_server, result, elapsed)


@pytest.fixture
def proxy():
    server = ConnectProxy()
    yield server
    server.close()


def test_it_goes_through_a_connect_proxy_and_keeps_its_deadline_behind_it(
        tls_server, make_agent, tls, proxy, monkeypatch):
    monkeypatch.setenv("HTTPS_PROXY", proxy.url())
    tls_server.then(*[trickle(endless_headers())] * 4)
    agent = make_agent(tls_server.url, ca_bundle=tls[0], timeout=TIMEOUT_S)
    result, elapsed = timed_beat(agent)
    assert "no answer within" in result.error
    assert_bounded_failure_then_recovery(agent, tls_server, result, elapsed)
    assert proxy.requests == [f"CONNECT 127.0.0.1:{tls_server.port} HTTP/1.0"] * 5


def test_a_proxy_trickling_its_connect_answer_is_cut_off_at_the_deadline(
        tls_server, make_agent, tls, monkeypatch):
    slow_proxy = ConnectProxy(trickle_s=0.05)
    monkeypatch.setenv("HTTPS_PROXY", slow_proxy.url())
    try:
        agent = make_agent(tls_server.url, ca_bundle=tls[0], timeout=TIMEOUT_S)
        result, elapsed = timed_beat(agent)
    finally:
        slow_proxy.close()
    assert not result.ok and "no answer within" in result.error
    assert elapsed <= result.attempts * (TIMEOUT_S + SLACK_S)


@pytest.mark.parametrize("scheme", ["https", "http"])
def test_a_407_from_the_proxy_fails_once_with_a_credentials_hint(
        tls_server, hostile, make_agent, tls, proxy, monkeypatch, scheme):
    monkeypatch.setenv(f"{scheme.upper()}_PROXY", proxy.url(password="wrong-password"))
    url = tls_server.url if scheme == "https" else hostile.url
    result = make_agent(url, ca_bundle=tls[0]).beat_once()
    assert not result.ok and result.attempts == 1 and result.status == 407
    assert "407" in result.error and "stacksense_https_proxy" in result.error
    assert "wrong-password" not in result.error


def test_a_401_from_the_proxy_for_wrong_credentials_fails_once_with_the_same_hint(
        tls_server, make_agent, tls, monkeypatch):
    tinyproxy_like = ConnectProxy(refuse=401)
    try:
        monkeypatch.setenv("HTTPS_PROXY", tinyproxy_like.url(password="wrong-password"))
        result = make_agent(tls_server.url, ca_bundle=tls[0]).beat_once()
    finally:
        tinyproxy_like.close()
    assert not result.ok and result.attempts == 1 and result.status == 401
    assert "stacksense_https_proxy" in result.error and "wrong-password" not in result.error


def run_once_through(proxy_url, url, ca_bundle, no_proxy=""):
    env = {"STACKSENSE_SERVER_ID": "42", "STACKSENSE_API_URL": url,
           "STACKSENSE_CA_BUNDLE": ca_bundle, "HTTPS_PROXY": proxy_url, "NO_PROXY": no_proxy}
    process = run_agent_process(["--once"], env=env)
    out, err = process.communicate(timeout=20)
    return process.returncode, out, err


@pytest.mark.parametrize("scheme", ["http://", ""])
def test_it_logs_the_proxy_it_uses_without_its_password(tls_server, tls, proxy, scheme):
    url = proxy.url()[len("http://"):] if not scheme else proxy.url()
    status, out, err = run_once_through(url, tls_server.url, tls[0])
    assert status == 0, err
    assert f"using the proxy http://<redacted>@127.0.0.1:{proxy.port}" in err
    assert "s3cret-proxy-pw" not in out + err
    assert proxy.requests == [f"CONNECT 127.0.0.1:{tls_server.port} HTTP/1.0"]


def test_no_proxy_is_honoured_as_requests_does(tls_server, tls, proxy):
    status, _, err = run_once_through(proxy.url(), tls_server.url, tls[0], no_proxy="127.0.0.1")
    assert status == 0, err
    assert "using the proxy" not in err
    assert proxy.requests == []


# -- SIGHUP


def test_sighup_rereads_the_token_file_and_keeps_the_old_token_if_the_new_one_is_bad(
        server, tmp_path):
    both = {"status": "ok", "server_id": 42, "server_name": "web-01",
            "authenticated": True, "heartbeat_received": True}
    server.then(*[Reply(200, both) for _ in range(200)])
    token_file = tmp_path / "token"
    token_file.write_text("tok-old\n")
    env = {"STACKSENSE_API_URL": server.url, "STACKSENSE_API_TOKEN_FILE": str(token_file),
           "STACKSENSE_INTERVAL": "1", "STACKSENSE_JITTER": "0"}
    process = run_agent_process(env=env)

    def tokens():
        return [r["headers"].get("Authorization") for r in server.requests]

    def wait_for(predicate):
        deadline = time.monotonic() + 10
        while not predicate() and time.monotonic() < deadline:
            time.sleep(0.05)
        return predicate()

    try:
        assert wait_for(lambda: len(tokens()) >= 2)
        token_file.write_text("tok-new\n")
        process.send_signal(signal.SIGHUP)
        assert wait_for(lambda: "Bearer tok-new" in tokens())
        first_new = tokens().index("Bearer tok-new")
        assert server.requests[first_new]["path"] == "/api/agent/ping/"  # checked first
        token_file.write_text("two tokens\n")
        process.send_signal(signal.SIGHUP)
        seen = len(tokens())
        assert wait_for(lambda: len(tokens()) >= seen + 2)
        assert process.poll() is None
    finally:
        process.send_signal(signal.SIGTERM)
        _, err = process.communicate(timeout=10)
    assert process.returncode == 0, err
    assert set(tokens()[first_new:]) == {"Bearer tok-new"}
    assert "SIGHUP: keeping the current API token" in err
    assert "tok-new" not in err and "tok-old" not in err


def test_sighup_without_a_token_file_is_logged_and_ignored(server, tmp_path):
    env = {"STACKSENSE_SERVER_ID": "42", "STACKSENSE_API_URL": server.url,
           "STACKSENSE_STATE_FILE": str(tmp_path / "state.json")}
    process = run_agent_process(env=env)
    deadline = time.monotonic() + 10
    while not server.requests and time.monotonic() < deadline:
        time.sleep(0.05)
    process.send_signal(signal.SIGHUP)
    time.sleep(0.8)
    assert process.poll() is None
    process.send_signal(signal.SIGTERM)
    _, err = process.communicate(timeout=10)
    assert process.returncode == 0
    assert "SIGHUP received: nothing to reload (legacy API, no token); ignored" in err


def test_a_stuck_exchange_stops_the_watchdog_pings_at_its_deadline(agent_module):
    pings = []
    guard = agent_module.ExchangeGuard(0.3, lambda: pings.append(time.monotonic()), 0.05)
    with guard:
        started = time.monotonic()
        time.sleep(0.8)  # stuck where no socket can be shut down (a DNS lookup, a bug)
    assert guard.expired
    assert pings and max(pings) - started < 0.3
    assert len(pings) >= 4


# -- nothing kept between beats, no secret in any output, bounded heads, every address


def test_cookies_a_server_sets_are_never_sent_back_and_beats_keep_being_accepted(
        server, make_agent):
    for number in range(30):
        reply = ok_reply()
        reply.headers = {"Set-Cookie": f"lb{number}={'x' * 3000}; Path=/; Max-Age=86400"}
        server.then(reply)
    agent = make_agent(server.url)
    assert all(agent.beat_once().ok for _ in range(30))
    assert [r["headers"].get("Cookie") for r in server.requests] == [None] * 30
    assert len(agent.session.cookies) == 0


def test_a_netrc_default_entry_never_replaces_the_token(server, tmp_path):
    home = tmp_path / "home"
    home.mkdir()
    (home / ".netrc").write_text("default login someone password other-system-secret\n")
    (home / ".netrc").chmod(0o600)
    server.then(Reply(200, {"authenticated": True, "server_id": 42}))
    env = {"STACKSENSE_API_URL": server.url, "STACKSENSE_API_TOKEN": "tok-123"}
    process = run_agent_process(["--once"], env=env, home=str(home))
    out, err = process.communicate(timeout=30)
    assert process.returncode == 0, out + err
    assert [r["headers"].get("Authorization") for r in server.requests] == ["Bearer tok-123"] * 2


SECRET_TOKEN = "Secret-tok+en/0123456789abcdef=="
PROXY_PASSWORD = "pa@ss:w%rd"  # written percent-encoded in the proxy URL


def secret_forms():
    credentials = "agent:" + PROXY_PASSWORD
    forms = [SECRET_TOKEN, PROXY_PASSWORD, credentials, base64.b64encode(credentials.encode())]
    forms = [f if isinstance(f, str) else f.decode() for f in forms]
    forms += [urllib.parse.quote(form, safe="") for form in forms]
    forms += [base64.b64encode(SECRET_TOKEN.encode()).decode(), "Secret-tok"]
    return forms


def assert_no_secret(*texts):
    for text in texts:
        for form in secret_forms():
            assert form not in text, f"{form!r} leaked: {text[:2000]!r}"


@pytest.mark.parametrize("through_proxy", [False, True], ids=["server echoes", "proxy echoes"])
def test_a_peer_echoing_the_request_never_gets_a_secret_into_logs_state_or_terminal(
        hostile, tmp_path, through_proxy):
    hostile.then(*[echo(hostile, 500) for _ in range(6)], echo(hostile, 400))
    env = {"STACKSENSE_API_TOKEN": SECRET_TOKEN, "STACKSENSE_INTERVAL": "1",
           "STACKSENSE_TIMEOUT": "0.5", "STACKSENSE_LOG_LEVEL": "debug",
           "STACKSENSE_STATE_FILE": str(tmp_path / "state.json"),
           "STACKSENSE_API_URL": hostile.url}
    if through_proxy:  # the "proxy" is the echoing peer; the server's name is never resolved
        quoted = urllib.parse.quote(PROXY_PASSWORD, safe="")
        env.update(HTTP_PROXY=f"agent:{quoted}@127.0.0.1:{hostile.port}",
                   STACKSENSE_API_URL="http://stacksense.invalid:8000")
    process = run_agent_process(env=env)
    deadline = time.monotonic() + 20
    while len(hostile.requests) < 7 and time.monotonic() < deadline:
        time.sleep(0.05)
    process.send_signal(signal.SIGTERM)
    out, err = process.communicate(timeout=10)
    assert len(hostile.requests) >= 7
    assert "HTTP 500" in err and "HTTP 400" in err and "<redacted>" in err
    hostile.then(echo(hostile, 400))
    once = run_agent_process(["--once"], env=env)
    once_out, once_err = once.communicate(timeout=20)
    assert once.returncode == 1 and "HTTP 400" in once_out
    state = (tmp_path / "state.json").read_text()
    assert "HTTP 400" in state
    assert_no_secret(out, err, state, once_out, once_err)
    assert stat.S_IMODE(os.stat(tmp_path / "state.json").st_mode) == 0o600


def test_the_state_file_only_ever_replaces_a_regular_file(
        server, make_agent, tmp_path, caplog):
    device = tmp_path / "null"
    os.mknod(device, 0o666 | stat.S_IFCHR, os.makedev(1, 3))  # like /dev/null, as root
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    link = tmp_path / "link"
    link.symlink_to(tmp_path / "elsewhere.json")
    for path in (device, fifo, link):
        agent = make_agent(server.url, state_file=str(path))
        with caplog.at_level(logging.WARNING, logger="stacksense-heartbeat"):
            assert agent.beat_once().ok and agent.beat_once().ok
    assert stat.S_ISCHR(os.lstat(device).st_mode) and stat.S_ISFIFO(os.lstat(fifo).st_mode)
    assert os.path.islink(link) and not (tmp_path / "elsewhere.json").exists()
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 3 and all("not a regular file" in w for w in warnings)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["fifo", "link", "null"]


@pytest.mark.parametrize("interim", [(103,), (102, 103, 103)], ids=["103", "102 103 103"])
def test_interim_answers_before_the_final_one_are_skipped(hostile, make_agent, interim):
    hostile.then(interim_then(response(200, GOOD_ANSWER), *interim))
    result = make_agent(hostile.url).beat_once()
    assert result.ok and result.attempts == 1 and len(hostile.requests) == 1


@pytest.mark.parametrize(("lines", "line_bytes"), [(100, 60000), (20000, 40), (1, 70000)],
                         ids=["100 lines of 60 KB", "20000 short lines", "one 70 KB line"])
def test_a_header_flood_fails_the_attempt_with_memory_bounded(
        hostile, make_agent, lines, line_bytes):
    hostile.then(*[header_flood(lines, line_bytes)] * 4)
    agent = make_agent(hostile.url, timeout=5.0)
    result, elapsed, peak = traced_beat(agent)
    assert not result.ok
    assert "larger than 64 KiB" in result.error or "more than 100 headers" in result.error
    assert peak < 1 << 20, f"peak Python allocations {peak} bytes"
    assert elapsed < 4 * (5.0 + SLACK_S)
    hostile.script.clear()
    assert agent.beat_once().ok


def test_a_head_of_normal_size_with_many_cookies_is_accepted(hostile, make_agent):
    cookies = [("Set-Cookie", f"c{n}={'v' * 200}") for n in range(40)]  # 8 KB of head
    hostile.then(answer(headers=cookies))
    assert make_agent(hostile.url).beat_once().ok


def test_failures_whose_text_changes_every_time_are_summarised_by_kind(
        server, make_agent, clock, caplog):
    agent = make_agent(server.url)
    agent.memory.calm_beats = 0  # already failing: one request per beat
    server.then(*[Reply(503, {"error": "busy", "request_id": f"req-{n:06d}"})
                  for n in range(30)])
    with caplog.at_level(logging.INFO, logger="stacksense-heartbeat"):
        for _ in range(30):  # 15 minutes of failing beats
            agent.beat_once()
            clock.now += 30
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 2, warnings
    assert warnings[1].startswith("heartbeat failing for 10m00s (21 beats): HTTP 503")


def test_agent_version_fits_the_servers_50_characters(agent_module):
    assert len(agent_module.AGENT_VERSION) <= agent_module.MAX_AGENT_VERSION_CHARS == 50


# -- a name with several addresses, the first ones dropping packets (a private /etc/hosts)

DEAD_ADDRESSES = [f"127.0.0.{n}" for n in range(2, 8)]
LIVE_ADDRESS = "127.0.0.8"


@pytest.fixture
def many_addresses(tmp_path):
    """(URL by name, live server): the name resolves to six dead addresses, then a live one."""
    live = HostileServer(host=LIVE_ADDRESS)
    dead = [DeadAddress(address, live.port) for address in DEAD_ADDRESSES]
    hosts = tmp_path / "hosts"
    hosts.write_text("".join(f"{a} multi.stacksense.test\n" for a in [*DEAD_ADDRESSES,
                                                                        LIVE_ADDRESS]))
    yield f"http://multi.stacksense.test:{live.port}", live, hosts
    for address in dead:
        address.close()
    live.close()


def run_in_private_hosts(hosts, code_or_args, env, **kwargs):
    """Run the agent (or python code) with `hosts` as /etc/hosts, in a mount namespace."""
    script = 'mount --bind "$0" /etc/hosts && exec "$@"'
    return subprocess.Popen(["unshare", "--mount", "sh", "-c", script, str(hosts),
                             sys.executable, *code_or_args], env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, **kwargs)


def test_the_private_hosts_file_gives_the_dead_addresses_first(many_addresses):
    hosts = many_addresses[2]
    code = ("import socket; print([a[4][0] for a in socket.getaddrinfo("
            "'multi.stacksense.test', 80, 0, socket.SOCK_STREAM)])")
    out, err = run_in_private_hosts(hosts, ["-c", code], dict(os.environ)).communicate(
        timeout=20)
    assert out.strip() == str([*DEAD_ADDRESSES, LIVE_ADDRESS]), err


def test_a_name_whose_first_addresses_drop_packets_is_reached_within_one_timeout(
        many_addresses, tmp_path):
    url, live, hosts = many_addresses
    recorder = NotifyRecorder(tmp_path / "notify.sock")
    env = {k: v for k, v in os.environ.items() if not k.startswith("STACKSENSE_")}
    env.update(STACKSENSE_API_URL=url, STACKSENSE_SERVER_ID="42", STACKSENSE_INTERVAL="3",
               STACKSENSE_TIMEOUT="2", NOTIFY_SOCKET=recorder.path, WATCHDOG_USEC="1000000",
               STACKSENSE_LOG_LEVEL="debug", HOME="/nonexistent")
    process = run_in_private_hosts(hosts, [str(AGENT_PATH)], env)
    try:
        deadline = time.monotonic() + 20
        while len(live.requests) < 2 and time.monotonic() < deadline:
            time.sleep(0.05)
    finally:
        process.send_signal(signal.SIGTERM)
        _, err = process.communicate(timeout=10)
        recorder.close()
    assert len(live.requests) >= 2, err
    # each beat's first attempt got through, within its 2 s deadline
    assert "heartbeat failed" not in err and "retrying" not in err, err
    pings = recorder.pings()
    gaps = [later - earlier for earlier, later in zip(pings, pings[1:])]
    assert len(pings) >= 5 and max(gaps) < 1.0, gaps  # WatchdogSec 1 s: never starved
