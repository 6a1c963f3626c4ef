#!/usr/bin/env python3
"""The heartbeat agent against hostile servers: memory and time bounds, measured.

Runs the real agent process (no injected clock) against servers on loopback from
tests/hostile.py and reports:
- memory: the agent's steady-state RSS against a healthy server, and its peak RSS (VmHWM)
  while every answer is one of MEMORY_VARIANTS (an endless body, a 50 MB body, a header
  flood, a new cookie on every answer);
- addresses: a name resolving to six addresses that drop packets, then a live one (a private
  /etc/hosts in a mount namespace): the longest beat and the longest watchdog gap;
- time: while a server trickles one byte every 0.1 s (in the headers, or in the body), the
  longest exchange (server side: from the request to the agent hanging up), the longest beat
  (first request of a beat to the STATUS= notification that ends it) and the longest gap
  between WATCHDOG=1 notifications, with the role's WatchdogSec for that timeout.

    .venv/bin/python bench/agent_hostile.py [--quick]
    .venv/bin/python bench/agent_hostile.py --memory-only --agent OLD_AGENT.py  # compare
"""

import argparse
import itertools
import json
import math
import os
import platform
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))

from hostile import (  # noqa: E402 - the shared hostile peers live with the tests
    GOOD_ANSWER,
    DeadAddress,
    HostileServer,
    NotifyRecorder,
    big_body,
    endless_body,
    endless_headers,
    header_flood,
    response,
    trickle,
)


def new_cookie_every_answer():
    """A healthy answer that sets a new 4 KB cookie each time (a load balancer's)."""
    counter = itertools.count()

    def behave(conn, stop_event):
        cookie = f"lb{next(counter)}={'x' * 4000}; Path=/; Max-Age=86400"
        conn.sendall(response(200, GOOD_ANSWER, headers=[("Set-Cookie", cookie)]))

    return behave


# The memory experiments: what every answer is while the agent beats every 2 s.
MEMORY_VARIANTS = {
    "endless_body": endless_body,
    "body_50_mb": lambda: big_body(50),
    "header_flood_100_lines_of_60_kb": lambda: header_flood(100, 60000),
    "header_flood_20000_short_lines": lambda: header_flood(20000, 40),
    "new_cookie_every_answer": new_cookie_every_answer,
}


def memory_kib(pid):
    """VmRSS, VmHWM (peak RSS) in KiB and Threads of a process."""
    values = {}
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith(("VmRSS:", "VmHWM:", "Threads:")):
                values[line.split(":")[0]] = int(line.split()[1])
    return values


class ThreadSampler:
    """The most threads a process had, sampled every 50 ms (the unit has TasksMax=16)."""

    def __init__(self, pid):
        self.pid = pid
        self.most = 0
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self.loop, daemon=True)
        self.thread.start()

    def loop(self):
        while not self.stop.wait(0.05):
            try:
                self.most = max(self.most, memory_kib(self.pid)["Threads"])
            except (OSError, KeyError):
                return

    def close(self):
        self.stop.set()
        self.thread.join()
        return self.most


AGENT = [ROOT / "agent" / "heartbeat_agent.py"]


def start_agent(url, notify_path=None, watchdog_usec=None, **settings):
    env = {k: v for k, v in os.environ.items() if not k.startswith("STACKSENSE_")}
    env.update({"STACKSENSE_SERVER_ID": "42", "STACKSENSE_API_URL": url, "NO_PROXY": "*",
                "STACKSENSE_LOG_LEVEL": "warning"})
    env.update({f"STACKSENSE_{k.upper()}": str(v) for k, v in settings.items()})
    if notify_path:
        env.update({"NOTIFY_SOCKET": notify_path, "WATCHDOG_USEC": str(watchdog_usec)})
    return subprocess.Popen([sys.executable, str(AGENT[0])], env=env, stderr=subprocess.DEVNULL)


def stop(process):
    process.terminate()
    process.wait(10)


