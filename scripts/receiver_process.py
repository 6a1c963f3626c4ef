"""The reference receiver (receiver/stacksense_receiver.py) as a process of a test or benchmark.

The one copy used by scripts/delivery_test.py and bench/ (deploy_scale.py, status_scale.py,
interrupt.py): start it on 0.0.0.0:PORT, so that containers reach it as
host.containers.internal:PORT, knowing the given servers (or accepting any id), ask it what it
heard, stop it.

    receiver = ReceiverProcess(18290, logdir / "receiver.log").start()
    receiver.versions()      # {server id: last agent version}
    receiver.stop()
"""

import json
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


class ReceiverError(RuntimeError):
    """The receiver did not start (its log says why; often: the port is in use)."""


class ReceiverProcess:
    def __init__(self, port, logpath, servers=None, legacy=True):
        """servers: [{"id": 1, "name": "web-01", "token": ...}, ...], or None to accept any id.
        legacy: also accept the legacy API (hosts deployed with a server id and no token)."""
        self.port, self.url = port, f"http://127.0.0.1:{port}"
        self.logpath = Path(logpath)
        self.servers = servers
        self.legacy = legacy
        self.process = None

    def start(self):
        # Another receiver on the port would answer the status check below in our place.
        with socket.socket() as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                probe.bind(("0.0.0.0", self.port))
            except OSError as error:
                raise ReceiverError(f"port {self.port} is in use ({error.strerror}): stop "
                                    "what listens there first") from None
        self.logpath.parent.mkdir(parents=True, exist_ok=True)
        command = [sys.executable, str(ROOT / "receiver" / "stacksense_receiver.py"),
                   "--listen", f"0.0.0.0:{self.port}"]
        if self.legacy:
            command.append("--accept-legacy")
        if self.servers is None:
            command.append("--accept-any")
        else:
            servers_file = self.logpath.with_suffix(".servers.json")
            servers_file.write_text(json.dumps(self.servers))
            command += ["--servers", str(servers_file)]
        with open(self.logpath, "a") as logfile:
            self.process = subprocess.Popen(command, stdout=logfile, stderr=subprocess.STDOUT,
                                            start_new_session=True)
        for _ in range(50):
            try:
                self.status()
            except OSError:
                if self.process.poll() is not None:
                    break
                time.sleep(0.2)
                continue
            return self
        self.stop()
        raise ReceiverError(f"the receiver did not start on port {self.port} (is it in use? "
                            f"see {self.logpath})")

    def get(self, path):
        with urllib.request.urlopen(self.url + path, timeout=5) as response:
            return json.load(response)

    def status(self):
        """/api/status/: {"servers": [{"id", "last_heartbeat", "agent_version", ...}]}."""
        return self.get("/api/status/")

    def versions(self):
        """{server id: the agent version of its last heartbeat}."""
        return {int(s["id"]): s.get("agent_version") for s in self.status()["servers"]}

    def heartbeats(self, server_id, since=""):
        """Accepted heartbeats of SERVER_ID at or after the ISO time SINCE."""
        rows = self.get(f"/api/heartbeats/?server_id={server_id}")
        return [r for r in rows if r["time"] >= since]

    def stop(self):
        if self.process and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self.process = None
