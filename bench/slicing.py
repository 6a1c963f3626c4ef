#!/usr/bin/env python3
"""Job slicing as AWX runs it: playbooks/deploy.yml as N ansible-runner jobs at once.

AWX's job slicing turns one job into N jobs ("slices"), each with the same playbook, extra
vars and credentials and an inventory holding every N-th host of the job's inventory (slice
k: hosts k-1, k-1+N, k-1+2N, ...), scheduled on whatever execution node has capacity, at the
same time. Here each slice is an `ansible-runner run` process with its own private data dir in
AWX's layout (project/ a copy of the project with its links kept, inventory/hosts an
inventory script, env/ssh_key the machine credential, env/cmdline its user and the job
template's forks, env/extravars), all started together, on H fresh debian12 hosts reached over
SSH (bench/fleet_rollout.py's fleet). The execution environment is not used: the runner and
ansible-core are the controller's (.venv); `make ee-test` covers the EE.

  deploy  a first deploy, sliced: each slice must be a rollout of its own, with its own
          canary (its first host), the ramp's batches over its own hosts, its own summary
          and JSON report; every host must be heard with the agent's version
  bad     a version whose heartbeats the server refuses, sliced: each slice must stop at its
          own canary (rolled back, the rest not attempted), so the bad version meets N hosts;
          every host must still be heard, with the old version

Prints one JSON document (also build/deploy_scale/slicing.json); exits 1 when a check failed.

    flock /tmp/stacksense-heavy.lock .venv/bin/python bench/slicing.py [--hosts 10] [--slices 2]

Heavy: starts containers (run it under /tmp/stacksense-heavy.lock): stacksense-slice-NNN
(label stacksense.bench=slicing), removed at the end; the receiver listens on port 18292.
"""

import argparse
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "bench"))
import deploy_scale as ds  # noqa: E402
import fleet_rollout as fr  # noqa: E402  (the fleet, the ramp, the bad version)

PREFIX = "stacksense-slice-"
LABEL = "stacksense.bench=slicing"
PORT = 18292
WORK = ds.WORK / "slicing"
INVENTORY_SCRIPT = "#!/bin/sh\n# AWX's inventory of one slice\ncat <<'EOF'\n{inventory}\nEOF\n"


def log(msg):
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def slice_hosts(hosts, number, count):
    """AWX's slice `number` (1-based) of `count`: every count-th host from the number-th."""
    return list(hosts)[number - 1::count]


def private_data_dir(path, tree, hosts, group_vars, key, forks=25):
    """One slice job's directory in AWX's layout (see the module docstring)."""
    shutil.rmtree(path, ignore_errors=True)
    shutil.copytree(tree, path / "project", symlinks=True)  # as AWX copies a project
    inventory = {"stacksense_agents": {"hosts": [h for h, _ in hosts], "vars": group_vars},
                 "_meta": {"hostvars": dict(hosts)}}
    (path / "inventory").mkdir()
    script = path / "inventory" / "hosts"
    script.write_text(INVENTORY_SCRIPT.format(inventory=json.dumps(inventory, indent=1)))
    script.chmod(0o755)
    (path / "env").mkdir()
    shutil.copyfile(key, path / "env" / "ssh_key")
    (path / "env" / "ssh_key").chmod(0o600)
    (path / "env" / "cmdline").write_text(f"-u root --forks {forks}")
    (path / "env" / "envvars").write_text(json.dumps({"ANSIBLE_NOCOLOR": "1"}))
    return path


def run_slices(pdds, ident, extravars):
    """Start every slice's job at once (as AWX's workflow does); wait for all of them."""
    jobs = []
    for pdd in pdds:
        (pdd / "env" / "extravars").write_text(json.dumps(
            dict(extravars, stacksense_deploy_report=str(pdd / f"report-{ident}.json"))))
        shutil.rmtree(pdd / "artifacts" / ident, ignore_errors=True)
        env = dict(os.environ, PATH=f"{ds.VENV_BIN}:{os.environ.get('PATH', '')}")
        env.pop("ANSIBLE_CONFIG", None)  # the project's ansible.cfg, as in AWX
        out = open(pdd / f"runner-{ident}.log", "w")  # noqa: SIM115 (closed below)
        jobs.append((pdd, out, time.monotonic(), subprocess.Popen(
            [str(ds.VENV_BIN / "ansible-runner"), "run", str(pdd), "-p", "playbooks/deploy.yml",
             "--ident", ident], env=env, stdout=out, stderr=subprocess.STDOUT)))
    results = []
    for pdd, out, started, process in jobs:
        process.wait()
        out.close()
        results.append(job_result(pdd, ident, started))
    return results


def job_result(pdd, ident, started):
    """status, rc, each batch of the deploy play (from the job events), report, stdout."""
    artifacts = pdd / "artifacts" / ident
    events = sorted((json.loads(p.read_text()) for p in (artifacts / "job_events").glob("*.json")),
                    key=lambda event: event["counter"])
    batches, current = [], None
    for event in events:
        data = event.get("event_data", {})
        if event["event"] == "playbook_on_play_start":
            current = [] if data.get("play") == fr.DEPLOY_PLAY else None
            if current is not None:
                batches.append(current)
        elif event["event"].startswith("runner_on_") and current is not None:
            host = data.get("host")
            if host and host not in current:
                current.append(host)
    report = pdd / f"report-{ident}.json"
    return {"slice": pdd.name, "status": (artifacts / "status").read_text().strip(),
            "rc": int((artifacts / "rc").read_text().strip()),
            "wall_s": round(time.monotonic() - started, 1),
            "started": min((e.get("created", "") for e in events), default=""),
            "ended": max((e.get("created", "") for e in events), default=""),
            "batches": batches, "report": json.loads(report.read_text()) if report.exists() else {},
            "stdout": (artifacts / "stdout").read_text()}


