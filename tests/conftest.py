"""Shared fixtures: a scripted HTTP server on loopback, a fake clock, and the agent module."""

import http.server
import importlib.util
import json
import os
import socketserver
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent
AGENT_PATH = ROOT / "agent" / "heartbeat_agent.py"


COLLECTIONS_DIR = ROOT / ".collections"
COLLECTION_LINK = COLLECTIONS_DIR / "ansible_collections" / "stacksense" / "fleet"


def collections_path():
    """ANSIBLE_COLLECTIONS_PATH for the clone as stacksense.fleet (the committed link)."""
    return str(COLLECTIONS_DIR)


def load_module(name, relative):
    """The repository's file RELATIVE (a script, not a package) loaded as the module NAME."""
    spec = importlib.util.spec_from_file_location(name, str(ROOT / relative))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def role_values(values=None):
    """What the role's preflight templates for its plan (role_plan.py: INTERNAL and the role's
    variables):
    the role's defaults with `values`, and vars/main.yml's fixed values, their templates
    rendered from them (plain Jinja: they only join paths and read the role's files; the
    expected version is "test")."""
    import jinja2

    role = ROOT / "roles" / "stacksense_agent"
    internal = yaml.safe_load((role / "vars" / "main.yml").read_text())
    env = jinja2.Environment(undefined=jinja2.StrictUndefined)
    env.globals["lookup"] = lambda _kind, path, **_: Path(path).read_text().rstrip()
    known = {**yaml.safe_load((role / "defaults" / "main.yml").read_text()), **(values or {}),
             "role_path": str(role), "__stacksense_expected_version": "test"}
    plan = load_module("stacksense_filter_role_plan", "plugins/filter/role_plan.py")
    for name in plan.INTERNAL:
        value = internal.get(name)
        if name not in known and value is not None:
            is_template = isinstance(value, str) and "{{" in value
            known[name] = env.from_string(value).render(known) if is_template else value
    return known


def load_filters(name):
    """The filters of plugins/filter/NAME.py, by name, loaded as a plain module."""
    module = load_module(f"stacksense_filter_{name}", f"plugins/filter/{name}.py")
    return module.FilterModule().filters()


def run_local_tasks(tmp_path, tasks):
    """`tasks` in one play on the host web-01 (this machine, local connection) with a real
    ansible-playbook and the collection of this clone. Returns {task name: web-01's result}."""
    play = [{"hosts": "web-01", "gather_facts": False, "tasks": tasks}]
    (tmp_path / "play.yml").write_text(yaml.safe_dump(play))
    host = {"ansible_connection": "local", "ansible_python_interpreter": sys.executable}
    (tmp_path / "hosts.yml").write_text(yaml.safe_dump({"all": {"hosts": {"web-01": host}}}))
    env = dict(os.environ, ANSIBLE_STDOUT_CALLBACK="json", ANSIBLE_LOCALHOST_WARNING="false",
               ANSIBLE_COLLECTIONS_PATH=collections_path(), NO_COLOR="1")
    env.pop("ANSIBLE_CONFIG", None)
    playbook = Path(sys.executable).parent / "ansible-playbook"
    proc = subprocess.run([str(playbook), "-i", str(tmp_path / "hosts.yml"),
                           str(tmp_path / "play.yml")], cwd=str(tmp_path), env=env,
                          capture_output=True, text=True, timeout=120)
    try:
        report = json.loads(proc.stdout)
    except ValueError:
        pytest.fail(f"no JSON from ansible-playbook: {proc.stdout[-2000:]} {proc.stderr[-2000:]}")
    return {task["task"]["name"]: task["hosts"]["web-01"]
            for task in report["plays"][0]["tasks"]}


def load_agent_module():
    return load_module("heartbeat_agent", "agent/heartbeat_agent.py")


@pytest.fixture(scope="session")
def agent_module():
    return load_agent_module()


class Reply:
    """One scripted answer: status, JSON body (or raw text), headers, and stalls."""

    def __init__(self, status=200, body=None, headers=None, stall_s=0.0, advance_clock_s=0.0):
        self.status = status
        self.body = body
        self.headers = headers or {}
        self.stall_s = stall_s  # real seconds before answering (timeouts)
        self.advance_clock_s = advance_clock_s  # fake seconds the request "took"


