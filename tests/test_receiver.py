"""Tests for receiver/stacksense_receiver.py, the reference heartbeat receiver.

Each test talks HTTP(S) (requests) to a real receiver bound to 127.0.0.1:0 and
served from a thread; time is an injected fake clock, so nothing sleeps. The
HTTPS tests use a throwaway CA and server certificate made for the session.
"""

import datetime
import hashlib
import importlib.util
import io
import ipaddress
import json
import re
import signal
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import requests
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

RECEIVER_PATH = Path(__file__).resolve().parents[1] / "receiver" / "stacksense_receiver.py"
SERVERS = [
    {"id": 1, "name": "web-01", "token": "tok-1"},
    {"id": 2, "name": "web-02"},
]
HEARTBEAT = {"agent_version": "1.0.0"}
START_TIME = 1700000000.0


def _load_receiver_module():
    spec = importlib.util.spec_from_file_location("stacksense_receiver", str(RECEIVER_PATH))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


stacksense_receiver = _load_receiver_module()


class FakeClock:
    def __init__(self, now=START_TIME):
        self.now = now

    def __call__(self):
        return self.now

    def advance(self, seconds):
        self.now += seconds


@pytest.fixture
def clock():
    return FakeClock()


@pytest.fixture
def start_receiver(clock):
    """Start receivers in threads (make_server options as kwargs); stop them after the test."""
    started = []

    def start(servers=SERVERS, **options):
        options.setdefault("clock", clock)
        server = stacksense_receiver.make_server(servers, **options)
        thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.02})
        thread.daemon = True
        thread.start()
        started.append((server, thread))
        return server

    yield start
    for server, thread in started:
        server.shutdown()
        server.server_close()
        thread.join(5)


@pytest.fixture
def receiver(start_receiver):
    return start_receiver()


@pytest.fixture
def legacy_receiver(start_receiver):
    """A receiver that accepts the legacy API, as older servers did (--accept-legacy)."""
    return start_receiver(accept_legacy=True)


@pytest.fixture
def http():
    session = requests.Session()
    session.trust_env = False  # never send 127.0.0.1 traffic through an environment proxy
    yield session
    session.close()


def legacy_heartbeat(http, receiver, server_id, **kwargs):
    kwargs.setdefault("json", HEARTBEAT)
    return http.post(f"{receiver.url}/api/heartbeat/{server_id}/",
                     allow_redirects=False, timeout=5, **kwargs)


def token_heartbeat(http, receiver, headers):
    return http.post(receiver.url + "/api/agent/heartbeat/", json=HEARTBEAT,
                     headers=headers, timeout=5)


def status_of(http, receiver, server_id):
    servers = http.get(receiver.url + "/api/status/", timeout=5).json()["servers"]
    return next(server for server in servers if server["id"] == server_id)


def run_cli(*args):
    return subprocess.run([sys.executable, str(RECEIVER_PATH), *list(args)],
                          capture_output=True, text=True, timeout=10)


# ---------------------------------------------------------------- a throwaway PKI


def _name(common_name):
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def _certificate(subject, issuer, public_key, signing_key, extensions):
    now = datetime.datetime.now(datetime.timezone.utc)
    builder = (x509.CertificateBuilder().subject_name(_name(subject)).issuer_name(_name(issuer))
               .public_key(public_key).serial_number(x509.random_serial_number())
               .not_valid_before(now - datetime.timedelta(minutes=5))
               .not_valid_after(now + datetime.timedelta(days=1)))
    for extension, critical in extensions:
        builder = builder.add_extension(extension, critical=critical)
    return builder.sign(signing_key, hashes.SHA256())


def _pem(certificate):
    return certificate.public_bytes(serialization.Encoding.PEM)


def _make_ca(directory, name):
    key = ec.generate_private_key(ec.SECP256R1())
    ca = _certificate(name, name, key.public_key(), key,
                      [(x509.BasicConstraints(ca=True, path_length=None), True)])
    (directory / f"{name}.pem").write_bytes(_pem(ca))
    return ca, key


