"""One heartbeat against a real HTTP server on loopback: both APIs and the retry policy."""

import json
import logging
import socket

import pytest
from conftest import Reply, ScriptedServer, ok_reply


def test_it_posts_the_legacy_heartbeat_with_the_trailing_slash(server, make_agent, agent_module):
    result = make_agent(agent_module.parse_api_url(server.url + "/")).beat_once()
    assert result.ok and result.attempts == 1
    [request] = server.requests
    assert (request["method"], request["path"]) == ("POST", "/api/heartbeat/42/")
    assert request["headers"]["Content-Type"] == "application/json"
    assert json.loads(request["body"]) == {"agent_version": agent_module.AGENT_VERSION}
    assert "Authorization" not in request["headers"]


def test_it_keeps_the_path_prefix_of_the_api_url(server, make_agent, agent_module):
    make_agent(agent_module.parse_api_url(server.url + "/stacksense/")).beat_once()
    assert server.requests[0]["path"] == "/stacksense/api/heartbeat/42/"


def test_token_mode_pings_then_posts_with_the_bearer_header(server, make_agent):
    server.then(Reply(200, {"status": "ok", "server_id": 7, "server_name": "db-02",
                            "authenticated": True}),
                Reply(200, {"status": "ok", "heartbeat_received": True}))
    agent = make_agent(server.url, server_id=None, api_token="tok-abc")
    result = agent.beat_once()
    assert result.ok
    ping, beat = server.requests
    assert (ping["method"], ping["path"]) == ("GET", "/api/agent/ping/")
    assert (beat["method"], beat["path"]) == ("POST", "/api/agent/heartbeat/")
    assert beat["headers"]["Authorization"] == "Bearer tok-abc"
    assert agent.state["server_name"] == "db-02" and agent.state["server_id"] == 7
    agent.beat_once()
    assert [r["path"] for r in server.requests[2:]] == ["/api/agent/heartbeat/"]


def test_token_mode_refuses_a_server_id_that_is_not_the_tokens(
        server, make_agent, agent_module):
    server.then(Reply(200, {"status": "ok", "server_id": 7, "server_name": "db-02",
                            "authenticated": True}))
    agent = make_agent(server.url, server_id=8, api_token="tok-abc")
    with pytest.raises(agent_module.ConfigError, match="server_id is 8 but the API token belongs"):
        agent.beat_once()
    assert len(server.requests) == 1


def test_it_retries_503_twice_then_succeeds(server, make_agent, clock):
    server.then(Reply(503, {"error": "busy"}), Reply(503, {"error": "busy"}), ok_reply())
    result = make_agent(server.url).beat_once()
    assert result.ok and result.attempts == 3
    assert len(server.requests) == 3
    assert 0 <= clock.waits[0] <= 1 and 0 <= clock.waits[1] <= 2  # full jitter, doubling


def test_it_honours_retry_after_on_429(server, make_agent, clock):
    server.then(Reply(429, {"error": "slow down"}, {"Retry-After": "7"}), ok_reply())
    result = make_agent(server.url).beat_once()
    assert result.ok and result.attempts == 2
    assert clock.waits == [7.0]


def test_it_gives_up_the_beat_when_retry_after_is_past_the_next_beat(server, make_agent, clock):
    server.then(Reply(503, {"error": "maintenance"}, {"Retry-After": "120"}))
    result = make_agent(server.url).beat_once()
    assert not result.ok and result.attempts == 1
    assert clock.waits == []


def test_it_retries_after_a_timeout_then_succeeds(server, make_agent):
    server.then(Reply(stall_s=0.6), ok_reply())
    result = make_agent(server.url, timeout=0.2).beat_once()
    assert result.ok and result.attempts == 2


def test_a_stalled_server_costs_at_most_four_timeouts(server, make_agent, agent_module):
    server.then(*[Reply(stall_s=0.4) for _ in range(6)])
    result = make_agent(server.url, timeout=0.1).beat_once()
    assert not result.ok
    assert result.attempts == agent_module.MAX_ATTEMPTS_PER_BEAT
    assert "no answer within 0.1 s" in result.error


