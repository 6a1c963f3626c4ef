#!/usr/bin/env python3
"""Interrupted anywhere, no host is left silent: upgrades of playbooks/deploy.yml, interrupted.

On N fresh debian12 test hosts reached over SSH (as bench/deploy_scale.py starts them; host 1
has a 4 MiB tmpfs as its install directory, so that its disk can be filled), with the reference
receiver on the loopback, it deploys an agent, then for each interruption upgrades to a new
AGENT_VERSION and interrupts the upgrade. Where: at a task banner of the run's own output
("TASK [...]": ansible-playbook prints it when the task before it has ended on every host of
the batch), so that the points follow the playbook, not a clock; an uninterrupted upgrade is
run first to count its banners (T).

  kill@K     the controller (ansible-playbook and every process of its session) is killed
             with SIGKILL at banner K: right as task K starts when K is even, 0.4 s into it
             (its module running on the hosts) when K is odd. By default K = 1 .. T: after
             each task of the upgrade in turn (--kills N: N banners spread evenly)
  ssh-drop   host 2's SSH sessions are killed (sshd) at 40 % and 70 % of the banners:
             Ansible loses the host mid-run
  reboot     host 2 restarts (podman restart) at 50 % and 80 % of the banners
  dpkg-lock  python3-requests is removed from host 1 and its dpkg lock held (fcntl, as apt
             holds it) for the whole run: apt gives up after its lock timeout
  disk-full  host 1's install directory is full: the new agent cannot be written

An interruption that finds the run already ended did not interrupt anything: it is reported
apart ("missed") and not counted. After each: every host must be heard by the receiver after
the interruption (a heartbeat newer than it, from the old agent or the new); then the cause is
removed, one more run must converge (exit 0, the new version heard from every host) and the
next run must change nothing (changed=0). Prints one line per interruption (with the task it
landed in) and a JSON summary; exits 1 when a host was left silent or a run did not converge.

    .venv/bin/python bench/interrupt.py [--hosts 3] [--kills N] [--only kill ssh-drop ...]

Heavy: starts containers (run it under /tmp/stacksense-heavy.lock). Containers are
stacksense-bench-NN (deploy_scale.py's names), removed at the end.
"""

import argparse
import contextlib
import json
import os
import re
import signal
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "bench"))
sys.path.insert(0, str(ROOT / "scripts"))
import deploy_scale as ds  # noqa: E402  (containers, inventory, receiver)
import testhost  # noqa: E402

INTERVAL = 5
HEARD_WITHIN = 3 * INTERVAL + 10
INSTALL_DIR = "/opt/stacksense-heartbeat"
RECAP = re.compile(r"^(\S+)\s+:\s+ok=\d+\s+changed=(\d+)\s+unreachable=(\d+)\s+failed=(\d+)", re.M)


def log(msg):
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def agent_with_version(version):
    source = (ROOT / "agent" / "heartbeat_agent.py").read_text()
    new = re.sub(r'^AGENT_VERSION = "[^"]+"', f'AGENT_VERSION = "{version}"', source,
                 count=1, flags=re.M)
    path = ds.WORK / f"agent-{version}.py"
    path.write_text(new)
    return path