def run_memory(behaviour, seconds):
    """VmRSS and VmHWM of an agent beating every 2 s against `behaviour` (None: healthy)."""
    server = HostileServer()
    if behaviour:
        server.then(*[behaviour] * 1000)
    agent = start_agent(server.url, interval=2, timeout=1.5, jitter=0)
    try:
        time.sleep(seconds)
        values = memory_kib(agent.pid)
    finally:
        stop(agent)
        server.close()
    values["connections"] = server.connections
    return values


def timed_trickle(data, every_s, exchanges):
    """A trickling behaviour that records how long each exchange lasted, server side."""
    behave = trickle(data, every_s)

    def timed(conn, stop_event):
        started = time.monotonic()
        try:
            behave(conn, stop_event)
        finally:
            exchanges.append((started, time.monotonic()))

    return timed


def role_watchdog_sec(timeout_s):
    """__stacksense_watchdog_sec in roles/stacksense_agent/vars/main.yml."""
    return max(60, math.ceil(timeout_s * 4))


def trickled_bytes(kind):
    """An endless header, or a 100 kB body after a complete head, one byte at a time."""
    if kind == "headers":
        return endless_headers()
    head = b"HTTP/1.1 200 OK\r\nContent-Length: 100000\r\n\r\n"
    return itertools.chain([bytes([b]) for b in head], itertools.repeat(b" ", 100000))


def run_trickle(kind, timeout_s, interval_s, watchdog_usec, seconds):
    exchanges = []
    with tempfile.TemporaryDirectory() as directory:
        recorder = NotifyRecorder(Path(directory) / "notify.sock")
        server = HostileServer()
        server.then(*[timed_trickle(trickled_bytes(kind), 0.1, exchanges) for _ in range(1000)])
        agent = start_agent(server.url, recorder.path, watchdog_usec, interval=interval_s,
                            timeout=timeout_s, jitter=0)
        started = time.monotonic()
        sampler = ThreadSampler(agent.pid)
        try:
            time.sleep(seconds)
            peak_rss = memory_kib(agent.pid)["VmHWM"]
        finally:
            most_threads = sampler.close()
            stop(agent)
            server.close()
            recorder.close()
    pings = [started, *recorder.pings()]
    statuses = [at for at, message in recorder.messages if "STATUS=heartbeat" in message]
    durations = [end - begin for begin, end in exchanges if end < started + seconds]
    beats, previous = [], started
    for status_at in statuses:  # a beat: its exchanges, then the STATUS= that records it
        begins = [begin for begin, _ in exchanges if previous < begin < status_at]
        if begins:
            beats.append((min(begins), status_at))
        previous = status_at
    return {
        "trickled": kind, "timeout_s": timeout_s, "interval_s": interval_s,
        "watchdog_ping_every_s": watchdog_usec / 2e6,
        "role_watchdog_sec": role_watchdog_sec(timeout_s), "ran_s": seconds,
        "exchanges": len(durations), "beats": len(beats),
        "longest_exchange_s": round(max(durations), 3),
        "longest_beat_s": round(max(end - begin for begin, end in beats), 3),
        "longest_watchdog_gap_s": round(max(b - a for a, b in zip(pings, pings[1:])), 3),
        "watchdog_pings": len(pings) - 1, "agent_most_threads": most_threads,
        "agent_peak_rss_kib": peak_rss,
    }


DEAD = [f"127.0.0.{n}" for n in range(2, 8)]
LIVE = "127.0.0.8"
NAME = "multi.stacksense.test"


