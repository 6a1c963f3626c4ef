#!/usr/bin/env python3
"""Status-at-scale benchmark: playbooks/status.yml next to a bare `ansible -m ping`, over SSH.

Starts the largest N of debian12 containers with sshd (bench/deploy_scale.py's harness: its
images, its ssh key, its container start), deploys the agent on all of them once, then for
each N times, on the first N hosts, `ansible stacksense_agents -m ping` and
`ansible-playbook playbooks/status.yml`, alternating, --reps times each, in two ways:

  cold  a fresh ControlPersist directory per run: every run opens its SSH connections (a
        status check from cron or CI every few minutes, after ControlPersist expired)
  warm  the connections of a previous run are reused (ControlPersist, 60 s)

    PATH=$PWD/.venv/bin:$PATH python bench/status_scale.py run --n 1 5 10 20 [--reps 3]
    python bench/status_scale.py report
    python bench/status_scale.py cleanup

Results are appended to build/status_scale/results.jsonl. Containers are named
stacksense-statusbench-NN (removed at the end, also on Ctrl-C; `cleanup` removes leftovers);
the receiver listens on 0.0.0.0:18193.
"""

import argparse
import json
import os
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import deploy_scale as harness  # the deploy benchmark's SSH-host harness

ROOT = harness.ROOT
WORK = ROOT / "build" / "status_scale"
RESULTS = WORK / "results.jsonl"
# Our own names and port, so that this never meets a deploy benchmark's containers.
# Its own container names and receiver port, passed to the harness (never set in it).
PREFIX = "stacksense-statusbench-"
RECEIVER_PORT = 18193
# The sshd image carries this checkout's key (build/deploy_scale/ssh): under our own name.
OWN_BASE = "localhost/stacksense-statusbench:debian12-aptseed"


def ansible_env(control_dir):
    env = dict(os.environ, ANSIBLE_SSH_CONTROL_PATH_DIR=str(control_dir), NO_COLOR="1",
               ANSIBLE_NOCOLOR="1")
    env["PATH"] = f"{harness.VENV_BIN}:{env['PATH']}"
    return env


def timed(argv, env):
    start = time.monotonic()
    done = subprocess.run(argv, cwd=ROOT, env=env, stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True)
    return round(time.monotonic() - start, 3), done.returncode, done.stdout


def subset_inventory(inventory, n):
    data = json.loads(Path(inventory).read_text())
    group = data["all"]["children"]["stacksense_agents"]
    group["hosts"] = dict(list(group["hosts"].items())[:n])
    path = WORK / f"inventory-ssh-first-{n}.json"
    path.write_text(json.dumps(data, indent=1))
    return path


def commit():
    return subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, text=True,
                          stdout=subprocess.PIPE).stdout.strip()


def run(args):
    WORK.mkdir(parents=True, exist_ok=True)
    harness.ensure_seeded_image()
    harness.podman("tag", harness.SEEDED_IMAGE, OWN_BASE)
    image = harness.ensure_ssh_image(OWN_BASE)
    receiver = harness.start_receiver(RECEIVER_PORT, WORK / "receiver.log")

    def stop(*_):
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, stop)
    try:
        top = max(args.n)
        harness.log(f"starting {top} containers with sshd")
        names = harness.start_containers(top, image, seeded=True, ssh=True, prefix=PREFIX)
        inventory = harness.write_inventory(names, "ssh", port=RECEIVER_PORT)
        harness.log("deploying the agent (not timed)")
        wall, rc, out = timed(["ansible-playbook", "-i", str(inventory), "playbooks/deploy.yml",
                               "-e", json.dumps({"stacksense_serial": ["100%"]})],
                              ansible_env(WORK / "cp" / "deploy"))
        if rc != 0:
            raise SystemExit(f"deploy failed (rc {rc}):\n{out[-3000:]}")
        harness.log(f"deployed in {wall} s")
        for n in args.n:
            inv = subset_inventory(inventory, n)
            commands = {
                "ping": ["ansible", "-i", str(inv), "stacksense_agents",
                         "-m", "ansible.builtin.ping"],
                "status": ["ansible-playbook", "-i", str(inv), "playbooks/status.yml"],
            }
            for mode in ("cold", "warm"):
                warm_dir = WORK / "cp" / f"warm-{n}-{int(time.time())}"
                if mode == "warm":
                    timed(commands["ping"], ansible_env(warm_dir))  # open the connections
                for rep in range(args.reps):
                    order = ["ping", "status"] if rep % 2 == 0 else ["status", "ping"]
                    for what in order:
                        control = (warm_dir if mode == "warm"
                                   else WORK / "cp" / f"{what}-{n}-{rep}-{time.time_ns()}")
                        harness.wait_for_quiet(args.max_load, args.max_wait)
                        load = harness.loadavg()[0]
                        wall, rc, out = timed(commands[what], ansible_env(control))
                        ok = rc == 0 and ("All hosts are healthy" in out if what == "status"
                                          else out.count("SUCCESS") == n)
                        row = {"n": n, "what": what, "mode": mode, "rep": rep, "wall_s": wall,
                               "rc": rc, "ok": ok, "load_before": load,
                               "date": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "commit": commit()}
                        with open(args.results, "a") as results:
                            results.write(json.dumps(row) + "\n")
                        harness.log(f"N={n} {mode} {what} rep {rep}: {wall} s rc={rc} ok={ok} "
                                    f"load={load}")
                        if not ok:
                            (WORK / f"failed-{what}-{n}-{rep}.log").write_text(out)
    finally:
        receiver.stop()
        harness.remove_containers(prefix=PREFIX)


def report(args):
    rows = [json.loads(line) for line in Path(args.results).read_text().splitlines() if line]
    rows = [r for r in rows if r["ok"]]
    print("| hosts | connections | `ansible -m ping` (s) | `status.yml` (s) | ratio |")
    print("|---:|---|---:|---:|---:|")
    for n in sorted({r["n"] for r in rows}):
        for mode in ("cold", "warm"):
            walls = {what: [r["wall_s"] for r in rows
                            if r["n"] == n and r["mode"] == mode and r["what"] == what]
                     for what in ("ping", "status")}
            if not all(walls.values()):
                continue
            ping, status = (statistics.median(walls[w]) for w in ("ping", "status"))
            print(f"| {n} | {mode} | {ping:.2f} | {status:.2f} | {status / ping:.2f} |")
    print(f"\nmedian of {max(r['rep'] for r in rows) + 1} runs each; "
          f"commit {sorted({r['commit'] for r in rows})}")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    run_parser = sub.add_parser("run")
    run_parser.add_argument("--n", type=int, nargs="+", default=[1, 5, 10, 20])
    run_parser.add_argument("--reps", type=int, default=3)
    run_parser.add_argument("--max-load", type=float, default=6.0,
                            help="wait (at most --max-wait s) for a lower 1-minute load first")
    run_parser.add_argument("--max-wait", type=float, default=30)
    run_parser.add_argument("--results", default=str(RESULTS))
    report_parser = sub.add_parser("report")
    report_parser.add_argument("--results", default=str(RESULTS))
    sub.add_parser("cleanup")
    args = parser.parse_args(argv)
    if args.command == "run":
        run(args)
    elif args.command == "report":
        report(args)
    else:
        harness.remove_containers(prefix=PREFIX)


if __name__ == "__main__":
    main()