def ok_reply(server_id=42, name="web-01"):
    return Reply(200, {"status": "ok", "server_id": server_id, "server_name": name,
                       "heartbeat_received": True, "timestamp": "2026-11-28T00:00:00+00:00"})


class ScriptedServer:
    """A real HTTP server on 127.0.0.1 answering from a script and recording every request.

    When the script runs out it answers like a healthy legacy StackSense server.
    """

    def __init__(self, port=0, clock=None):
        self.script = []
        self.requests = []
        self.clock = clock
        self.lock = threading.Lock()
        self.httpd = self._make_httpd(port)
        self.port = self.httpd.server_address[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, args=(0.05,), daemon=True)
        self.thread.start()

    def _make_httpd(self, port):
        owner = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def answer(self):
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length) if length else b""
                with owner.lock:
                    owner.requests.append({"method": self.command, "path": self.path,
                                           "headers": dict(self.headers), "body": body,
                                           "at": owner.clock.now if owner.clock else None})
                    reply = owner.script.pop(0) if owner.script else ok_reply()
                if reply.stall_s:
                    time.sleep(reply.stall_s)
                if reply.advance_clock_s and owner.clock:
                    owner.clock.now += reply.advance_clock_s
                payload = reply.body if isinstance(reply.body, str) else json.dumps(reply.body)
                data = payload.encode() if reply.body is not None else b""
                try:
                    self.send_response(reply.status)
                    for key, value in reply.headers.items():
                        self.send_header(key, value)
                    self.send_header("Content-Length", str(len(data)))
                    self.end_headers()
                    self.wfile.write(data)
                except OSError:
                    pass  # the client gave up (timeout tests)

            do_GET = do_POST = do_PUT = answer

        class Server(socketserver.ThreadingMixIn, http.server.HTTPServer):
            daemon_threads = True
            allow_reuse_address = True

        return Server(("127.0.0.1", port), Handler)

    def then(self, *replies):
        with self.lock:
            self.script.extend(replies)
        return self

    def bodies(self):
        return [json.loads(r["body"]) for r in self.requests if r["body"]]

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def server(clock):
    scripted = ScriptedServer(clock=clock)
    yield scripted
    scripted.close()


class FakeClock:
    """Monotonic clock and stop event in one: waiting advances time instead of sleeping.

    `stop_after_waits` ends a run() after that many waits, like SIGTERM would.
    """

    def __init__(self, start=1000.0, stop_after_waits=None):
        self.now = start
        self.waits = []
        self.stop_after_waits = stop_after_waits
        self._stopped = False

    def __call__(self):
        return self.now

    # the threading.Event interface the agent uses
    def wait(self, seconds):
        self.waits.append(seconds)
        self.now += seconds
        if self.stop_after_waits is not None and len(self.waits) >= self.stop_after_waits:
            self._stopped = True
        return self._stopped

    def is_set(self):
        return self._stopped

    def set(self):
        self._stopped = True


@pytest.fixture
def clock():
    return FakeClock()


@pytest.fixture
def make_agent(agent_module, clock, tmp_path):
    """Build an Agent against `url` with the fake clock; config overrides as keywords."""
    import random

    def make(url, **overrides):
        config = {"server_id": 42, "api_url": url, "interval": 30.0, "timeout": 2.0,
                  "api_token": None, "api_token_file": None, "ca_bundle": None,
                  "state_file": str(tmp_path / "state.json"), "log_level": "info",
                  "jitter": 0.1}
        config.update(overrides)
        return agent_module.Agent(config, clock=clock, stop=clock, rng=random.Random(7))

    return make


def run_agent_process(args=(), env=None, **kwargs):
    """Start the agent as a real process with a clean environment (no STACKSENSE_* leaks)."""
    base = {k: v for k, v in os.environ.items() if not k.startswith("STACKSENSE_")}
    base.pop("NOTIFY_SOCKET", None)
    base.pop("JOURNAL_STREAM", None)
    base["HOME"] = kwargs.pop("home", base.get("HOME", "/nonexistent"))
    base.update(env or {})
    return subprocess.Popen([sys.executable, str(AGENT_PATH), *args], env=base,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kwargs)
