#!/usr/bin/env python3
"""Memory and CPU footprint of the heartbeat agent, against the reference receiver.

Runs the agent's real loop (real HTTP to the receiver on loopback, in another process) with
a clock whose waits return at once, so 10,000 beats take seconds instead of 83 hours. Reports
RSS after beats 100, 1,000 and 10,000, CPU time per beat, and the same RSS figure for a
process that only imports requests, plus the RSS of the real agent process after a few beats.

    .venv/bin/python bench/agent_footprint.py [--beats 10000]
"""

import argparse
import importlib.util
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def rss_kib(pid="self"):
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise RuntimeError("no VmRSS")


def start_receiver():
    process = subprocess.Popen(
        [sys.executable, str(ROOT / "receiver" / "stacksense_receiver.py"),
         "--listen", "127.0.0.1:0", "--server", "1:bench-01", "--accept-legacy"],
        stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    url = process.stdout.readline().split()[-1]
    return process, url


class InstantClock:
    """Monotonic clock and stop event: waits advance time at once; stops after N beats."""

    def __init__(self, on_wait):
        self.now = 0.0
        self.on_wait = on_wait
        self.stopped = False

    def __call__(self):
        return self.now

    def wait(self, seconds):
        self.now += seconds
        self.stopped = self.on_wait()
        return self.stopped

    def is_set(self):
        return self.stopped

    def set(self):
        self.stopped = True


def measure_loop(url, beats):
    spec = importlib.util.spec_from_file_location("agent", str(ROOT / "agent" /
                                                                "heartbeat_agent.py"))
    agent_module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(agent_module)
    samples, started = {}, {}

    def on_wait():
        done = agent.health.beats
        if done == 100:
            started["cpu"], started["wall"] = time.process_time(), time.perf_counter()
        if done in (100, 1000, beats):
            samples[done] = rss_kib()
        return done >= beats

    clock = InstantClock(on_wait)
    config = {"server_id": 1, "api_url": url, "interval": 30.0, "timeout": 5.0,
              "api_token": None, "api_token_file": None, "ca_bundle": None,
              "state_file": str(ROOT / "build" / "bench-state.json"), "log_level": "warning",
              "jitter": 0.1}
    os.makedirs(ROOT / "build", exist_ok=True)
    agent = agent_module.Agent(config, clock=clock, stop=clock)
    agent.run()
    measured = beats - 100
    cpu_ms = (time.process_time() - started["cpu"]) * 1000 / measured
    wall_ms = (time.perf_counter() - started["wall"]) * 1000 / measured
    return samples, cpu_ms, wall_ms, agent.state["consecutive_failures"]


def baseline_rss_kib():
    code = "import requests, sys; print(open('/proc/self/status').read())"
    out = subprocess.run([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True,
                         check=True).stdout
    return next(int(line.split()[1]) for line in out.splitlines() if line.startswith("VmRSS:"))


def real_process_rss_kib(url):
    env = dict(os.environ, STACKSENSE_SERVER_ID="1", STACKSENSE_API_URL=url,
               STACKSENSE_INTERVAL="1")
    process = subprocess.Popen([sys.executable, str(ROOT / "agent" / "heartbeat_agent.py")],
                               env=env, stderr=subprocess.DEVNULL)
    time.sleep(5.5)
    rss = rss_kib(process.pid)
    process.terminate()
    process.wait()
    return rss


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--beats", type=int, default=10000)
    args = parser.parse_args()
    receiver, url = start_receiver()
    try:
        samples, cpu_ms, wall_ms, failures = measure_loop(url, args.beats)
        real_rss = real_process_rss_kib(url)
    finally:
        receiver.terminate()
        receiver.wait()
    import requests
    result = {
        "date": time.strftime("%Y-%m-%d"), "machine": f"{platform.node()} "
        f"{platform.machine()} {os.cpu_count()} cores, {platform.platform()}",
        "python": platform.python_version(), "requests": requests.__version__,
        "beats": args.beats, "rss_kib_after_beat": samples,
        "growth_kib_beat_100_to_last": samples[args.beats] - samples[100],
        "cpu_ms_per_beat": round(cpu_ms, 3), "wall_ms_per_beat": round(wall_ms, 3),
        "failed_beats_at_end": failures,
        "baseline_import_requests_rss_kib": baseline_rss_kib(),
        "agent_process_rss_kib_after_5_beats": real_rss,
    }
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