@pytest.fixture(scope="session")
def pki(tmp_path_factory):
    """A CA, a server certificate it signed for localhost and 127.0.0.1, and another CA."""
    directory = tmp_path_factory.mktemp("pki")
    _, ca_key = _make_ca(directory, "test-ca")
    _make_ca(directory, "other-ca")
    server_key = ec.generate_private_key(ec.SECP256R1())
    san = x509.SubjectAlternativeName([
        x509.DNSName("localhost"),
        x509.IPAddress(ipaddress.ip_address("127.0.0.1"))])
    server = _certificate("localhost", "test-ca", server_key.public_key(), ca_key,
                          [(san, False), (x509.BasicConstraints(ca=False, path_length=None), True)])
    (directory / "server.pem").write_bytes(_pem(server))
    (directory / "server.key").write_bytes(server_key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption()))
    return {"ca": str(directory / "test-ca.pem"), "other_ca": str(directory / "other-ca.pem"),
            "cert": str(directory / "server.pem"), "key": str(directory / "server.key")}


# ---------------------------------------------------------------- legacy API


def test_it_accepts_a_legacy_heartbeat_for_a_known_server_id(http, legacy_receiver):
    response = legacy_heartbeat(http, legacy_receiver, 1)

    assert response.status_code == 200
    body = response.json()
    assert body == {"status": "ok", "server_id": 1, "server_name": "web-01",
                    "heartbeat_received": True, "timestamp": "2023-11-14T22:13:20.000+00:00"}
    assert legacy_receiver.store.heartbeats() == [
        {"server_id": 1, "agent_version": "1.0.0", "source": "127.0.0.1",
         "time": "2023-11-14T22:13:20.000+00:00", "api": "legacy"}]


def test_it_answers_404_for_an_unknown_server_id(http, legacy_receiver):
    response = legacy_heartbeat(http, legacy_receiver, 99)

    assert response.status_code == 404
    assert response.json() == {"error": "Server not found"}
    assert legacy_receiver.store.heartbeats() == []


def test_it_answers_404_for_a_non_numeric_server_id(http, legacy_receiver):
    assert legacy_heartbeat(http, legacy_receiver, "web-01").status_code == 404


@pytest.mark.parametrize("path", ["/api/nothing/", "/api/heartbeat/web-01/", "/favicon.ico"])
def test_it_answers_an_unknown_path_with_the_real_servers_html_404_page(http, receiver, path):
    response = http.post(receiver.url + path, json=HEARTBEAT, allow_redirects=False, timeout=5)

    assert response.status_code == 404
    assert response.headers["Content-Type"].startswith("text/html")
    assert "<h1>Not Found</h1>" in response.text
    assert [r["status"] for r in receiver.store.requests()] == [404]


def test_it_redirects_a_heartbeat_path_without_trailing_slash_with_301(http, legacy_receiver):
    response = http.post(legacy_receiver.url + "/api/heartbeat/1", json=HEARTBEAT,
                         allow_redirects=False, timeout=5)

    assert response.status_code == 301
    assert response.headers["Location"] == "/api/heartbeat/1/"
    assert legacy_receiver.store.heartbeats() == []


@pytest.mark.parametrize("method", ["GET", "PUT"])
def test_it_answers_405_with_allow_post_for_get_and_put_on_a_heartbeat_path(
        http, legacy_receiver, method):
    response = http.request(method, legacy_receiver.url + "/api/heartbeat/1/", timeout=5)

    assert response.status_code == 405
    assert response.headers["Allow"] == "POST"
    assert response.json() == {"error": "Method not allowed"}


@pytest.mark.parametrize(("body", "recorded_version"), [
    ("", None), ("not json", None), ("[1, 2]", None), ('{"agent_version": 7}', "7")])