# What the real StackSense server answers to the legacy API (docs: /work/shared/REAL_SERVER.md):
# 403 with Django's CSRF page, or 401 JSON when a CSRF cookie came along.
CSRF_PAGE = ("<!DOCTYPE html><html lang=\"en\"><head><title>403 Forbidden</title></head><body>"
             "<h1>Forbidden (403)</h1><p>CSRF verification failed. Request aborted.</p>"
             "</body></html>")
LEGACY_REFUSED = "refuses the legacy API"


@pytest.mark.parametrize(("status", "body", "token", "hint"), [
    (404, {"detail": "Not found."}, None, "check STACKSENSE_SERVER_ID"),
    (404, {"detail": "Not found."}, "tok", "check STACKSENSE_API_URL"),
    (401, {"error": "authentication required"}, None, LEGACY_REFUSED),
    (403, CSRF_PAGE, None, LEGACY_REFUSED),
    (401, {"error": "invalid token"}, "tok", "rejected the API token"),
    (400, {"error": "nope"}, None, "refused the heartbeat"),
])
def test_it_does_not_retry_a_client_error_and_says_what_to_check(
        server, make_agent, status, body, token, hint):
    if token:
        server.then(Reply(200, {"authenticated": True, "server_id": 42}))  # the token ping
    server.then(Reply(status, body))
    result = make_agent(server.url, api_token=token).beat_once()
    assert not result.ok and result.attempts == 1
    assert len(server.requests) == 1 + bool(token)
    assert f"HTTP {status}" in result.error and hint in result.error
    if hint == LEGACY_REFUSED:
        assert "one per server" in result.error and "STACKSENSE_API_TOKEN" in result.error


def test_it_never_follows_a_redirect_into_a_get(server, make_agent):
    server.then(Reply(301, "", {"Location": "/api/heartbeat/42"}))
    result = make_agent(server.url).beat_once()
    assert not result.ok and "redirected" in result.error
    assert [r["method"] for r in server.requests] == ["POST"]


def test_a_200_that_does_not_confirm_the_heartbeat_is_a_failure_not_retried(server, make_agent):
    server.then(Reply(200, {"status": "ok", "heartbeat_received": False}))
    result = make_agent(server.url).beat_once()
    assert not result.ok and result.attempts == 1
    assert "heartbeat_received=true" in result.error


def test_a_200_html_page_is_a_failure(server, make_agent):
    server.then(Reply(200, "<html>Welcome to the captive portal</html>"))
    result = make_agent(server.url).beat_once()
    assert not result.ok and "captive portal" in result.error


def test_retries_stop_before_the_next_beat_is_due(server, make_agent, clock):
    server.then(*[Reply(503, {"error": "down"}) for _ in range(10)])
    agent = make_agent(server.url, interval=3.0, timeout=1.0)
    started = clock.now
    result = agent.beat_once()
    assert not result.ok
    assert clock.now + agent.config["timeout"] <= started + 3.0


def free_port():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_it_recovers_when_a_refused_connection_starts_answering(make_agent, clock, caplog):
    port = free_port()
    agent = make_agent(f"http://127.0.0.1:{port}")
    with caplog.at_level(logging.INFO, logger="stacksense-heartbeat"):
        failed = agent.beat_once()
        assert not failed.ok and "Connection refused" in failed.error
        assert failed.attempts >= 2
        clock.now += 30
        late = ScriptedServer(port=port)
        try:
            assert agent.beat_once().ok
        finally:
            late.close()
    messages = [r.getMessage() for r in caplog.records]
    assert any(m.startswith("heartbeat failed: cannot connect") for m in messages)
    assert any(m.startswith("heartbeats recovered after") for m in messages)
    assert agent.state["consecutive_failures"] == 0


def test_repeated_failures_are_summarised_not_logged_every_beat(server, make_agent, clock, caplog):
    agent = make_agent(server.url)
    server.then(*[Reply(404, {"detail": "Not found."}) for _ in range(30)])
    with caplog.at_level(logging.INFO, logger="stacksense-heartbeat"):
        for _ in range(30):  # 15 minutes of failing beats
            agent.beat_once()
            clock.now += 30
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 2
    assert warnings[1].startswith("heartbeat failing for 10m00s (21 beats)")
