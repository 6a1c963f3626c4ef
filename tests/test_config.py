"""Configuration: every bad value exits 78 with one line naming it; precedence holds."""

import json
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import AGENT_PATH, run_agent_process

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
    ({"STACKSENSE_SERVER_ID": "\uff14\uff12"}, "STACKSENSE_SERVER_ID", "ASCII digits"),
    ({"STACKSENSE_SERVER_ID": "\u0664\u0662"}, "STACKSENSE_SERVER_ID", "ASCII digits"),
    ({"STACKSENSE_SERVER_ID": "+5"}, "STACKSENSE_SERVER_ID", "positive integer"),
    ({"STACKSENSE_SERVER_ID": "000"}, "STACKSENSE_SERVER_ID", "positive integer"),
    ({"STACKSENSE_SERVER_ID": "4 2"}, "STACKSENSE_SERVER_ID", "positive integer"),
    ({"STACKSENSE_SERVER_ID": "9" * 19}, "STACKSENSE_SERVER_ID", "positive integer"),
    ({"STACKSENSE_API_URL": "https://x.example/?"}, "STACKSENSE_API_URL", "?query"),
    ({"STACKSENSE_API_URL": "https://x.example/#"}, "STACKSENSE_API_URL", "#fragment"),
    ({"STACKSENSE_API_URL": "https://x.example:0"}, "STACKSENSE_API_URL", "port"),
    ({"STACKSENSE_API_URL": "https://x.example:"}, "STACKSENSE_API_URL", "port"),
    ({"STACKSENSE_API_URL": "https://x.example:8a"}, "STACKSENSE_API_URL", "port"),
    ({"STACKSENSE_API_URL": "https://[::1"}, "STACKSENSE_API_URL", "valid host"),
    ({"STACKSENSE_API_URL": "https://[v1.x]"}, "STACKSENSE_API_URL", "valid host"),
    ({"STACKSENSE_API_URL": "https://exa mple.com"}, "STACKSENSE_API_URL", "spaces"),
    ({"STACKSENSE_API_URL": "https://x.example/\x1b[2J"}, "STACKSENSE_API_URL", "control"),
    ({"STACKSENSE_API_URL": "https://b\u00fccher.example"}, "STACKSENSE_API_URL", "xn--"),
    ({"STACKSENSE_API_URL": "https://-bad-.example"}, "STACKSENSE_API_URL", "valid host"),
    ({"STACKSENSE_API_URL": "https://x..example"}, "STACKSENSE_API_URL", "valid host"),
    ({"STACKSENSE_API_URL": "https://10.0.0.999"}, "STACKSENSE_API_URL", "valid host"),
    ({"STACKSENSE_API_URL": "https://x.example%2f"}, "STACKSENSE_API_URL", "valid host"),
    ({"STACKSENSE_API_URL": "http:/x.example"}, "STACKSENSE_API_URL", "http://"),
    ({"STACKSENSE_API_TOKEN": "t\u00f6ken"}, "STACKSENSE_API_TOKEN", "Bearer"),
    ({"STACKSENSE_API_TOKEN": "tok,en"}, "STACKSENSE_API_TOKEN", "Bearer"),
    ({"STACKSENSE_API_TOKEN": "tok\x00en"}, "STACKSENSE_API_TOKEN", "Bearer"),
    ({"STACKSENSE_API_TOKEN": "=tok"}, "STACKSENSE_API_TOKEN", "Bearer"),
    ({"STACKSENSE_API_TOKEN": "t" * 5000}, "STACKSENSE_API_TOKEN", "Bearer"),
    ({"STACKSENSE_STATE_FILE": "/tmp/a\x00b"}, "STACKSENSE_STATE_FILE", "NUL"),
    ({"STACKSENSE_CA_BUNDLE": "/tmp/a\x00b"}, "STACKSENSE_CA_BUNDLE", "NUL"),
    ({"STACKSENSE_CA_BUNDLE": "/dev/null"}, "STACKSENSE_CA_BUNDLE", "regular"),
    ({"STACKSENSE_INTERVAL": "1e999"}, "STACKSENSE_INTERVAL", "between 1 and 86400"),
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
    ('{"server_id": 42.0, "api_url": "https://x.example"}', "positive integer"),
    ('{"server_id": 42, "api_url": "https://x.example", "interval": 1e400}', "between 1"),
    ('{"server_id": 42, "api_url": "https://x.example", "interval": ' + "9" * 400 + "}",
     "number of seconds"),
    ('{"server_id": [[[[42]]]], "api_url": "https://x.example"}', "is a JSON list"),
    ('{"server_id": 42, "api_url": {"a": 1}}', "is a JSON object"),
    ('{"server_id": 42, "api_url": "https://x.example", "state_file": 5}', "file path"),
    ('{"server_id": 42, "api_url": ' + "[" * 30000 + "]" * 30000 + "}", "nests too deeply"),
    ("[" * 60000, "nests too deeply"),
    ("[" * 70000, "larger than 65536 bytes"),
    ('{"server_id": 42, "api_url": "https://x.example", "\\u001b[2J": 1}',
     "unknown key '\\x1b[2J'"),
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


