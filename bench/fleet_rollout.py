#!/usr/bin/env python3
"""A rollout of 100 real hosts, some down or broken, then a bad version: issue 18's delivery check.

On N fresh debian12 hosts reached over SSH (bench/deploy_scale.py's seeded apt image and
receiver; started in parallel), it stops some hosts (down: unreachable) and breaks apt on
others (python3-requests removed, apt's sources pointing nowhere, as molecule/fleet does),
then runs playbooks/deploy.yml twice, as an operator would, with the playbook's default ramp:

  rollout  the first deploy; must exit 2 (the playbook fails a run that left hosts without
           the new agent), every healthy host must be heard by the receiver with the agent's
           version, the printed summary and the JSON report (-e stacksense_deploy_report)
           must name exactly the stopped hosts (unreachable) and the broken ones (broken,
           packages), and the batches must be the ramp's (read from the run's output)
  bad      a version whose heartbeats the server refuses (its URL path is wrong, as
           molecule/upgrade's broken version): must stop after the canary, the canary rolled
           back, no other host attempted; every deployed host must then still be heard (old
           version) and no host may hold the bad agent file

Each run is timed as deploy_scale.py times one (wall time, controller CPU of ansible-playbook
and its children, peak RSS/PSS of the controller's process tree). Prints one JSON document
and writes it to build/deploy_scale/fleet_rollout.json; exits 1 when a check failed.

    flock /tmp/stacksense-heavy.lock .venv/bin/python bench/fleet_rollout.py [--hosts 100]

Heavy: starts containers (run it under /tmp/stacksense-heavy.lock). Containers are
stacksense-fleet-NNN (label stacksense.bench=fleet_rollout), removed at the end, also on
Ctrl-C or SIGTERM; the receiver listens on port 18291.
"""

import argparse
import json
import os
import re
import signal
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime, timezone
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "bench"))
sys.path.insert(0, str(ROOT / "scripts"))
import deploy_scale as ds  # noqa: E402  (images, snapshot, receiver, timed playbook runs)
import testhost  # noqa: E402

PREFIX = "stacksense-fleet-"
LABEL = "stacksense.bench=fleet_rollout"
PORT = 18291
INTERVAL_S = 10
VERIFY_TIMEOUT_S = 30
START_WORKERS = 6
DEPLOY_PLAY = "Deploy the StackSense heartbeat agent"
BAD_VERSION = "9.9.9+bad"
# Problem hosts (1-based positions), one per batch at most, none of them the canary: the
# skip guard (stacksense_max_skipped_percent) must not stop this rollout.
STOPPED = (12, 45, 95)
BROKEN = (4, 70)
BREAK_APT = ("dpkg --remove --force-depends python3-requests python3-urllib3 >/dev/null 2>&1 || :;"
             " rm -rf /etc/apt/sources.list.d/* /var/lib/apt/lists/*;"
             " echo 'deb http://127.0.0.1:9/debian bookworm main' > /etc/apt/sources.list")
SEED_STAMP = ("mkdir -p /var/lib/apt/periodic && "
              "touch /var/lib/apt/periodic/update-success-stamp /var/lib/apt/lists")


def log(msg):
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


# --- what the playbook promises, read from it -------------------------------------------------

def default_serial(playbook=ROOT / "playbooks" / "deploy.yml"):
    """deploy.yml's default ramp: the list in `stacksense_serial | default([...])`."""
    play = yaml.safe_load(playbook.read_text())[0]
    match = re.search(r"default\((\[.*\])\)", play["serial"])
    return yaml.safe_load(match[1])


def ramp_batches(hosts, serial):
    """Ansible's batches for a serial list: each item a count or a percentage of all hosts
    (at least 1), the last item repeated until no host is left."""
    batches, rest, index = [], list(hosts), 0
    while rest:
        item = serial[min(index, len(serial) - 1)]
        size = (int(float(str(item).rstrip("%")) * len(hosts) / 100) if str(item).endswith("%")
                else int(item))
        size = max(size, 1)
        batches.append(rest[:size])
        rest, index = rest[size:], index + 1
    return batches


HOST_MENTION = re.compile(r"^\S+: \[([^\]\s]+)(?: -> [^\]]+)?\]", re.M)


def batches_run(text, play=DEPLOY_PLAY):
    """The hosts of each batch of `play`, in order, from ansible-playbook's default output."""
    batches = []
    for chunk in re.split(r"^PLAY ", text, flags=re.M)[1:]:
        if not chunk.startswith(f"[{play}]"):
            continue
        seen = []
        for host in HOST_MENTION.findall(chunk):
            if host not in seen:
                seen.append(host)
        batches.append(seen)
    return batches