def test_it_accepts_a_legacy_heartbeat_whatever_its_body_like_the_real_server(
        http, legacy_receiver, body, recorded_version):
    response = legacy_heartbeat(http, legacy_receiver, 1, json=None, data=body,
                                headers={"Content-Type": "application/json"})

    assert response.status_code == 200
    assert response.json()["heartbeat_received"] is True
    assert [h["agent_version"] for h in legacy_receiver.store.heartbeats()] == [recorded_version]


def test_it_refuses_legacy_heartbeats_with_the_csrf_page_by_default_like_the_real_server(
        http, receiver):
    response = legacy_heartbeat(http, receiver, 1)

    assert response.status_code == 403
    assert response.headers["Content-Type"].startswith("text/html")
    assert "CSRF verification failed. Request aborted." in response.text
    assert receiver.store.heartbeats() == []
    assert status_of(http, receiver, 1)["online"] is False
    assert token_heartbeat(http, receiver, {"Authorization": "Bearer tok-1"}).status_code == 200


@pytest.mark.parametrize(("cookie", "header", "status"), [
    ("csrftoken=abc", "abc", 401), ("csrftoken=abc", "other", 403), ("csrftoken=abc", None, 403),
    ("sessionid=abc", "abc", 403)])
def test_a_legacy_heartbeat_with_a_csrf_cookie_and_its_token_gets_401_authentication_required(
        http, receiver, cookie, header, status):
    headers = {"Cookie": cookie}
    if header is not None:
        headers["X-CSRFToken"] = header

    response = legacy_heartbeat(http, receiver, 1, headers=headers)

    assert response.status_code == status
    if status == 401:
        assert response.json() == {"error": "authentication required"}
    assert receiver.store.heartbeats() == []


def test_accept_any_without_accept_legacy_is_a_config_error():
    with pytest.raises(stacksense_receiver.ConfigError, match="--accept-legacy"):
        stacksense_receiver.make_server(SERVERS, accept_any=True)


def test_accept_any_registers_unknown_numeric_ids_as_server_id(http, start_receiver):
    receiver = start_receiver(accept_legacy=True, accept_any=True)

    response = legacy_heartbeat(http, receiver, 42)

    assert response.status_code == 200
    assert response.json()["server_name"] == "server-42"
    assert status_of(http, receiver, 42)["online"] is True
    assert legacy_heartbeat(http, receiver, "abc").status_code == 404


# ---------------------------------------------------------------- token API


def test_it_accepts_a_token_heartbeat_and_identifies_the_server_by_its_token(http, receiver):
    response = token_heartbeat(http, receiver, {"Authorization": "Bearer tok-1"})

    assert response.status_code == 200
    assert response.json() == {"status": "ok", "heartbeat_received": True}
    [record] = receiver.store.heartbeats()
    assert (record["server_id"], record["api"]) == (1, "token")


@pytest.mark.parametrize("body", [None, b"", b"not json", b"[1, 2]", b'{"other": true}'])
def test_it_accepts_a_token_heartbeat_with_any_or_no_body_like_the_real_server(
        http, receiver, body):
    response = http.post(receiver.url + "/api/agent/heartbeat/", data=body,
                         headers={"Authorization": "Bearer tok-1"}, timeout=5)

    assert response.status_code == 200
    assert response.json() == {"status": "ok", "heartbeat_received": True}
    assert [(h["server_id"], h["agent_version"]) for h in receiver.store.heartbeats()] == [
        (1, None)]


@pytest.mark.parametrize("header", ["Bearer  tok-1", "Bearer tok-1   ", "Bearer \t tok-1 "])
def test_it_accepts_a_bearer_token_padded_with_spaces_like_the_real_server(
        http, receiver, header):
    response = token_heartbeat(http, receiver, {"Authorization": header})

    assert response.status_code == 200
    assert [h["server_id"] for h in receiver.store.heartbeats()] == [1]