def test_it_exits_78_when_the_config_file_is_a_directory(agent_module, capsys, tmp_path):
    status, _, err = run_main(agent_module, capsys, ["--config", str(tmp_path)], env={})
    assert status == 78
    assert "not a regular file" in err


def test_it_exits_78_when_the_config_file_cannot_be_read(agent_module, capsys, tmp_path):
    path = write(tmp_path / "agent.conf", "{}")
    os.chmod(path, 0)
    if os.access(path, os.R_OK):
        pytest.skip("running as root: every file is readable")
    status, _, err = run_main(agent_module, capsys, ["--config", path], env={})
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


def test_a_url_with_credentials_is_refused_without_echoing_the_password(agent_module, capsys):
    env = dict(GOOD_ENV, STACKSENSE_API_URL="https://admin:hunter2@stacksense.example.com")
    status, _, err = run_main(agent_module, capsys, env=env)
    assert status == 78 and err.count("\n") == 1
    assert "user:password@" in err and "API token" in err
    assert "hunter2" not in err and "<redacted>@stacksense.example.com" in err


@pytest.mark.parametrize("url", ["https://[::1]:8443", "https://xn--bcher-kva.example/",
                                 "http://127.0.0.1:8080/prefix/", "https://stacksense_01.lan",
                                 "HTTPS://Stacksense.Example.com.", "https://x.example:65535"])
def test_these_urls_are_valid(agent_module, capsys, url):
    env = dict(GOOD_ENV, STACKSENSE_API_URL=url)
    status, _, err = run_main(agent_module, capsys, env=env)
    assert status == 0, err


def test_a_token_with_every_character_rfc_6750_allows_is_valid(agent_module, capsys):
    env = dict(GOOD_ENV, STACKSENSE_API_TOKEN="Az09-._~+/==")
    assert run_main(agent_module, capsys, env=env)[0] == 0


@pytest.mark.parametrize("kind", ["fifo", "device", "too big", "not utf-8", "nul in path"])
def test_a_config_file_that_is_not_a_small_regular_utf8_file_exits_78_without_hanging(
        tmp_path, kind):
    path = tmp_path / "agent.conf"
    if kind == "fifo":
        os.mkfifo(str(path))  # opened for a blocking read, it would hang for ever
    elif kind == "device":
        path = Path("/dev/zero")
    elif kind == "too big":
        path.write_text('{"server_id": 42, "pad": "' + "x" * 70000 + '"}')
    elif kind == "not utf-8":
        path.write_bytes(b'{"server_id": 42, "api_url": "https://x.\xe9xample"}')
    args = ["--check-config", "--config", str(path)]
    if kind == "nul in path":
        args = ["--check-config", "--config", str(path) + "\\x00"]
    process = run_agent_process(args, env={})
    _, err = process.communicate(timeout=10)
    assert process.returncode == 78, err
    assert err.count("\n") == 1 and "Traceback" not in err


def test_a_nul_in_the_config_path_exits_78(agent_module, capsys):
    status, _, err = run_main(agent_module, capsys, ["--config", "/tmp/a\x00b"], env={})
    assert status == 78 and "NUL" in err and err.count("\n") == 1


@pytest.mark.parametrize("kind", ["fifo", "too big", "not ascii"])
def test_a_token_file_that_is_not_a_small_regular_file_exits_78_without_hanging(
        tmp_path, kind):
    path = tmp_path / "token"
    if kind == "fifo":
        os.mkfifo(str(path))
    elif kind == "too big":
        path.write_text("t" * 9000)
    else:
        path.write_bytes("t\u00f6ken".encode())
    env = dict(GOOD_ENV, STACKSENSE_API_TOKEN_FILE=str(path))
    process = run_agent_process(["--check-config"], env=env)
    _, err = process.communicate(timeout=10)
    assert process.returncode == 78, err
    assert err.count("\n") == 1 and "api_token_file" in err


