"""Configuration: every bad value exits 78 with one line naming it; precedence holds."""

import json

import pytest

GOOD_ENV = {"STACKSENSE_SERVER_ID": "42", "STACKSENSE_API_URL": "https://stacksense.example.com"}


def run_main(agent_module, capsys, argv=(), env=None, home=None):
    environment = dict(GOOD_ENV if env is None else env)
    environment.setdefault("HOME", str(home or "/nonexistent"))
    status = agent_module.main(["--check-config", *argv], environment)
    captured = capsys.readouterr()
    return status, captured.out, captured.err


def write(path, text):
    path.write_text(text)
    return str(path)


BAD_ENVIRONMENT = [
    ({"STACKSENSE_SERVER_ID": "abc"}, "STACKSENSE_SERVER_ID", "positive integer"),
    ({"STACKSENSE_SERVER_ID": "-5"}, "STACKSENSE_SERVER_ID", "positive integer"),
    ({"STACKSENSE_SERVER_ID": "0"}, "STACKSENSE_SERVER_ID", "positive integer"),
    ({"STACKSENSE_SERVER_ID": "4.2"}, "STACKSENSE_SERVER_ID", "positive integer"),
    ({"STACKSENSE_API_URL": "stacksense.example.com"}, "STACKSENSE_API_URL", "http:// or https://"),
    ({"STACKSENSE_API_URL": "ftp://stacksense.example.com"}, "STACKSENSE_API_URL", "https://"),
    ({"STACKSENSE_API_URL": "https://"}, "STACKSENSE_API_URL", "host name"),
    ({"STACKSENSE_API_URL": "https://example.com:99999"}, "STACKSENSE_API_URL", "port"),
    ({"STACKSENSE_API_URL": "https://example.com/?a=1"}, "STACKSENSE_API_URL", "query"),
    ({"STACKSENSE_INTERVAL": "0"}, "STACKSENSE_INTERVAL", "between 1 and 86400"),
    ({"STACKSENSE_INTERVAL": "-30"}, "STACKSENSE_INTERVAL", "between 1 and 86400"),
    ({"STACKSENSE_INTERVAL": "thirty"}, "STACKSENSE_INTERVAL", "number of seconds"),
    ({"STACKSENSE_INTERVAL": "1e9"}, "STACKSENSE_INTERVAL", "between 1 and 86400"),
    ({"STACKSENSE_INTERVAL": "nan"}, "STACKSENSE_INTERVAL", "number of seconds"),
    ({"STACKSENSE_TIMEOUT": "30"}, "STACKSENSE_TIMEOUT", "fewer seconds than the interval"),
    ({"STACKSENSE_JITTER": "0.9"}, "STACKSENSE_JITTER", "fraction between 0 and 0.5"),
    ({"STACKSENSE_LOG_LEVEL": "loud"}, "STACKSENSE_LOG_LEVEL", "debug, info, warning, error"),
    ({"STACKSENSE_API_TOKEN_FILE": "/nonexistent/token"}, "STACKSENSE_API_TOKEN_FILE",
     "readable file"),
    ({"STACKSENSE_CA_BUNDLE": "/nonexistent/ca.pem"}, "STACKSENSE_CA_BUNDLE", "readable file"),
    ({"STACKSENSE_SERVER_ID": ""}, "STACKSENSE_SERVER_ID", "dashboard"),
    ({"STACKSENSE_API_URL": ""}, "STACKSENSE_API_URL", "e.g. https://"),
]


@pytest.mark.parametrize(("change", "named", "expected"), BAD_ENVIRONMENT)
def test_it_exits_78_with_one_line_naming_a_bad_environment_value(
        agent_module, capsys, change, named, expected):
    env = dict(GOOD_ENV, **change)
    status, out, err = run_main(agent_module, capsys, env=env)
    assert status == 78
    assert out == ""
    assert err.count("\n") == 1 and "Traceback" not in err
    assert named in err and expected in err


BAD_FILES = [
    ("{not json", "not valid JSON"),
    ('["a", "list"]', "must hold a JSON object"),
    ('{"server_id": 42, "api_url": "https://x.example", "intervall": 30}',
     "unknown key 'intervall'"),
    ('{"server_id": "forty-two", "api_url": "https://x.example"}', "key 'server_id'"),
    ('{"server_id": true, "api_url": "https://x.example"}', "key 'server_id'"),
    ('{"server_id": 42, "api_url": "https://x.example", "interval": "30s"}', "key 'interval'"),
]