class Fleet:
    def __init__(self, n):
        self.n = n
        ds.WORK.mkdir(parents=True, exist_ok=True)
        ds.LOGS.mkdir(parents=True, exist_ok=True)
        self.receiver = None
        self.names = [f"{ds.PREFIX}{i:02d}" for i in range(1, n + 1)]
        self.runs = 0

    def start(self):
        ds.ensure_seeded_image()
        pub = str(ds.ssh_key().with_suffix(".pub"))
        for i, name in enumerate(self.names, 1):
            testhost.start(name, ds.SEEDED_IMAGE, hostname=f"bench-{i:02d}", labels=[ds.LABEL],
                           replace=True, ssh_user="root", ssh_key=pub, wait=False,
                           tmpfs=[f"{INSTALL_DIR}:size=4m,mode=0755"] if i == 1 else ())
        testhost.wait_booted(self.names, timeout=600)
        for name in self.names:
            self.sh(name, "mkdir -p /var/lib/apt/periodic && touch "
                          "/var/lib/apt/periodic/update-success-stamp /var/lib/apt/lists")
        self.inventory = ds.write_inventory(self.names, conn="ssh")
        self.receiver = ds.start_receiver()

    def stop(self):
        if self.receiver:
            self.receiver.stop()
        ds.remove_containers(self.names)

    def sh(self, name, script, check=True):
        return ds.podman("exec", name, "sh", "-c", script, check=check)

    def command(self, agent):
        return [str(ds.VENV_BIN / "ansible-playbook"), "-i", str(self.inventory),
                str(ROOT / "playbooks" / "deploy.yml"), "-e",
                json.dumps({"stacksense_agent_source": str(agent), "stacksense_interval": INTERVAL,
                            "stacksense_verify_timeout": 30, "stacksense_serial": ["100%"],
                            "stacksense_max_skipped_percent": 100})]

    def launch(self, agent, tag):
        self.runs += 1
        logpath = ds.LOGS / f"interrupt-{self.runs:03d}-{tag}.log"
        out = open(logpath, "w")  # noqa: SIM115 (closed by the caller, when the run ends)
        env = dict(os.environ, PATH=f"{ds.VENV_BIN}:{os.environ.get('PATH', '')}",
                   CONTAINERS_CONF=str(ds.CONTAINERS_CONF), ANSIBLE_NOCOLOR="1", NO_COLOR="1",
                   ANSIBLE_CONFIG=str(ROOT / "ansible.cfg"))
        env["PYTHONUNBUFFERED"] = "1"
        process = subprocess.Popen(self.command(agent), cwd=ROOT, env=env,
                                   stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                   start_new_session=True, text=True, bufsize=1)
        return process, out, logpath

    def run(self, agent, tag):
        process, out, logpath = self.launch(agent, tag)
        start = time.monotonic()
        banners = follow(process, out)
        rc = process.wait()
        out.close()
        text = logpath.read_text()
        changed = sum(int(m[1]) for m in RECAP.findall(text))
        return {"rc": rc, "changed": changed, "wall_s": round(time.monotonic() - start, 1),
                "banners": banners, "log": str(logpath.relative_to(ROOT))}

    def heard_after(self, moment, timeout=HEARD_WITHIN):
        """Server ids not heard since `moment` (UTC datetime) within timeout seconds."""
        deadline = time.monotonic() + timeout
        silent = set(range(1, self.n + 1))
        while silent and time.monotonic() < deadline:
            time.sleep(1)
            try:
                status = self.receiver.status()
            except OSError:
                continue
            servers = status.get("servers", status) if isinstance(status, dict) else status
            for server in servers:
                seen = server.get("last_heartbeat")
                if seen and datetime.fromisoformat(seen.replace("Z", "+00:00")) > moment:
                    silent.discard(int(server["id"]))
        return sorted(silent)

    def versions(self):
        return self.receiver.versions()


def follow(process, out, at_banner=None, delay=0.0, action=None):
    """Copy the run's output to its log; call action(process) `delay` seconds after the
    at_banner-th task banner. Returns the number of banners, or with an action
    (banners, the task it landed in or None when the run had ended before it)."""
    banners, landed = 0, None
    for line in process.stdout:
        out.write(line)
        if line.startswith("TASK ["):
            banners += 1
            if action is not None and banners == at_banner:
                out.flush()
                if delay:
                    time.sleep(delay)
                if process.poll() is None:
                    landed = line.strip(" *\n")
                    out.write("=== interrupt.py: interrupted here ===\n")
                    action(process)
    if action is None:
        return banners
    return banners, landed


def interrupt_run(fleet, agent, tag, at_banner, delay, action):
    """Start an upgrade, call action() at a banner, let the run end (or be killed)."""
    process, out, logpath = fleet.launch(agent, tag)
    moment = datetime.now(timezone.utc)
    try:
        _, landed = follow(process, out, at_banner, delay, action)
        process.wait(timeout=600)
    finally:
        out.close()
    return moment, landed, logpath


def kill_controller(process):
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGKILL)