def agent_variant(tree, version, refused=False):
    """The tree's agent with another AGENT_VERSION; refused: heartbeats to a path the server
    does not serve (404), so the new process is never heard and the role rolls it back."""
    source = (tree / "agent" / "heartbeat_agent.py").read_text()
    source, count = re.subn(r'^AGENT_VERSION = "[^"]+"', f'AGENT_VERSION = "{version}"', source,
                            count=1, flags=re.M)
    if refused:
        source = source.replace('"{}/api/heartbeat/{}/"', '"{}/api/no-such-endpoint/{}/"')
        assert "no-such-endpoint" in source, "the agent's legacy URL line changed"
    assert count == 1, "no AGENT_VERSION line in agent/heartbeat_agent.py"
    path = ds.WORK / f"agent-{version}.py"
    path.write_text(source)
    return path


# --- the fleet --------------------------------------------------------------------------------

class Fleet:
    """N test hosts named PREFIX-NNN, reached over SSH, and the receiver they report to."""

    def __init__(self, n, prefix=PREFIX, label=LABEL, port=PORT):
        self.n, self.label, self.port = n, label, port
        self.names = [f"{prefix}{i:03d}" for i in range(1, n + 1)]
        self.hosts = [f"bench-{i:02d}" for i in range(1, n + 1)]  # ds.write_inventory's names
        self.receiver = None

    def start(self):
        ds.WORK.mkdir(parents=True, exist_ok=True)
        ds.ensure_seeded_image()
        ds.ensure_ssh_image(ds.SEEDED_IMAGE)
        pub = str(ds.ssh_key().with_suffix(".pub"))

        def one(item):
            i, name = item
            testhost.start(name, ds.SEEDED_IMAGE, hostname=f"bench-{i:02d}", labels=[self.label],
                           replace=True, ssh_user="root", ssh_key=pub, wait=False)

        with ThreadPoolExecutor(START_WORKERS) as pool:
            list(pool.map(one, enumerate(self.names, 1)))
        testhost.wait_booted(self.names, timeout=900)
        with ThreadPoolExecutor(START_WORKERS) as pool:
            list(pool.map(lambda name: self.sh(name, SEED_STAMP), self.names))
        self.inventory = ds.write_inventory(self.names, conn="ssh", port=self.port)
        self.receiver = ds.start_receiver(self.port, ds.WORK / f"receiver-{self.port}.log")

    def stop(self):
        if self.receiver:
            self.receiver.stop()
        own = set(testhost.names_with_label(self.label))
        mine = [name for name in self.names if name in own]
        if mine:
            ds.podman("rm", "-f", "-t", "0", *mine, check=False, timeout=900)

    def sh(self, name, script):
        return ds.podman("exec", name, "sh", "-c", script)

    def heard_since(self, ids, moment, timeout):
        """The ids among `ids` not heard after `moment` (UTC) within timeout seconds."""
        deadline = time.monotonic() + timeout
        silent = set(ids)
        while silent and time.monotonic() < deadline:
            time.sleep(2)
            try:
                servers = self.receiver.status()["servers"]
            except OSError:
                continue
            for server in servers:
                seen = server.get("last_heartbeat")
                if seen and datetime.fromisoformat(seen.replace("Z", "+00:00")) > moment:
                    silent.discard(int(server["id"]))
        return sorted(silent)