def beats_in_namespace(url, timeout_s, beats):
    """Inside the namespace: time `beats` real beats of the agent, and its watchdog pings."""
    import importlib.util
    spec = importlib.util.spec_from_file_location("agent", str(AGENT[0]))
    agent_module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(agent_module)
    with tempfile.TemporaryDirectory() as directory:
        recorder = NotifyRecorder(Path(directory) / "notify.sock")
        config = {"server_id": 42, "api_url": url, "interval": 30.0, "timeout": timeout_s,
                  "api_token": None, "api_token_file": None, "ca_bundle": None,
                  "state_file": None, "log_level": "warning", "jitter": 0.1}
        notifier = agent_module.Notifier({"NOTIFY_SOCKET": recorder.path,
                                          "WATCHDOG_USEC": str(int(timeout_s * 1e6))})
        agent = agent_module.Agent(config, notifier=notifier)
        durations, results = [], []
        for _ in range(beats):
            started = time.monotonic()
            result = agent.beat_once()
            durations.append(time.monotonic() - started)
            results.append((result.ok, result.attempts))
        time.sleep(0.05)
        recorder.close()
    pings = recorder.pings()
    return {"beats": results, "longest_beat_s": round(max(durations), 3),
            "longest_watchdog_gap_s": round(max(b - a for a, b in zip(pings, pings[1:])), 3),
            "watchdog_ping_every_s": timeout_s / 2}


def run_dead_addresses(timeout_s, beats):
    """A name with six packet-dropping addresses, then a live one, in a private /etc/hosts."""
    live = HostileServer(host=LIVE)
    dead = [DeadAddress(address, live.port) for address in DEAD]
    try:
        with tempfile.TemporaryDirectory() as directory:
            hosts = Path(directory) / "hosts"
            hosts.write_text("".join(f"{a} {NAME}\n" for a in [*DEAD, LIVE]))
            script = 'mount --bind "$0" /etc/hosts && exec "$@"'
            done = subprocess.run(
                ["unshare", "--mount", "sh", "-c", script, str(hosts), sys.executable,
                 __file__, "--agent", str(AGENT[0]), "--inside",
                 f"http://{NAME}:{live.port}", str(timeout_s), str(beats)],
                stdout=subprocess.PIPE, text=True, check=True)
    finally:
        for address in dead:
            address.close()
        live.close()
    measured = json.loads(done.stdout)
    measured.update(timeout_s=timeout_s, addresses=f"{len(DEAD)} dead, then 1 live",
                    role_watchdog_sec=role_watchdog_sec(timeout_s))
    return measured


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="short runs, for a smoke test")
    parser.add_argument("--memory-only", action="store_true", help="skip the trickle runs")
    parser.add_argument("--agent", type=Path, default=AGENT[0], help="the agent to run")
    parser.add_argument("--inside", nargs=3, help=argparse.SUPPRESS)  # URL TIMEOUT BEATS
    args = parser.parse_args()
    AGENT[0] = args.agent.resolve()
    if args.inside:
        url, timeout_s, beats = args.inside
        print(json.dumps(beats_in_namespace(url, float(timeout_s), int(beats))))
        return
    memory_s = 4 if args.quick else 10
    steady = run_memory(None, memory_s)
    memory = {name: run_memory(variant(), memory_s) for name, variant in MEMORY_VARIANTS.items()}
    addresses = [run_dead_addresses(timeout_s, 2 if args.quick else 5)
                 for timeout_s in (2.0, 10.0)]
    trickles = [] if args.memory_only else [
        run_trickle("headers", 2.0, 5.0, 1_000_000, 12 if args.quick else 30),
        run_trickle("body", 2.0, 5.0, 1_000_000, 12 if args.quick else 30)]
    if not args.quick and not args.memory_only:
        trickles.append(run_trickle("headers", 10.0, 30.0, 60_000_000, 75))
    import requests
    commit = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"],
                            stdout=subprocess.PIPE, text=True).stdout.strip()
    result = {
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "commit": commit,
        "agent": str(AGENT[0].relative_to(ROOT) if ROOT in AGENT[0].parents else AGENT[0]),
        "machine": f"{platform.machine()} {os.cpu_count()} cores, {platform.platform()}",
        "python": platform.python_version(), "requests": requests.__version__,
        "memory_kib": {"steady": steady, **memory},
        "peak_over_steady": {name: round(values["VmHWM"] / steady["VmRSS"], 3)
                             for name, values in memory.items()},
        "dead_addresses": addresses,
        "trickle": trickles,
    }
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