def trial(fleet, number, kind, at_banner, results):
    version = f"9.{number}.0+interrupt"
    agent = agent_with_version(version)
    host1, host2 = fleet.names[0], fleet.names[min(1, fleet.n - 1)]
    cleanup = None
    delay = 0.4 if at_banner % 2 else 0.0
    if kind == "kill":
        action = kill_controller
    elif kind == "ssh-drop":
        def action(_process):
            fleet.sh(host2, "pkill -KILL -f 'sshd: root' || true", check=False)
    elif kind == "reboot":
        def action(_process):
            ds.podman("restart", "-t", "0", host2)
    elif kind == "dpkg-lock":
        fleet.sh(host1, "dpkg --remove --force-depends python3-requests >/dev/null 2>&1")
        fleet.sh(host1, "nohup python3 -c 'import fcntl, time; f = open(\"/var/lib/dpkg/"
                        "lock-frontend\", \"w\"); fcntl.lockf(f, fcntl.LOCK_EX); time.sleep(900)'"
                        " >/dev/null 2>&1 &")
        at_banner, delay = 1, 0.0

        def action(_process):
            pass

        def cleanup():
            fleet.sh(host1, "pkill -f 'lock-frontend' || true", check=False)
    elif kind == "disk-full":
        fleet.sh(host1, f"dd if=/dev/zero of={INSTALL_DIR}/fill bs=64k 2>/dev/null; sync; true")
        at_banner, delay = 1, 0.0

        def action(_process):
            pass

        def cleanup():
            fleet.sh(host1, f"rm -f {INSTALL_DIR}/fill")
    else:
        raise ValueError(kind)
    moment, landed, logpath = interrupt_run(fleet, agent, f"{kind}-{number}", at_banner, delay,
                                            action)
    if kind in ("dpkg-lock", "disk-full"):
        landed = "the whole run"
    silent = fleet.heard_after(moment)
    if cleanup:
        cleanup()
    if kind == "reboot":  # sshd must be back, perhaps at a new address, before converging
        testhost.wait_booted([host2], timeout=300)
        fleet.inventory = ds.write_inventory(fleet.names, conn="ssh")
    converge = fleet.run(agent, f"converge-{number}")
    seen = fleet.versions()
    again = fleet.run(agent, f"again-{number}")
    converged = (converge["rc"] == 0 and again["rc"] == 0 and again["changed"] == 0
                 and all(seen.get(i) == version for i in range(1, fleet.n + 1)))
    result = {"n": number, "kind": kind, "at_banner": at_banner, "delay_s": delay,
              "landed": landed, "silent": silent,
              "interrupted_log": str(logpath.relative_to(ROOT)),
              "converge": converge, "again": again, "converged": converged}
    results.append(result)
    log(f"{kind}@{at_banner}{'+' + str(delay) + 's' if delay else ''} in "
        f"{landed or 'nothing (the run had ended: missed)'}: silent={silent or 'none'} "
        f"converge rc={converge['rc']} "
        f"({converge['wall_s']} s) then changed={again['changed']} -> "
        f"{'ok' if converged else 'NOT CONVERGED'}")


def banners_to_kill(total, kills):
    """Every banner 1..total, or `kills` of them spread evenly."""
    if not kills or kills >= total:
        return list(range(1, total + 1))
    if kills == 1:
        return [1]
    return sorted({1 + round(k * (total - 1) / (kills - 1)) for k in range(kills)})


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--hosts", type=int, default=3)
    parser.add_argument("--kills", type=int, default=0,
                        help="kill at this many banners spread evenly (default: at every one)")
    parser.add_argument("--only", nargs="*",
                        default=["kill", "ssh-drop", "reboot", "dpkg-lock", "disk-full"])
    parser.add_argument("--results", type=Path, default=ds.WORK / "interrupt.json")
    args = parser.parse_args(argv)
    fleet = Fleet(args.hosts)
    results = []
    try:
        fleet.start()
        first = fleet.run(agent_with_version("9.0.0+interrupt"), "first")
        if first["rc"] != 0:
            raise SystemExit(f"the first deploy failed: {first['log']}")
        timed = fleet.run(agent_with_version("9.0.1+interrupt"), "timed-upgrade")
        if timed["rc"] != 0:
            raise SystemExit(f"the uninterrupted upgrade failed: {timed['log']}")
        total = timed["banners"]
        log(f"uninterrupted upgrade of {args.hosts} hosts: {timed['wall_s']} s, "
            f"{total} task banners")
        points = {"kill": banners_to_kill(total, args.kills),
                  "ssh-drop": [round(total * 0.4), round(total * 0.7)],
                  "reboot": [round(total * 0.5), round(total * 0.8)],
                  "dpkg-lock": [1], "disk-full": [1]}
        number = 1
        for kind in ("kill", "ssh-drop", "reboot", "dpkg-lock", "disk-full"):
            if kind in args.only:
                for at_banner in points[kind]:
                    trial(fleet, number, kind, at_banner, results)
                    number += 1
    finally:
        fleet.stop()
        args.results.parent.mkdir(parents=True, exist_ok=True)
        args.results.write_text(json.dumps(results, indent=1))
    landed = [r for r in results if r["landed"]]
    silent = [r for r in results if r["silent"]]
    stuck = [r for r in results if not r["converged"]]
    summary = {"interruptions": len(landed), "missed": len(results) - len(landed),
               "left_a_host_silent": len(silent), "did_not_converge": len(stuck),
               "hosts": args.hosts}
    print(json.dumps(summary))
    return 1 if silent or stuck else 0


if __name__ == "__main__":
    sys.exit(main())