@pytest.mark.parametrize(("headers", "error"), [
    ({}, "missing or malformed Authorization header"),
    ({"Authorization": "Bearer "}, "missing or malformed Authorization header"),
    ({"Authorization": "Token tok-1"}, "missing or malformed Authorization header"),
    ({"Authorization": "bearer tok-1"}, "missing or malformed Authorization header"),
    ({"Authorization": "Bearer wrong"}, "invalid or disabled token"),
    ({"Authorization": "Bearer tok-1 extra"}, "invalid or disabled token"),
])
def test_it_answers_401_with_the_real_servers_message_for_a_missing_malformed_or_unknown_token(
        http, receiver, headers, error):
    response = token_heartbeat(http, receiver, headers)

    assert response.status_code == 401
    assert response.json() == {"error": error}
    assert receiver.store.heartbeats() == []


def test_ping_returns_the_server_identity_for_a_valid_token(http, receiver):
    response = http.get(receiver.url + "/api/agent/ping/",
                        headers={"Authorization": "Bearer tok-1"}, timeout=5)

    assert response.status_code == 200
    assert response.json() == {"status": "ok", "server_id": 1, "server_name": "web-01",
                               "authenticated": True}


def test_ping_answers_401_for_a_bad_token(http, receiver):
    response = http.get(receiver.url + "/api/agent/ping/",
                        headers={"Authorization": "Bearer nope"}, timeout=5)

    assert response.status_code == 401
    assert "error" in response.json()


def test_an_agent_version_over_50_characters_is_an_http_500_and_records_nothing(http, receiver):
    response = http.post(receiver.url + "/api/agent/heartbeat/", json={"agent_version": "v" * 51},
                         headers={"Authorization": "Bearer tok-1"}, timeout=5)
    fifty = http.post(receiver.url + "/api/agent/heartbeat/", json={"agent_version": "v" * 50},
                      headers={"Authorization": "Bearer tok-1"}, timeout=5)

    assert response.status_code == 500
    assert "<h1>Server Error (500)</h1>" in response.text
    assert fifty.status_code == 200
    assert [h["agent_version"] for h in receiver.store.heartbeats()] == ["v" * 50]


def test_a_body_that_is_not_json_is_accepted_and_wipes_the_stored_version(http, receiver):
    auth = {"Authorization": "Bearer tok-1"}
    token_heartbeat(http, receiver, auth)
    assert status_of(http, receiver, 1)["agent_version"] == "1.0.0"

    response = http.post(receiver.url + "/api/agent/heartbeat/", data=b"1.0.0",
                         headers=auth, timeout=5)

    assert response.status_code == 200
    assert status_of(http, receiver, 1)["agent_version"] is None
    assert status_of(http, receiver, 1)["online"] is True


def test_extra_fields_of_a_heartbeat_are_ignored(http, receiver):
    response = http.post(receiver.url + "/api/agent/heartbeat/",
                         json={"agent_version": "1.0.0", "server_id": 2, "hostname": "x"},
                         headers={"Authorization": "Bearer tok-1"}, timeout=5)

    assert response.status_code == 200
    assert [(h["server_id"], h["agent_version"]) for h in receiver.store.heartbeats()] == [
        (1, "1.0.0")]


def test_a_token_given_to_two_servers_is_refused_naming_both():
    servers = [{"id": 1, "name": "a", "token": "same"}, {"id": 2, "name": "b", "token": "same"}]

    with pytest.raises(stacksense_receiver.ConfigError,
                       match="server id 2 reuses the token of server id 1"):
        stacksense_receiver.make_server(servers)


# ---------------------------------------------------------------- tokens minted (stand-in)


def test_minting_a_token_gives_a_server_without_one_a_working_token(http, receiver):
    minted = http.post(receiver.url + "/_receiver/servers/2/token", timeout=5).json()

    assert (minted["id"], minted["name"], minted["rotated"]) == (2, "web-02", False)
    ping = http.get(receiver.url + "/api/agent/ping/",
                    headers={"Authorization": "Bearer " + minted["token"]}, timeout=5)
    assert ping.json()["server_id"] == 2