def machine_state():
    inotify = 0
    for fd_dir in Path("/proc").glob("[0-9]*/fd"):
        try:
            inotify += sum(1 for fd in fd_dir.iterdir()
                           if os.readlink(fd) == "anon_inode:inotify")
        except OSError:
            continue
    meminfo = dict(line.split(":", 1) for line in Path("/proc/meminfo").read_text().splitlines())
    return {"loadavg": ds.loadavg(), "inotify_instances": inotify,
            "inotify_limit": int(Path("/proc/sys/fs/inotify/max_user_instances").read_text()),
            "processes": sum(1 for p in Path("/proc").iterdir() if p.name.isdigit()),
            "mem_available_mib": int(meminfo["MemAvailable"].split()[0]) // 1024}


def timed_run(fleet, tree, tag, extra):
    spec = ds.variant("role", serial=None, conn="ssh", note="default ramp")
    spec["env"] = {"ANSIBLE_SSH_CONTROL_PATH_DIR": str(ds.WORK / "cp" / f"fr{int(time.time())}")}
    cgroups = ds.cpu_files([n for i, n in enumerate(fleet.names, 1) if i not in STOPPED])
    result = ds.run_playbook(tag, tree, fleet.inventory, spec, extra, cgroups)
    result["text"] = (ROOT / result["log"]).read_text()
    return result


def check(checks, name, ok, detail=""):
    checks.append({"check": name, "ok": bool(ok), **({"detail": detail} if not ok else {})})
    log(f"{'ok  ' if ok else 'FAIL'} {name}{'' if ok else ': ' + str(detail)[:400]}")


def rollout(fleet, tree, version, serial, checks):
    """The first deploy with hosts down and broken: skipped, named, the rest deployed."""
    stopped = [fleet.hosts[i - 1] for i in STOPPED]
    broken = [fleet.hosts[i - 1] for i in BROKEN]
    for i in BROKEN:
        fleet.sh(fleet.names[i - 1], BREAK_APT)
    ds.podman("stop", "-t", "1", *[fleet.names[i - 1] for i in STOPPED])
    report_path = ds.WORK / "fleet_rollout_report.json"
    report_path.unlink(missing_ok=True)
    before = machine_state()
    log(f"rollout to {fleet.n} hosts ({len(stopped)} stopped, {len(broken)} broken); "
        f"load {before['loadavg']}")
    result = timed_run(fleet, tree, f"fleet-rollout-{fleet.n}", {
        "stacksense_deploy_report": str(report_path), "stacksense_interval": INTERVAL_S,
        "stacksense_verify_timeout": VERIFY_TIMEOUT_S})
    text = result.pop("text")
    report = json.loads(report_path.read_text()) if report_path.exists() else {}
    hosts = report.get("hosts", {})
    healthy = [h for h in fleet.hosts if h not in stopped + broken]
    check(checks, "the run exits 2 (hosts left without the new agent)", result["rc"] == 2,
          result["rc"])
    expected = {"deployed": len(healthy), "unreachable": len(stopped), "broken": len(broken)}
    check(checks, f"the report counts {expected}", report.get("counts") == expected,
          report.get("counts"))
    check(checks, "the report names the stopped hosts unreachable, with a reason",
          all(hosts.get(h, {}).get("outcome") == "unreachable" and hosts[h]["reason"]
              for h in stopped), {h: hosts.get(h) for h in stopped})
    check(checks, "the report names the broken hosts broken (packages)",
          all(hosts.get(h, {}).get("outcome") == "broken" and "packages" in hosts[h]["reason"]
              for h in broken), {h: hosts.get(h) for h in broken})
    check(checks, "the report's incomplete hosts are exactly the stopped and broken",
          report.get("incomplete") == sorted(stopped + broken), report.get("incomplete"))
    summary = "\n".join(report.get("summary", []))
    printed = text[text.rfind("TASK [Say what happened to each host]"):]
    check(checks, "the printed summary counts and names each stopped and broken host",
          all(re.search(rf"{re.escape(h)}\b", printed) for h in stopped + broken)
          and report.get("summary", ["?"])[0] in printed, summary)
    expect_batches = ramp_batches(fleet.hosts, serial)
    ran = batches_run(text)
    check(checks, f"the batches are the ramp's {[len(b) for b in expect_batches]}",
          [sorted(b) for b in ran] == [sorted(b) for b in expect_batches], ran)
    ids = [fleet.hosts.index(h) + 1 for h in healthy]
    heard = wait_versions(fleet.receiver, ids, version)
    check(checks, f"every healthy host ({len(healthy)}) is heard with {version}", not heard,
          heard)
    return {"wall_s": result["wall_s"], "controller_cpu_s": result["controller_cpu_s"],
            "hosts_cpu_s": result["hosts_cpu_s"], "rc": result["rc"],
            "peak_rss_mib": result["mem"]["rss_kib"] // 1024,
            "peak_pss_mib": result["mem"]["pss_kib"] // 1024,
            "peak_procs": result["mem"]["procs"], "loadavg_before": result["loadavg_before"],
            "loadavg_after": result["loadavg_after"], "batches": [len(b) for b in ran],
            "counts": report.get("counts"), "summary": report.get("summary"),
            "named": {h: hosts.get(h) for h in stopped + broken}, "log": result["log"],
            "machine_before": before}


def wait_versions(receiver, ids, version, timeout=90):
    """The ids not heard with `version` as their last heartbeat within timeout seconds."""
    deadline = time.monotonic() + timeout
    missing = list(ids)
    while missing and time.monotonic() < deadline:
        try:
            seen = receiver.versions()
        except OSError:
            seen = {}
        missing = [i for i in ids if seen.get(i) != version]
        if missing:
            time.sleep(2)
    return missing


def bad_version(fleet, tree, version, checks):
    """A version whose heartbeats are refused: stops at the canary, rolled back, all heard."""
    stopped = [fleet.hosts[i - 1] for i in STOPPED]
    broken = [fleet.hosts[i - 1] for i in BROKEN]
    deployed = [h for h in fleet.hosts if h not in stopped + broken]
    bad = agent_variant(tree, BAD_VERSION, refused=True)
    report_path = ds.WORK / "fleet_rollout_bad_report.json"
    report_path.unlink(missing_ok=True)
    log(f"bad version {BAD_VERSION} to the same fleet")
    result = timed_run(fleet, tree, f"fleet-rollout-{fleet.n}-bad", {
        "stacksense_deploy_report": str(report_path), "stacksense_interval": INTERVAL_S,
        "stacksense_verify_timeout": VERIFY_TIMEOUT_S, "stacksense_agent_source": str(bad)})
    ended = datetime.now(timezone.utc)
    text = result.pop("text")
    report = json.loads(report_path.read_text()) if report_path.exists() else {}
    counts = report.get("counts") or {}
    ran = batches_run(text)
    canary = fleet.hosts[0]
    check(checks, "the bad version's run fails", result["rc"] != 0, result["rc"])
    check(checks, "it stops after the canary's batch", ran == [[canary]], ran)
    check(checks, "the canary was rolled back, no other host attempted",
          counts == {"rolled back": 1, "not attempted": fleet.n - 1}
          and report["hosts"][canary]["outcome"] == "rolled back"
          and "bad version" in (report.get("stopped") or ""), report.get("summary"))
    holding = []
    for host in deployed:
        name = fleet.names[fleet.hosts.index(host)]
        line = ds.podman("exec", name, "grep", "-m1", "^AGENT_VERSION",
                         "/opt/stacksense-heartbeat/heartbeat_agent.py", check=False).stdout
        if BAD_VERSION in line:
            holding.append(host)
    check(checks, "no host holds the bad agent file afterwards", not holding, holding)
    ids = [fleet.hosts.index(h) + 1 for h in deployed]
    silent = fleet.heard_since(ids, ended, timeout=3 * INTERVAL_S + 15)
    check(checks, f"every deployed host ({len(ids)}) is heard after the run", not silent, silent)
    still = wait_versions(fleet.receiver, ids, version, timeout=5)
    check(checks, f"... with the old version {version}", not still, still)
    return {"wall_s": result["wall_s"], "controller_cpu_s": result["controller_cpu_s"],
            "rc": result["rc"], "batches": [len(b) for b in ran],
            "reached_by_bad_version": sum(len(b) for b in ran),
            "rolled_back": counts.get("rolled back", 0), "counts": counts,
            "stopped": report.get("stopped"), "canary": report.get("hosts", {}).get(canary),
            "peak_rss_mib": result["mem"]["rss_kib"] // 1024, "log": result["log"]}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--hosts", type=int, default=100)
    parser.add_argument("--tree", default="HEAD", help="git revision to run (deploy_scale.py)")
    parser.add_argument("--results", type=Path, default=ds.WORK / "fleet_rollout.json")
    args = parser.parse_args(argv)
    if args.hosts < max(STOPPED):
        raise SystemExit(f"--hosts must be at least {max(STOPPED)} (the stopped hosts' places)")

    def interrupted(*_):
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, interrupted)
    tree, label = ds.snapshot(args.tree)
    version = re.search(r'^AGENT_VERSION = "([^"]+)"',
                        (tree / "agent" / "heartbeat_agent.py").read_text(), re.M)[1]
    serial = default_serial(tree / "playbooks" / "deploy.yml")
    fleet, checks = Fleet(args.hosts), []
    result = {"hosts": args.hosts, "tree": label, "date": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
              "serial": serial, "stopped": [fleet.hosts[i - 1] for i in STOPPED],
              "broken": [fleet.hosts[i - 1] for i in BROKEN], "checks": checks}
    began = time.monotonic()
    try:
        before = machine_state()
        log(f"starting {args.hosts} containers ({START_WORKERS} at a time); {before}")
        fleet.start()
        result["start_s"] = round(time.monotonic() - began, 1)
        time.sleep(20)
        result["machine_idle_fleet"] = machine_state()
        log(f"{args.hosts} hosts up in {result['start_s']} s; {result['machine_idle_fleet']}")
        result["rollout"] = rollout(fleet, tree, version, serial, checks)
        result["bad"] = bad_version(fleet, tree, version, checks)
    finally:
        stop_began = time.monotonic()
        fleet.stop()
        result["cleanup_s"] = round(time.monotonic() - stop_began, 1)
        result["total_s"] = round(time.monotonic() - began, 1)
        save(result, args.results)
    return verdict(result, checks)


def save(result, path):
    """The whole result as JSON (also when the run was cut short)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=1))


def verdict(result, checks):
    """Print the result without the checks' detail and say how many passed: exit status."""
    print(json.dumps({k: v for k, v in result.items() if k != "checks"}, indent=1))
    failed = [c for c in checks if not c["ok"]]
    log(f"{len(checks) - len(failed)} of {len(checks)} checks passed")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