def hostile_config_texts(seed=8, count=600):
    """Config files a fuzzer would write: valid ones mutated, odd types, bytes, nesting."""
    rng = random.Random(seed)
    good = {"server_id": 42, "api_url": "https://x.example", "interval": 30, "timeout": 5,
            "jitter": 0.1, "log_level": "info", "api_token": "tok-1"}
    odd_values = [None, True, False, 0, -1, 1e308, float("inf"), "", " ", "\x00", "\n",
                  "\u202e", "\uff14\uff12", "42\n", [], {}, [42], {"a": [1]}, "9" * 30,
                  "https://u:p@x.example", "https://x.example?", "https://[::1", "/dev/zero",
                  "\ud800", "inf", "nan", "1e999", 2 ** 70, "x" * 3000]
    texts = []
    for _ in range(count):
        roll = rng.random()
        if roll < 0.6:
            values = dict(good)
            for _ in range(rng.randint(1, 3)):
                key = rng.choice([*good, "state_file", "ca_bundle", "api_token_file", "k"])
                values[key] = rng.choice(odd_values)
            text = json.dumps(values)
        elif roll < 0.75:
            depth = rng.choice([10, 900, 5000, 200000])
            text = '{"server_id": ' + "[" * depth + "]" * depth * rng.randint(0, 1) + "}"
        elif roll < 0.9:
            text = json.dumps(good)
            cut = rng.randrange(len(text))
            text = text[:cut] + rng.choice(["", "\x00", "\\", '"', "}", "\ud800", "\x1b"]) \
                + text[cut + 1:]
        else:
            texts.append(bytes(rng.randrange(256) for _ in range(rng.randint(0, 200))))
            continue
        texts.append(text.encode("utf-8", "surrogatepass"))
    return texts


def test_fuzzed_config_files_give_exit_0_or_78_with_one_line_never_a_traceback(
        agent_module, capsys, tmp_path):
    path = tmp_path / "agent.conf"
    outcomes = set()
    for data in hostile_config_texts():
        path.write_bytes(data)
        status = agent_module.main(["--check-config", "--config", str(path)], {"HOME": "/"})
        out, err = capsys.readouterr()
        assert status in (0, 78), data[:200]
        if status == 78:
            assert out == "" and err.count("\n") == 1, (data[:200], err)
        outcomes.add(status)
    assert outcomes == {0, 78}


# The role's preflight calls settings_problems() on the controller: the same table of values
# goes to it and to the agent's loader, and both must say the same.
HOST_FILE_VARIABLES = ("STACKSENSE_API_TOKEN_FILE", "STACKSENSE_CA_BUNDLE")
GOOD_ENVIRONMENT = [
    {},
    {"STACKSENSE_INTERVAL": "12", "STACKSENSE_JITTER": "0"},
    {"STACKSENSE_INTERVAL": 15, "STACKSENSE_TIMEOUT": 14.5, "STACKSENSE_LOG_LEVEL": "DEBUG"},
    {"STACKSENSE_API_URL": "https://[::1]:8443/prefix/"},
    {"STACKSENSE_API_URL": "http://10.0.0.9:8000", "STACKSENSE_SERVER_ID": " 7 "},
    {"STACKSENSE_SERVER_ID": "", "STACKSENSE_API_TOKEN": "abc-._~+/=="},
    {"STACKSENSE_STATE_FILE": "/var/lib/x/state.json"},
    {"HTTPS_PROXY": "http://user:p%23ss@proxy.example:3128"},
    {"HTTPS_PROXY": "proxy.example:3128"},
]
PROXY_BAD_ENVIRONMENT = [
    {"HTTPS_PROXY": "http://user:pa#ss@proxy.example:3128"},
    {"HTTPS_PROXY": "user:pa#ss@proxy.example:3128"},
    {"https_proxy": "http://proxy.example:31x8"},
    {"HTTPS_PROXY": "ftp://proxy.example:21"},
]


@pytest.mark.parametrize("change", GOOD_ENVIRONMENT)
def test_the_settings_check_accepts_what_the_agent_accepts(agent_module, capsys, change,
                                                           monkeypatch):
    env = {key: str(value) for key, value in dict(GOOD_ENV, **change).items()}
    for key, value in env.items():
        if key.endswith("_PROXY"):
            monkeypatch.setenv(key, value)  # requests reads the proxy from os.environ
    assert agent_module.settings_problems(dict(GOOD_ENV, **change)) == []
    assert run_main(agent_module, capsys, env=env)[0] == 0


@pytest.mark.parametrize(("change", "named", "expected"), BAD_ENVIRONMENT)
def test_the_settings_check_refuses_what_the_agent_refuses_naming_the_setting(
        agent_module, change, named, expected):
    problems = agent_module.settings_problems(dict(GOOD_ENV, **change))
    if named in HOST_FILE_VARIABLES and "NUL" not in expected:
        assert problems == []  # whether the file is there is the host's business
        return
    assert len(problems) >= 1
    assert all("\n" not in problem for problem in problems)
    setting = next(s for s in agent_module.SETTINGS if s.env == named)
    assert setting.name in problems[0] and expected in problems[0]