def test_minting_again_rotates_and_the_old_token_stops_at_once(http, receiver):
    minted = http.post(receiver.url + "/_receiver/servers/1/token", timeout=5).json()

    assert minted["rotated"] is True and minted["token"] != "tok-1"
    assert token_heartbeat(http, receiver, {"Authorization": "Bearer tok-1"}).status_code == 401
    assert token_heartbeat(
        http, receiver, {"Authorization": "Bearer " + minted["token"]}).status_code == 200


def test_the_server_list_shows_credentials_as_hashes_never_tokens(http, receiver):
    listed = http.get(receiver.url + "/_receiver/servers", timeout=5)

    assert listed.json() == [
        {"id": 1, "name": "web-01", "credential": {
            "token_hash": hashlib.sha256(b"tok-1").hexdigest(), "token_prefix": "tok-1"}},
        {"id": 2, "name": "web-02", "credential": None}]
    assert http.post(receiver.url + "/_receiver/servers/9/token", timeout=5).status_code == 404


# ---------------------------------------------------------------- status and records


def test_a_server_stays_online_until_offline_after_seconds_pass(http, legacy_receiver, clock):
    legacy_heartbeat(http, legacy_receiver, 1)

    clock.advance(180)
    at_limit = status_of(http, legacy_receiver, 1)
    clock.advance(0.5)
    past_limit = status_of(http, legacy_receiver, 1)

    assert at_limit["online"] is True
    assert at_limit["seconds_since_heartbeat"] == 180
    assert (at_limit["agent_version"], at_limit["heartbeats"]) == ("1.0.0", 1)
    assert past_limit["online"] is False
    assert past_limit["last_heartbeat"] == "2023-11-14T22:13:20.000+00:00"


def test_a_server_that_never_sent_a_heartbeat_is_offline(http, receiver):
    status = http.get(receiver.url + "/api/status/", timeout=5).json()

    assert status["offline_after_s"] == 180
    assert status["servers"][1] == {
        "id": 2, "name": "web-02", "online": False, "last_heartbeat": None,
        "seconds_since_heartbeat": None, "agent_version": None, "heartbeats": 0}


def test_the_offline_delay_is_configurable(http, start_receiver, clock):
    receiver = start_receiver(offline_after=30)
    legacy_heartbeat(http, receiver, 1)

    clock.advance(31)

    assert status_of(http, receiver, 1)["online"] is False


def test_heartbeats_and_requests_can_be_listed_per_server(http, legacy_receiver):
    legacy_heartbeat(http, legacy_receiver, 1)
    legacy_heartbeat(http, legacy_receiver, 2)
    http.get(legacy_receiver.url + "/api/heartbeat/2/", timeout=5)

    heartbeats = http.get(legacy_receiver.url + "/api/heartbeats/?server_id=2", timeout=5).json()
    requests_for_2 = http.get(legacy_receiver.url + "/api/requests/?server_id=2", timeout=5).json()

    assert [(h["server_id"], h["api"]) for h in heartbeats] == [(2, "legacy")]
    assert [(r["method"], r["path"], r["status"]) for r in requests_for_2] == [
        ("POST", "/api/heartbeat/2/", 200), ("GET", "/api/heartbeat/2/", 405)]
    assert len(http.get(legacy_receiver.url + "/api/requests/", timeout=5).json()) == 3


def test_deleting_records_forgets_heartbeats_and_requests(http, legacy_receiver):
    legacy_heartbeat(http, legacy_receiver, 1)

    response = http.delete(legacy_receiver.url + "/_receiver/records", timeout=5)

    assert response.status_code == 200
    assert legacy_receiver.store.heartbeats() == []
    assert legacy_receiver.store.requests() == []
    assert status_of(http, legacy_receiver, 1)["heartbeats"] == 0