def summarise(job):
    return {k: v for k, v in job.items() if k not in ("stdout", "report")} | {
        "counts": job["report"].get("counts"), "stopped": job["report"].get("stopped"),
        "summary": job["report"].get("summary")}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--hosts", type=int, default=10)
    parser.add_argument("--slices", type=int, default=2)
    parser.add_argument("--tree", default="HEAD", help="git revision to run (deploy_scale.py)")
    parser.add_argument("--results", type=Path, default=ds.WORK / "slicing.json")
    args = parser.parse_args(argv)

    def interrupted(*_):
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, interrupted)
    tree, label = ds.snapshot(args.tree)
    version = re.search(r'^AGENT_VERSION = "([^"]+)"',
                        (tree / "agent" / "heartbeat_agent.py").read_text(), re.M)[1]
    serial = fr.default_serial(tree / "playbooks" / "deploy.yml")
    fleet, checks = fr.Fleet(args.hosts, PREFIX, LABEL, PORT), []
    result = {"hosts": args.hosts, "slices": args.slices, "tree": label, "serial": serial,
              "date": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "checks": checks}
    check = fr.check
    try:
        fleet.start()
        inventory = json.loads(fleet.inventory.read_text())["all"]["children"]["stacksense_agents"]
        group_vars = {k: v for k, v in inventory["vars"].items()
                      if k not in ("ansible_user", "ansible_ssh_private_key_file")}
        hosts = list(inventory["hosts"].items())
        slices = [slice_hosts(hosts, k, args.slices) for k in range(1, args.slices + 1)]
        pdds = [private_data_dir(WORK / f"slice-{k}", tree, part, group_vars, ds.ssh_key())
                for k, part in enumerate(slices, 1)]
        names = [[h for h, _ in part] for part in slices]
        result["slice_hosts"] = names
        settings = {"stacksense_interval": fr.INTERVAL_S,
                    "stacksense_verify_timeout": fr.VERIFY_TIMEOUT_S}
        ids = [fleet.hosts.index(h) + 1 for h in fleet.hosts]

        log(f"deploy: {args.slices} slices of {[len(n) for n in names]} hosts, at once")
        jobs = run_slices(pdds, "deploy", settings)
        result["deploy"] = [summarise(job) for job in jobs]
        for job, part in zip(jobs, names):
            tag = f"{job['slice']} ({', '.join(part)})"
            check(checks, f"{tag}: job successful", job["status"] == "successful",
                  job["stdout"][-3000:])
            expect = fr.ramp_batches(part, serial)
            check(checks, f"{tag}: its own canary {part[0]}, batches {[len(b) for b in expect]}",
                  [sorted(b) for b in job["batches"]] == [sorted(b) for b in expect],
                  job["batches"])
            check(checks, f"{tag}: its own report, {len(part)} deployed",
                  job["report"].get("counts") == {"deployed": len(part)}
                  and sorted(job["report"].get("hosts", {})) == sorted(part), job["report"])
            first_line = job["report"].get("summary", ["?"])[0]
            check(checks, f"{tag}: its own printed summary '{first_line}'",
                  first_line == f"{len(part)} hosts: {len(part)} deployed"
                  and first_line in job["stdout"], first_line)
        overlap = max(j["started"] for j in jobs) < min(j["ended"] for j in jobs)
        check(checks, "the slices ran at the same time", overlap,
              [(j["started"], j["ended"]) for j in jobs])
        missing = fr.wait_versions(fleet.receiver, ids, version)
        check(checks, f"every host heard with {version}", not missing, missing)

        bad = fr.agent_variant(tree, fr.BAD_VERSION, refused=True)
        log(f"bad version {fr.BAD_VERSION}: {args.slices} slices at once")
        jobs = run_slices(pdds, "bad", dict(settings, stacksense_agent_source=str(bad)))
        ended = datetime.now(timezone.utc)
        result["bad"] = [summarise(job) for job in jobs]
        for job, part in zip(jobs, names):
            tag = f"{job['slice']}"
            check(checks, f"{tag}: job failed", job["status"] == "failed", job["status"])
            check(checks, f"{tag}: stopped at its own canary {part[0]}",
                  job["batches"] == [[part[0]]], job["batches"])
            hosts_of = job["report"].get("hosts", {})
            check(checks, f"{tag}: canary rolled back, {len(part) - 1} not attempted",
                  job["report"].get("counts") == {"rolled back": 1, "not attempted": len(part) - 1}
                  and hosts_of.get(part[0], {}).get("outcome") == "rolled back",
                  job["report"].get("summary"))
        result["reached_by_bad_version"] = sum(len(b) for job in jobs for b in job["batches"])
        check(checks, f"the bad version met {args.slices} hosts (one canary per slice)",
              result["reached_by_bad_version"] == args.slices, result["reached_by_bad_version"])
        silent = fleet.heard_since(ids, ended, timeout=3 * fr.INTERVAL_S + 15)
        check(checks, "every host heard after the bad run", not silent, silent)
        still = fr.wait_versions(fleet.receiver, ids, version, timeout=5)
        check(checks, f"... with the old version {version}", not still, still)
    finally:
        fleet.stop()
        fr.save(result, args.results)
    return fr.verdict(result, checks)


if __name__ == "__main__":
    sys.exit(main())