@pytest.mark.parametrize(("text", "expected"), BAD_FILES)
def test_it_exits_78_naming_the_config_file_when_it_is_bad(
        agent_module, capsys, tmp_path, text, expected):
    path = write(tmp_path / "agent.conf", text)
    status, _, err = run_main(agent_module, capsys, ["--config", path], env={})
    assert status == 78
    assert path in err and expected in err
    assert err.count("\n") == 1


def test_it_exits_78_when_the_named_config_file_is_missing(agent_module, capsys, tmp_path):
    missing = str(tmp_path / "missing.conf")
    status, _, err = run_main(agent_module, capsys, env={"STACKSENSE_CONFIG": missing})
    assert status == 78
    assert missing in err and "does not exist" in err


def test_it_exits_78_when_the_config_file_cannot_be_read(agent_module, capsys, tmp_path):
    status, _, err = run_main(agent_module, capsys, ["--config", str(tmp_path)], env={})
    assert status == 78
    assert "cannot be read" in err


def test_it_exits_78_when_the_token_file_is_empty(agent_module, capsys, tmp_path):
    token_file = write(tmp_path / "token", "\n")
    env = dict(GOOD_ENV, STACKSENSE_API_TOKEN_FILE=token_file)
    status, _, err = run_main(agent_module, capsys, env=env)
    assert status == 78
    assert "api_token_file" in err and "empty" in err


def test_it_exits_64_on_an_unknown_option(agent_module, capsys):
    status = agent_module.main(["--server-idd", "4"], dict(GOOD_ENV))
    err = capsys.readouterr().err
    assert status == 64
    assert "--server-idd" in err and err.count("\n") == 1


def test_a_missing_default_config_file_is_fine(agent_module, capsys, tmp_path):
    status, out, _ = run_main(agent_module, capsys, home=tmp_path)
    assert status == 0
    assert "configuration is valid" in out


def test_the_command_line_beats_the_environment_which_beats_the_file(
        agent_module, capsys, tmp_path):
    write(tmp_path / ".stacksense_heartbeat.conf", json.dumps(
        {"server_id": 1, "api_url": "https://file.example", "interval": 60, "timeout": 5}))
    env = {"STACKSENSE_SERVER_ID": "2", "STACKSENSE_INTERVAL": "45"}
    status, out, _ = run_main(agent_module, capsys, ["--server-id", "3"], env=env, home=tmp_path)
    assert status == 0
    assert "server_id = 3 (command line --server-id)" in out
    assert "interval = 45.0 (environment STACKSENSE_INTERVAL)" in out
    assert "api_url = https://file.example (config file" in out
    assert "timeout = 5.0 (config file" in out
    assert "jitter = 0.1 (default)" in out


def test_it_strips_the_trailing_slash_and_keeps_a_path_prefix(agent_module):
    assert agent_module.parse_api_url("https://mon.example/stacksense/") == \
        "https://mon.example/stacksense"


def test_the_default_timeout_stays_below_a_short_interval(agent_module, capsys):
    status, out, _ = run_main(agent_module, capsys, env=dict(GOOD_ENV, STACKSENSE_INTERVAL="4"))
    assert status == 0
    assert "timeout = 2.0 (default)" in out


def test_systemd_directories_supply_the_state_file_and_the_token(agent_module, capsys, tmp_path):
    credentials = tmp_path / "credentials"
    credentials.mkdir()
    write(credentials / "api_token", "s3cr3t-token\n")
    env = dict(GOOD_ENV, STATE_DIRECTORY=str(tmp_path / "state"),
               CREDENTIALS_DIRECTORY=str(credentials))
    status, out, _ = run_main(agent_module, capsys, env=env)
    assert status == 0
    assert f"state_file = {tmp_path}/state/state.json (systemd $STATE_DIRECTORY)" in out
    assert "api_token = <redacted> (systemd credential api_token)" in out
    assert "s3cr3t-token" not in out


def test_a_token_alone_is_enough_without_a_server_id(agent_module, capsys):
    env = {"STACKSENSE_API_URL": "https://x.example", "STACKSENSE_API_TOKEN": "tok-123"}
    status, out, _ = run_main(agent_module, capsys, env=env)
    assert status == 0
    assert "tok-123" not in out


def test_a_bad_token_value_is_never_echoed(agent_module, capsys):
    env = dict(GOOD_ENV, STACKSENSE_API_TOKEN="two words")
    status, _, err = run_main(agent_module, capsys, env=env)
    assert status == 78
    assert "STACKSENSE_API_TOKEN" in err and "two words" not in err