def test_an_injected_fault_is_answered_until_cleared_and_failed_requests_are_counted(
        http, legacy_receiver):
    injected = http.put(legacy_receiver.url + "/_receiver/fault", json={"status": 503}, timeout=5)
    assert injected.status_code == 200

    faulted = legacy_heartbeat(http, legacy_receiver, 1)
    faulted_ping = http.get(legacy_receiver.url + "/api/agent/ping/",
                            headers={"Authorization": "Bearer tok-1"}, timeout=5)
    status_during_fault = http.get(legacy_receiver.url + "/api/status/", timeout=5)
    http.put(legacy_receiver.url + "/_receiver/fault", json={"status": None}, timeout=5)
    recovered = legacy_heartbeat(http, legacy_receiver, 1)

    assert faulted.status_code == 503 and "error" in faulted.json()
    assert faulted_ping.status_code == 503
    assert status_during_fault.status_code == 200
    assert recovered.status_code == 200
    assert [r["status"] for r in legacy_receiver.store.requests(server_id=1)] == [503, 503, 200]
    assert len(legacy_receiver.store.heartbeats()) == 1


def test_an_invalid_fault_status_is_rejected(http, receiver):
    response = http.put(receiver.url + "/_receiver/fault", json={"status": "boom"}, timeout=5)

    assert response.status_code == 400
    assert receiver.store.fault() is None


def test_the_html_page_lists_servers_escaped_with_their_state(http, start_receiver):
    receiver = start_receiver([{"id": 1, "name": "web-01", "token": "tok-1"},
                               {"id": 2, "name": "<db&02>"}])
    token_heartbeat(http, receiver, {"Authorization": "Bearer tok-1"})

    page = http.get(receiver.url + "/", timeout=5)

    assert page.status_code == 200
    assert page.headers["Content-Type"].startswith("text/html")
    assert '<meta http-equiv="refresh" content="5">' in page.text
    assert "web-01" in page.text and "&lt;db&amp;02&gt;" in page.text
    assert "<db&02>" not in page.text
    assert re.search(r"web-01</td>.*class=\"online\"", page.text)
    assert re.search(r"&lt;db&amp;02&gt;</td>.*class=\"offline\"", page.text)


# ---------------------------------------------------------------- HTTPS


def test_it_serves_the_api_over_https_to_a_client_that_trusts_its_ca(http, start_receiver, pki):
    receiver = start_receiver(tls_cert=pki["cert"], tls_key=pki["key"])

    response = http.post(receiver.url + "/api/agent/heartbeat/", json=HEARTBEAT,
                         headers={"Authorization": "Bearer tok-1"}, verify=pki["ca"], timeout=5)

    assert receiver.url.startswith("https://127.0.0.1:")
    assert response.status_code == 200
    assert [h["server_id"] for h in receiver.store.heartbeats()] == [1]


def test_a_client_that_does_not_trust_its_ca_fails_verification_and_is_logged_in_one_line(
        http, start_receiver, pki):
    log = io.StringIO()
    receiver = start_receiver(tls_cert=pki["cert"], tls_key=pki["key"], log=log)

    with pytest.raises(requests.exceptions.SSLError, match="certificate verify failed"):
        http.get(receiver.url + "/api/agent/ping/", verify=pki["other_ca"], timeout=5)
    trusted = http.post(receiver.url + "/api/agent/heartbeat/", json=HEARTBEAT,
                        headers={"Authorization": "Bearer tok-1"}, verify=pki["ca"], timeout=5)

    assert trusted.status_code == 200
    assert len(receiver.store.heartbeats()) == 1
    [failed_line] = [line for line in log.getvalue().splitlines() if "TLS" in line]
    assert re.fullmatch(r"\S+ 127\.0\.0\.1 TLS handshake failed: .+", failed_line)
    assert "Traceback" not in log.getvalue()


def test_plain_http_to_the_https_port_is_refused_and_the_receiver_keeps_serving(
        http, start_receiver, pki):
    receiver = start_receiver(tls_cert=pki["cert"], tls_key=pki["key"])

    with pytest.raises(requests.ConnectionError):
        http.get(receiver.url.replace("https://", "http://") + "/api/status/", timeout=5)

    assert http.get(receiver.url + "/api/status/", verify=pki["ca"], timeout=5).status_code == 200