@pytest.mark.parametrize("change", PROXY_BAD_ENVIRONMENT)
def test_a_bad_proxy_url_is_refused_by_both_without_showing_the_password(
        agent_module, capsys, monkeypatch, change):
    (key, value), = change.items()
    for name in ("HTTPS_PROXY", "https_proxy", "HTTP_PROXY", "http_proxy", "ALL_PROXY",
                 "all_proxy", "NO_PROXY", "no_proxy"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv(key, value)
    problems = agent_module.settings_problems(dict(GOOD_ENV, **change))
    status, out, err = run_main(agent_module, capsys, env=dict(GOOD_ENV, **change))
    assert status == 78 and err.count("\n") == 1
    assert len(problems) == 1 and key in problems[0] and "proxy URL" in err
    for text in (problems[0], err, out):
        assert "pa#ss" not in text and "ss@" not in text.replace("<redacted>@", "")


def test_the_derived_timeout_is_the_one_the_agent_uses(agent_module):
    for interval in [1, 1.5, 2, 5, 10, 11, 12, 15, 19, 20, 21, 30, 60, 86400]:
        env = dict(GOOD_ENV, STACKSENSE_INTERVAL=str(interval))
        config, _ = agent_module.load_config(agent_module.build_parser().parse_args([]),
                                             dict(env, HOME="/nonexistent"))
        derived = agent_module.derived_settings(env)
        assert derived["timeout"] == config["timeout"] < interval
        assert derived["interval"] == interval and derived["jitter"] == config["jitter"]
        assert derived["watchdog_s"] >= max(60, 4 * config["timeout"])


def test_the_settings_check_needs_neither_requests_nor_side_effects():
    code = (
        "import importlib.util, signal, sys\n"
        # as found: SIG_IGN under nohup, SIG_DFL otherwise; importing must not change it
        "sighup = signal.getsignal(signal.SIGHUP)\n"
        "sys.modules['requests'] = None\n"  # import requests now raises ImportError
        "sys.modules['urllib3'] = None\n"
        f"spec = importlib.util.spec_from_file_location('agent', {str(AGENT_PATH)!r})\n"
        "agent = importlib.util.module_from_spec(spec)\n"
        "spec.loader.exec_module(agent)\n"
        "assert signal.getsignal(signal.SIGHUP) is sighup\n"
        "print(agent.settings_problems({'STACKSENSE_API_URL': 'https://x.example',"
        " 'STACKSENSE_SERVER_ID': 'x'}))\n"
        "print(agent.derived_settings({'STACKSENSE_INTERVAL': '15'}))\n"
        "print(agent.offline_window_problem({'STACKSENSE_INTERVAL': '600'}))\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=60, check=False)
    assert done.returncode == 0, done.stderr
    assert "server_id (environment STACKSENSE_SERVER_ID) is 'x'" in done.stdout
    assert "'timeout': 10.0" in done.stdout and "Fix: set STACKSENSE_INTERVAL" in done.stdout


def test_the_derived_settings_need_only_the_timing_settings(agent_module):
    derived = agent_module.derived_settings({"STACKSENSE_INTERVAL": "8"})
    assert derived == {"interval": 8.0, "timeout": 4.0, "jitter": 0.1, "watchdog_s": 60}
    # A URL or id the agent would refuse is not theirs to judge (settings_problems does).
    assert agent_module.derived_settings({"STACKSENSE_API_URL": "ftp://x", "STACKSENSE_TIMEOUT":
                                          "20"})["watchdog_s"] == 80
    for env, named in (({"STACKSENSE_INTERVAL": "10", "STACKSENSE_TIMEOUT": "10"}, "timeout"),
                       ({"STACKSENSE_JITTER": "0.9"}, "jitter")):
        with pytest.raises(ValueError, match=named):
            agent_module.derived_settings(env)


def test_an_interval_whose_retried_beat_outlasts_the_offline_window_is_named_with_the_fix(
        agent_module):
    # 133 s + a beat of 4 tries of 10 s with 1 + 2 + 4 s of backoff = 180 s: just inside.
    assert agent_module.offline_window_problem({"STACKSENSE_INTERVAL": "133"}) is None
    problem = agent_module.offline_window_problem({"STACKSENSE_INTERVAL": "134"})
    assert problem.startswith("interval (environment STACKSENSE_INTERVAL) is 134 s with a "
                              "timeout of 10 s")
    assert "181 s, past the 180 s" in problem
    assert "Fix: set STACKSENSE_INTERVAL to at most 133" in problem
    assert "at most 90" in agent_module.offline_window_problem(
        {"STACKSENSE_INTERVAL": "100", "STACKSENSE_TIMEOUT": "30"})
    # What derived_settings refuses is settings_problems' to say.
    assert agent_module.offline_window_problem({"STACKSENSE_INTERVAL": "soon"}) is None