def test_make_server_rejects_duplicate_ids():
    with pytest.raises(ValueError, match="duplicate server id 1"):
        stacksense_receiver.make_server([{"id": 1, "name": "a"}, {"id": 1, "name": "b"}])


# ---------------------------------------------------------------- command line


@pytest.mark.parametrize("content", [
    "{not json",
    '{"id": 1, "name": "web-01"}',
    '[{"id": 1, "name": "a"}, {"id": 1, "name": "b"}]',
    '[{"id": 1, "name": "a", "token": "t"}, {"id": 2, "name": "b", "token": "t"}]',
    '[{"id": "one", "name": "a"}]',
])
def test_the_cli_exits_2_with_one_error_line_for_a_bad_servers_file(tmp_path, content):
    servers_file = tmp_path / "servers.json"
    servers_file.write_text(content)

    result = run_cli("--listen", "127.0.0.1:0", "--servers", str(servers_file))

    assert result.returncode == 2
    assert result.stdout == ""
    assert len(result.stderr.splitlines()) == 1
    assert result.stderr.startswith("stacksense-receiver: error: ")


@pytest.mark.parametrize("which", ["cert only", "key only", "key is not a key"])
def test_the_cli_exits_2_with_one_error_line_for_a_bad_tls_option(pki, which):
    flags = {"cert only": ["--tls-cert", pki["cert"]],
             "key only": ["--tls-key", pki["key"]],
             "key is not a key": ["--tls-cert", pki["cert"], "--tls-key", pki["ca"]]}[which]

    result = run_cli("--listen", "127.0.0.1:0", "--server", "1:web-01", *flags)

    assert result.returncode == 2
    assert len(result.stderr.splitlines()) == 1
    assert result.stderr.startswith("stacksense-receiver: error: ")
    assert "--tls-" in result.stderr or pki["cert"] in result.stderr


def test_the_cli_exits_2_for_a_missing_servers_file(tmp_path):
    result = run_cli("--servers", str(tmp_path / "missing.json"))

    assert result.returncode == 2
    assert len(result.stderr.splitlines()) == 1
    assert "cannot read servers file" in result.stderr


@pytest.mark.parametrize(("stop_signal", "scheme"), [
    (signal.SIGTERM, "http"), (signal.SIGINT, "http"), (signal.SIGTERM, "https")])
def test_the_cli_announces_its_address_logs_records_and_exits_0_on_a_stop_signal(
        tmp_path, http, pki, stop_signal, scheme):
    record_file = tmp_path / "heartbeats.jsonl"
    tls_flags = ["--tls-cert", pki["cert"], "--tls-key", pki["key"]] if scheme == "https" else []
    process = subprocess.Popen(
        [sys.executable, str(RECEIVER_PATH), "--listen", "127.0.0.1:0",
         "--server", "1:web-01:tok-1", "--record", str(record_file), *tls_flags],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, universal_newlines=True)
    try:
        announced = re.fullmatch(
            rf"stacksense-receiver listening on ({scheme}://127\.0\.0\.1:\d+)\n",
            process.stdout.readline())
        assert announced
        response = http.post(announced.group(1) + "/api/agent/heartbeat/", json=HEARTBEAT,
                             headers={"Authorization": "Bearer tok-1"}, verify=pki["ca"],
                             timeout=5)
        log_line = process.stdout.readline()
        process.send_signal(stop_signal)
        assert process.wait(timeout=15) == 0  # generous: CI machines can be loaded
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
        process.stdout.close()
        stderr = process.stderr.read()
        process.stderr.close()

    assert response.status_code == 200
    assert "POST /api/agent/heartbeat/ 200 server_id=1" in log_line
    assert json.loads(record_file.read_text())["server_id"] == 1
    assert stderr == ""
