#!/usr/bin/env python3
"""Deploy-at-scale benchmark: playbooks/deploy.yml against bench/baseline.yml on N containers.

For each N and each variant (the role or the baseline, with some settings) it starts N fresh
debian12 containers (systemd as PID 1, podman: scripts/testhost.py, as Molecule does), then times
three runs of the playbook on them:

  first    the first deploy on fresh hosts
  rerun    the same run again (idempotent: must report changed=0)
  upgrade  a rolling upgrade to an agent whose AGENT_VERSION line differs

and, for each run, samples the controller's memory every 0.2 s: the sum of VmRSS (and of
Pss, which counts pages shared by the forked workers once) over ansible-playbook and every
process below it (workers, podman exec/cp). The profile_tasks callback is on for every run;
its per-task times are stored with the result. Every result records /proc/loadavg before and
after the run: the machine is shared.

    PATH=$PWD/.venv/bin:$PATH python bench/deploy_scale.py run --n 1 5 [--apt seeded]
    python bench/deploy_scale.py run --n 20 --variants role-forks5 baseline-forks5
    python bench/deploy_scale.py report [--plot docs/deploy_scale.png]
    python bench/deploy_scale.py cleanup

--apt seeded (default) uses an image derived from localhost/stacksense-test:debian12 whose
apt lists are fresh and whose /var/cache/apt/archives holds python3-requests and its
dependencies (not installed), so the apt task installs without touching the network: the
figures are Ansible's and the role's own cost. --apt network uses the stock image (no apt
lists): every host runs apt-get update and downloads the packages from deb.debian.org.

Results are appended to build/deploy_scale/results.jsonl; logs go to build/deploy_scale/logs.
Containers are named stacksense-bench-NN; the receiver listens on 0.0.0.0:18290. Both are
removed when a run ends (also on Ctrl-C); `cleanup` removes leftovers (only those names).
"""

import argparse
import json
import os
import re
import resource
import shutil
import signal
import statistics
import subprocess
import sys
import threading
import time
from collections import defaultdict
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "scripts"))
import testhost  # noqa: E402  (the one way to start a test host)
from receiver_process import ReceiverError, ReceiverProcess  # noqa: E402

VENV_BIN = ROOT / ".venv" / "bin"
WORK = ROOT / "build" / "deploy_scale"
LOGS = WORK / "logs"
RESULTS = WORK / "results.jsonl"
CONTAINERS_CONF = ROOT / "molecule" / "containers.conf"

STOCK_IMAGE = "localhost/stacksense-test:debian12"
SEEDED_IMAGE = "localhost/stacksense-bench:debian12-aptseed"
PREFIX = "stacksense-bench-"
LABEL = "stacksense.bench=deploy_scale"
RECEIVER_PORT = 18290
UPGRADE_VERSION = "1.0.1+bench"
SAMPLE_EVERY = 0.2
PAGE_KIB = os.sysconf("SC_PAGE_SIZE") // 1024

ALL_IN_ONE_BATCH = {"stacksense_serial": ["100%"]}
PLAYBOOKS = {"role": Path("playbooks") / "deploy.yml", "baseline": Path("bench") / "baseline.yml"}
# The repository is the collection stacksense.fleet (the playbooks name
# stacksense.fleet.stacksense_agent; the role's filters are its plugins): a snapshot needs the
# collection's files and the committed link .collections/ansible_collections/stacksense/fleet.
TREE_PARTS = ["ansible.cfg", "galaxy.yml", "meta", "agent", "roles", "playbooks", "plugins",
              ".collections"]


# No configuration file: Ansible's defaults, as for a user of the installed collection. Only
# the collection's location is given, as an installed collection's would be ({tree} is the
# snapshot the run uses, {work} WORK).
NO_CONFIG = {"ANSIBLE_CONFIG": "{work}/empty.cfg",
             "ANSIBLE_COLLECTIONS_PATH": "{tree}/.collections"}


def variant(playbook, serial=ALL_IN_ONE_BATCH, env=None, note="", conn="podman"):
    return {"playbook": playbook, "extra": serial, "env": env or {}, "note": note, "conn": conn}


# name -> how to run it. "role"/"baseline" are the fair pair (one batch, forks 25).
VARIANTS = {
    "baseline": variant("baseline", note="all hosts in one batch, forks 25"),
    "role": variant("role", note="all hosts in one batch, forks 25"),
    "baseline-rolling": variant("baseline", serial=None, note="default serial [1, '25%']"),
    "role-rolling": variant("role", serial=None, note="default serial [1, '25%']"),
    "baseline-forks5": variant("baseline", env={"ANSIBLE_FORKS": "5"}, note="forks 5"),
    "role-forks5": variant("role", env={"ANSIBLE_FORKS": "5"}, note="forks 5"),
    "role-free": variant("role", env={"ANSIBLE_STRATEGY": "free"}, note="strategy free"),
    "role-factcache": variant("role", env={
        "ANSIBLE_CACHE_PLUGIN": "ansible.builtin.jsonfile",
        "ANSIBLE_CACHE_PLUGIN_CONNECTION": str(WORK / "factcache"),
        "ANSIBLE_CACHE_PLUGIN_TIMEOUT": "86400"}, note="jsonfile fact cache"),
    "role-interp": variant("role", env={"ANSIBLE_PYTHON_INTERPRETER": "/usr/bin/python3"},
                           note="interpreter set, no discovery"),
    "role-noverify": variant("role", serial={**ALL_IN_ONE_BATCH, "stacksense_verify": False},
                             note="stacksense_verify=false"),
    # Over SSH (sshd in the containers, reached at their podman bridge address), as on real
    # hosts: ControlPersist (Ansible's default ssh_args) and pipelining as in ansible.cfg.
    "baseline-ssh": variant("baseline", conn="ssh", note="ssh, pipelining on"),
    "role-ssh": variant("role", conn="ssh", note="ssh, pipelining on"),
    # The playbooks set ansible_pipelining themselves (a play var): only an extra var wins.
    "baseline-ssh-nopipe": variant("baseline", conn="ssh", note="ssh, pipelining off",
                                   serial={**ALL_IN_ONE_BATCH, "ansible_pipelining": False}),
    "role-ssh-nopipe": variant("role", conn="ssh", note="ssh, pipelining off",
                               serial={**ALL_IN_ONE_BATCH, "ansible_pipelining": False}),
    # As `ansible-playbook stacksense.fleet.deploy` runs: no ansible.cfg (Ansible's defaults:
    # forks 5; pipelining from the playbook's play var), then also without that play var (how
    # the collection ran before it had one).
    "role-ssh-nocfg": variant("role", conn="ssh", env=NO_CONFIG,
                              note="ssh, no ansible.cfg (forks 5, the play's pipelining)"),
    # ... and with the forks the README tells collection users to pass (-f 25): what is left
    # of the difference is what only the configuration file can set.
    "role-ssh-nocfg-forks25": variant("role", conn="ssh", env={**NO_CONFIG, "ANSIBLE_FORKS": "25"},
                                      note="ssh, no ansible.cfg, ANSIBLE_FORKS=25"),
    "role-ssh-nocfg-nopipe": variant("role", conn="ssh", env=NO_CONFIG,
                                     serial={**ALL_IN_ONE_BATCH, "ansible_pipelining": False},
                                     note="ssh, no ansible.cfg, pipelining off (before 1.2.0)"),
    "role-ssh-forks5": variant("role", conn="ssh", env={"ANSIBLE_FORKS": "5"},
                               note="ssh, pipelining on, forks 5"),
    "baseline-ssh-rolling": variant("baseline", serial=None, conn="ssh",
                                    note="ssh, default serial [1, '25%']"),
    "role-ssh-rolling": variant("role", serial=None, conn="ssh",
                                note="ssh, default serial [1, '25%']"),
    "baseline-ssh-forks5": variant("baseline", conn="ssh", env={"ANSIBLE_FORKS": "5"},
                                   note="ssh, pipelining on, forks 5"),
}
PHASES = ("first", "rerun", "upgrade")


def log(msg):
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def loadavg():
    return Path("/proc/loadavg").read_text().split()[:3]


def podman(*args, check=True, capture=True, timeout=300):
    env = dict(os.environ, CONTAINERS_CONF=str(CONTAINERS_CONF))
    return subprocess.run(["podman", *args], env=env, check=check, timeout=timeout,
                          stdout=subprocess.PIPE if capture else None,
                          stderr=subprocess.PIPE if capture else None, text=True)


# --- images and containers -------------------------------------------------------------------

def ensure_seeded_image():
    if podman("image", "exists", SEEDED_IMAGE, check=False).returncode == 0:
        return
    log(f"building {SEEDED_IMAGE} (apt lists + python3-requests .debs, not installed)")
    name = PREFIX + "seed"
    podman("rm", "-f", "-t", "0", name, check=False)
    podman("run", "--name", name, "--label", LABEL, STOCK_IMAGE, "sh", "-euc",
           "apt-get -q update >/dev/null; apt-get -qy --download-only install python3-requests "
           ">/dev/null; ls /var/cache/apt/archives/*.deb")
    podman("commit", "--quiet", name, SEEDED_IMAGE)
    podman("rm", "-f", name)


def ssh_key():
    key = WORK / "ssh" / "id_ed25519"
    if not key.exists():
        key.parent.mkdir(parents=True, exist_ok=True)
        subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", "deploy_scale",
                        "-f", str(key)], check=True)
    return key


def ensure_ssh_image(base):
    """`base` plus openssh-server, sshd enabled (scripts/testhost.py); keys go in at start.
    The seeded image keeps its apt lists and .debs (testhost's images drop theirs)."""
    return testhost.ensure_ssh_image(base, keep_apt=base == SEEDED_IMAGE)


def our_containers(prefix=PREFIX):
    out = podman("ps", "-a", "--filter", f"label={LABEL}", "--format", "{{.Names}}").stdout
    return [n for n in out.split() if n.startswith(prefix)]


def remove_containers(names=None, prefix=PREFIX):
    names = our_containers(prefix) if names is None else names
    if names:
        podman("rm", "-f", "-t", "0", *names, check=False, timeout=600)


def start_containers(n, image, seeded, ssh=False, prefix=PREFIX):
    """N fresh test hosts from scripts/testhost.py (ssh: root logs in with this benchmark's key)."""
    names = [f"{prefix}{i:02d}" for i in range(1, n + 1)]
    try:
        for i, name in enumerate(names, 1):
            testhost.start(name, image, hostname=f"bench-{i:02d}", labels=[LABEL], replace=True,
                           ssh_user="root" if ssh else None,
                           ssh_key=str(ssh_key().with_suffix(".pub")) if ssh else None,
                           wait=False)
        # 20 containers on 2 busy cores can take minutes
        testhost.wait_booted(names, timeout=600)
    except testhost.TestHostError as error:
        raise SystemExit(str(error)) from None
    for name in names:
        if seeded:  # apt's cache_valid_time looks at this stamp: lists count as fresh
            podman("exec", name, "sh", "-c", "mkdir -p /var/lib/apt/periodic && "
                   "touch /var/lib/apt/periodic/update-success-stamp /var/lib/apt/lists")
    return names


def addresses(names):
    return [testhost.address(name) for name in names]


def cpu_files(names):
    """Each container's CPU usage counter (cgroup v1 cpuacct.usage in ns, or v2 cpu.stat)."""
    files = []
    for name in names:
        path = podman("inspect", "--format", "{{.State.CgroupPath}}", name).stdout.strip()
        for candidate in (f"/sys/fs/cgroup/cpuacct{path}/cpuacct.usage",
                          f"/sys/fs/cgroup{path}/cpu.stat"):
            if os.path.exists(candidate):
                files.append(candidate)
                break
    return files


def hosts_cpu_s(files):
    """Total CPU seconds used so far inside the containers (modules, apt, systemd, agent)."""
    total = 0.0
    for path in files:
        try:
            text = Path(path).read_text()
        except OSError:
            continue
        if path.endswith("cpuacct.usage"):
            total += int(text) / 1e9
        else:
            total += int(re.search(r"^usage_usec (\d+)", text, re.M)[1]) / 1e6
    return total


# --- receiver --------------------------------------------------------------------------------

def start_receiver(port=RECEIVER_PORT, logpath=WORK / "receiver.log"):
    """The reference receiver, accepting any server id (scripts/receiver_process.py)."""
    try:
        return ReceiverProcess(port, logpath).start()
    except ReceiverError as error:
        raise SystemExit(str(error)) from None


# --- memory sampling -------------------------------------------------------------------------

def process_tree(root):
    children = defaultdict(list)
    comms = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        close = stat.rfind(")")
        comms[int(entry)] = stat[stat.find("(") + 1:close]
        children[int(stat[close + 2:].split()[1])].append(int(entry))
    tree, todo = [], [root]
    while todo:
        pid = todo.pop()
        if pid in comms:
            tree.append((pid, comms[pid]))
        todo.extend(children.get(pid, ()))
    return tree


def rss_pss_kib(pid):
    rss = pss = 0
    try:
        rss = int(Path(f"/proc/{pid}/statm").read_text().split()[1]) * PAGE_KIB
        for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
            if line.startswith("Pss:"):
                pss = int(line.split()[1])
                break
    except (OSError, ValueError, IndexError):
        pass
    return rss, pss


class MemorySampler(threading.Thread):
    def __init__(self, pid):
        super().__init__(daemon=True)
        self.pid, self.done = pid, threading.Event()
        self.peak = {"rss_kib": 0, "pss_kib": 0, "procs": 0, "ansible_rss_kib": 0,
                     "ansible_pss_kib": 0, "samples": 0}

    def run(self):
        while not self.done.is_set():
            rss = pss = a_rss = a_pss = 0
            tree = process_tree(self.pid)
            for pid, comm in tree:
                r, p = rss_pss_kib(pid)
                rss, pss = rss + r, pss + p
                if not comm.startswith("podman"):
                    a_rss, a_pss = a_rss + r, a_pss + p
            peak = self.peak
            peak["samples"] += 1
            for key, value in (("rss_kib", rss), ("pss_kib", pss), ("procs", len(tree)),
                               ("ansible_rss_kib", a_rss), ("ansible_pss_kib", a_pss)):
                peak[key] = max(peak[key], value)
            self.done.wait(SAMPLE_EVERY)


# --- one playbook run ------------------------------------------------------------------------

RECAP = re.compile(r"^(\S+)\s+:\s+ok=(\d+)\s+changed=(\d+)\s+unreachable=(\d+)\s+failed=(\d+)"
                   r"\s+skipped=(\d+)\s+rescued=(\d+)\s+ignored=(\d+)", re.M)
PROFILE_LINE = re.compile(r"^(.*?)\s-{2,}\s+(\d+\.\d+)s\s*$")


def parse_profile(text):
    """profile_tasks' summary: [(task name, seconds)] in execution order."""
    marker = text.rfind("=" * 40)
    rows = []
    if marker >= 0:
        for line in text[marker:].splitlines()[1:]:
            match = PROFILE_LINE.match(line)
            if match:
                rows.append((match.group(1).strip(), float(match.group(2))))
    return rows


def snapshot(rev):
    """A frozen copy of the role, playbooks, agent and ansible.cfg to benchmark.

    Others edit the role while this runs, so the benchmark never runs the working tree
    directly: `rev` is a git revision (extracted with git archive) or "worktree" (a copy of
    the files as they are now). bench/baseline.yml and its template are copied in as well.
    Returns (directory, label).
    """
    if rev == "worktree":
        label = "worktree " + time.strftime("%Y-%m-%dT%H:%M:%S") + " on " + subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, check=True,
            capture_output=True, text=True).stdout.strip()
        tree = WORK / ("tree-worktree-" + time.strftime("%Y%m%d%H%M%S"))
        tree.mkdir(parents=True)
        for part in TREE_PARTS:
            src = ROOT / part
            if src.is_dir() and not src.is_symlink():
                shutil.copytree(src, tree / part, symlinks=True)  # the link points up the tree
            else:
                shutil.copy2(src, tree / part, follow_symlinks=False)
    else:
        sha = subprocess.run(["git", "rev-parse", "--short", rev], cwd=ROOT, check=True,
                             capture_output=True, text=True).stdout.strip()
        label, tree = f"commit {sha}", WORK / f"tree-{sha}"
        if not tree.exists():
            tree.mkdir(parents=True)
            archive = subprocess.run(["git", "archive", sha, *TREE_PARTS], cwd=ROOT, check=True,
                                     capture_output=True).stdout
            subprocess.run(["tar", "-x", "-C", str(tree)], input=archive, check=True)
    shutil.rmtree(tree / "bench", ignore_errors=True)
    (tree / "bench").mkdir()
    shutil.copy2(ROOT / "bench" / "baseline.yml", tree / "bench")
    shutil.copytree(ROOT / "bench" / "templates", tree / "bench" / "templates")
    return tree, label


def run_playbook(tag, tree, inventory, spec, extra_vars, cgroups=()):
    cmd = [str(VENV_BIN / "ansible-playbook"), "-i", str(inventory),
           str(PLAYBOOKS[spec["playbook"]])]
    extra = dict(spec["extra"] or {}, **extra_vars)
    if extra:
        cmd += ["-e", json.dumps(extra)]
    env = dict(os.environ, PATH=f"{VENV_BIN}:{os.environ.get('PATH', '')}",
               CONTAINERS_CONF=str(CONTAINERS_CONF), ANSIBLE_CONFIG=str(tree / "ansible.cfg"),
               ANSIBLE_CALLBACKS_ENABLED="ansible.posix.profile_tasks",
               PROFILE_TASKS_SORT_ORDER="none", PROFILE_TASKS_TASK_OUTPUT_LIMIT="200",
               ANSIBLE_NOCOLOR="1", NO_COLOR="1")
    env.update({key: value.format(tree=tree, work=WORK) for key, value in spec["env"].items()})
    (WORK / "empty.cfg").write_text("# no settings: Ansible's defaults\n")
    LOGS.mkdir(parents=True, exist_ok=True)
    logpath = LOGS / f"{tag}.log"
    before = loadavg()
    cpu_before = resource.getrusage(resource.RUSAGE_CHILDREN)
    hosts_before = hosts_cpu_s(cgroups)
    start = time.monotonic()
    with open(logpath, "w") as out:
        out.write("$ " + " ".join(cmd) + "\n# env: " + json.dumps(spec["env"]) + "\n")
        out.flush()
        process = subprocess.Popen(cmd, cwd=tree, env=env, stdout=out, stderr=subprocess.STDOUT)
        sampler = MemorySampler(process.pid)
        sampler.start()
        try:
            rc = process.wait()
        except BaseException:
            process.terminate()
            process.wait()
            raise
        wall = time.monotonic() - start
        sampler.done.set()
        sampler.join()
    # CPU of ansible-playbook and every process it waited for (workers, podman exec/cp):
    # less sensitive to the other tenants' load than the wall time.
    cpu_after = resource.getrusage(resource.RUSAGE_CHILDREN)
    hosts_cpu = hosts_cpu_s(cgroups) - hosts_before
    cpu = (cpu_after.ru_utime - cpu_before.ru_utime) + (cpu_after.ru_stime - cpu_before.ru_stime)
    text = logpath.read_text()
    recap = RECAP.findall(text)
    return {"wall_s": round(wall, 2), "controller_cpu_s": round(cpu, 2),
            "hosts_cpu_s": round(hosts_cpu, 2), "rc": rc,
            "loadavg_before": before, "loadavg_after": loadavg(),
            "hosts": len(recap), "changed": sum(int(r[2]) for r in recap),
            "hosts_changed": sum(1 for r in recap if int(r[2]) > 0),
            "failed": sum(int(r[4]) + int(r[3]) for r in recap),
            "mem": sampler.peak, "profile": parse_profile(text),
            "log": str(logpath.relative_to(ROOT))}


def write_inventory(names, conn="podman", port=RECEIVER_PORT):
    targets = addresses(names) if conn == "ssh" else names
    hosts = {f"bench-{i:02d}": {"ansible_host": target, "stacksense_server_id": i}
             for i, target in enumerate(targets, 1)}
    group_vars = {"stacksense_api_url": f"http://host.containers.internal:{port}"}
    if conn == "ssh":
        group_vars.update(
            ansible_connection="ssh", ansible_user="root",
            ansible_ssh_private_key_file=str(ssh_key()),
            ansible_ssh_common_args="-o StrictHostKeyChecking=no "
                                    "-o UserKnownHostsFile=/dev/null -o LogLevel=ERROR")
    else:
        group_vars["ansible_connection"] = "containers.podman.podman"
    inventory = {"all": {"children": {"stacksense_agents": {"hosts": hosts, "vars": group_vars}}}}
    path = WORK / f"inventory-{conn}-{len(names)}.json"
    path.write_text(json.dumps(inventory, indent=1))  # JSON is YAML
    return path


def upgrade_agent(tree):
    source = (tree / "agent" / "heartbeat_agent.py").read_text()
    new, count = re.subn(r'^AGENT_VERSION = "[^"]+"', f'AGENT_VERSION = "{UPGRADE_VERSION}"',
                         source, count=1, flags=re.M)
    if count != 1:
        raise SystemExit("no AGENT_VERSION line in agent/heartbeat_agent.py")
    path = WORK / "heartbeat_agent_upgrade.py"
    path.write_text(new)
    return path


def wait_versions(receiver, n, version, timeout=60):
    """Seconds until every server id 1..n reported `version` (not part of the timed runs)."""
    start = time.monotonic()
    while time.monotonic() - start < timeout:
        try:
            seen = receiver.versions()
        except OSError:
            seen = {}
        if all(seen.get(i) == version for i in range(1, n + 1)):
            return True
        time.sleep(1)
    return False


def wait_for_quiet(max_load, max_wait):
    """Wait (at most max_wait s) until the 1-minute load average is below max_load."""
    deadline = time.monotonic() + max_wait
    while float(loadavg()[0]) >= max_load and time.monotonic() < deadline:
        time.sleep(5)


def bench(args):
    WORK.mkdir(parents=True, exist_ok=True)
    seeded = args.apt == "seeded"
    if seeded:
        ensure_seeded_image()
    image = SEEDED_IMAGE if seeded else STOCK_IMAGE
    ssh_image = None
    if any(VARIANTS[name]["conn"] == "ssh" for name in args.variants):
        if not seeded:
            raise SystemExit("the ssh variants need --apt seeded")
        ssh_image = ensure_ssh_image(image)
    tree, tree_label = snapshot(args.tree)
    log(f"benchmarking {tree_label} from {tree}")
    upgrade = upgrade_agent(tree)
    original_version = re.search(r'^AGENT_VERSION = "([^"]+)"',
                                 (tree / "agent" / "heartbeat_agent.py").read_text(), re.M)[1]
    receiver = start_receiver()

    def stop(*_):
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, stop)
    try:
        for rep in range(args.reps):
            for n in args.n:
                # Alternate the order of the variants from one N to the next, so that a drift
                # in the machine's load does not always favour the same one.
                order = list(args.variants)
                if (args.n.index(n) + rep) % 2:
                    order.reverse()
                for name in order:
                    if name.endswith("-rolling") and n == 1:
                        continue  # one host: identical to the one-batch run
                    spec = dict(VARIANTS[name])
                    ssh = spec["conn"] == "ssh"
                    if ssh:
                        # Fresh ControlPersist sockets per set of containers (addresses are
                        # reused by podman).
                        spec["env"] = dict(spec["env"], ANSIBLE_SSH_CONTROL_PATH_DIR=str(
                            WORK / "cp" / f"{name}-{n}-{rep}-{int(time.time())}"))
                    if "ANSIBLE_CACHE_PLUGIN_CONNECTION" in spec["env"]:
                        shutil.rmtree(spec["env"]["ANSIBLE_CACHE_PLUGIN_CONNECTION"],
                                      ignore_errors=True)
                    log(f"N={n} {name} rep {rep}: starting {n} containers ({args.apt})")
                    names = start_containers(n, ssh_image if ssh else image, seeded, ssh)
                    inventory = write_inventory(names, spec["conn"])
                    cgroups = cpu_files(names)
                    time.sleep(args.settle)
                    for phase in PHASES:
                        wait_for_quiet(args.max_load, args.max_wait)
                        extra = ({"stacksense_agent_source": str(upgrade)}
                                 if phase == "upgrade" else {})
                        tag = f"{args.apt}-{name}-N{n}-r{rep}-{phase}"
                        result = run_playbook(tag, tree, inventory, spec, extra, cgroups)
                        expect = UPGRADE_VERSION if phase == "upgrade" else original_version
                        result["heartbeats_ok"] = wait_versions(receiver, n, expect)
                        result.update(apt=args.apt, variant=name, n=n, rep=rep, phase=phase,
                                      tree=tree_label,
                                      date=time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                                      note=spec["note"])
                        with open(args.results, "a") as out:
                            out.write(json.dumps(result) + "\n")
                        mem = result["mem"]
                        log(f"N={n} {name} {phase}: {result['wall_s']} s "
                            f"cpu={result['controller_cpu_s']}+{result['hosts_cpu_s']} s "
                            f"rc={result['rc']} "
                            f"changed={result['changed']} failed={result['failed']} "
                            f"rss={mem['rss_kib'] // 1024} MiB pss={mem['pss_kib'] // 1024} MiB "
                            f"procs={mem['procs']} load={result['loadavg_before'][0]}->"
                            f"{result['loadavg_after'][0]} beats_ok={result['heartbeats_ok']}")
                    remove_containers(names)
    finally:
        receiver.stop()
        remove_containers()


# --- report ----------------------------------------------------------------------------------

def load_results(path):
    with open(path) as lines:
        rows = [json.loads(line) for line in lines if line.strip()]
    return [r for r in rows if r["rc"] == 0]


class Results:
    def __init__(self, rows):
        self.rows = rows
        self.groups = defaultdict(list)
        for r in rows:
            self.groups[(r["apt"], r["variant"], r["n"], r["phase"])].append(r)

    def get(self, apt, var, n, phase):
        return self.groups.get((apt, var, n, phase), [])

    def wall(self, *key):
        found = self.get(*key)
        return statistics.median(r["wall_s"] for r in found) if found else None

    def cpu(self, *key):
        """Median CPU seconds, controller plus hosts (the work, whatever the load)."""
        found = [r for r in self.get(*key) if "hosts_cpu_s" in r]
        return (statistics.median(r["controller_cpu_s"] + r["hosts_cpu_s"] for r in found)
                if found else None)

    def ctrl_cpu(self, *key):
        """Median CPU seconds of the controller alone (what a real fleet's hosts do not share)."""
        found = self.get(*key)
        return statistics.median(r["controller_cpu_s"] for r in found) if found else None

    def mem(self, key_name, *key):
        found = self.get(*key)
        return max(r["mem"][key_name] for r in found) / 1024 if found else None

    def loads(self, *key):
        found = self.get(*key)
        return ", ".join(r["loadavg_before"][0] for r in found) or "-"

    def ns(self, apt, var):
        return sorted({r["n"] for r in self.rows if r["apt"] == apt and r["variant"] == var})


def slope(points):
    """Least-squares slope (s per host) and intercept of [(n, seconds)]."""
    points = [(x, y) for x, y in points if y is not None]
    if len({x for x, _ in points}) < 2:
        return None, None
    xs, ys = zip(*points)
    mx, my = statistics.fmean(xs), statistics.fmean(ys)
    b = (sum((x - mx) * (y - my) for x, y in zip(xs, ys))
         / sum((x - mx) ** 2 for x in xs))
    return b, my - b * mx


def fmt(value, digits=1):
    return "-" if value is None else f"{value:.{digits}f}"


def ratio(a, b):
    return "-" if a is None or b is None or b == 0 else f"{a / b:.2f}x"


def pair_table(res, apt, base, var, out):
    """Wall time, CPU work and memory of `var` against `base` at each N."""
    ns = sorted(set(res.ns(apt, var)) & set(res.ns(apt, base)))
    if not ns:
        return

    def cells(metric, n, bold=""):
        """'base / var / ratio' for each phase, of metric(apt, variant, n, phase)."""
        return " | ".join(f"{fmt(metric(apt, base, n, p))} / {fmt(metric(apt, var, n, p))} / "
                          f"{bold}{ratio(metric(apt, var, n, p), metric(apt, base, n, p))}{bold}"
                          for p in PHASES)

    def mem(name, n):
        rss = max((res.mem("rss_kib", apt, name, n, p) or 0) for p in PHASES)
        pss = max((res.mem("pss_kib", apt, name, n, p) or 0) for p in PHASES)
        return f"{rss:.0f} / {pss:.0f}"

    out.append(f"\nWall time (s, median of the repetitions) and ratio {var} / {base}:\n")
    out.append("| N | " + " | ".join(f"{p}: {base} / {var} / ratio" for p in PHASES)
               + f" | 1-min load at start ({var} first; {base} first) |")
    out.append("|---|---|---|---|---|")
    out.extend(f"| {n} | {cells(res.wall, n, '**')} | {res.loads(apt, var, n, 'first')}; "
               f"{res.loads(apt, base, n, 'first')} |" for n in ns)
    out.append("\nCPU seconds (controller + containers) and peak controller memory (MiB):\n")
    out.append("| N | " + " | ".join(f"CPU {p}: {base} / {var} / ratio" for p in PHASES)
               + f" | peak RSS / PSS, {var} | peak RSS / PSS, {base} |")
    out.append("|---|---|---|---|---|---|")
    out.extend(f"| {n} | {cells(res.cpu, n)} | {mem(var, n)} | {mem(base, n)} |" for n in ns)
    out.append("\nController CPU seconds alone (on real hosts the host-side work runs on the "
               "hosts' own CPUs; the controller's is what grows with the fleet):\n")
    out.append("| N | " + " | ".join(f"{p}: {base} / {var} / ratio" for p in PHASES) + " |")
    out.append("|---|---|---|---|")
    out.extend(f"| {n} | {cells(res.ctrl_cpu, n)} |" for n in ns)


def report(args):
    res = Results(load_results(args.results))
    out = []
    trees = sorted({r.get("tree", "?") for r in res.rows})
    dates = sorted(r["date"] for r in res.rows)
    out.append(f"Role benchmarked: {', '.join(trees)}; runs from {dates[0]} to {dates[-1]}; "
               f"{len(res.rows)} successful runs.")
    for apt in sorted({r["apt"] for r in res.rows}):
        out.append(f"\n## apt {apt}")
        for base, var in (("baseline-ssh", "role-ssh"), ("baseline", "role")):
            if set(res.ns(apt, var)) & set(res.ns(apt, base)):
                out.append(f"\n### {var} ({VARIANTS[var]['note']}) against {base} "
                           f"({VARIANTS[base]['note']})")
                pair_table(res, apt, base, var, out)
        ns = sorted(set(res.ns(apt, "role")) | set(res.ns(apt, "role-ssh")))
        out.append(f"\nMarginal cost per host: least-squares slope of the median wall time over "
                   f"N = {', '.join(map(str, ns))} (intercept in brackets), and of the CPU "
                   f"seconds:\n")
        out.append("| variant | " + " | ".join(f"{p} wall | {p} CPU" for p in PHASES) + " |")
        out.append("|---|---|---|---|---|---|---|")
        for var in ("baseline-ssh", "role-ssh", "baseline", "role", "baseline-rolling",
                    "role-rolling"):
            cells = []
            for p in PHASES:
                b, a = slope([(n, res.wall(apt, var, n, p)) for n in res.ns(apt, var)])
                c, _ = slope([(n, res.cpu(apt, var, n, p)) for n in res.ns(apt, var)])
                cells.append("-" if b is None else f"{b:.2f} s/host ({a:.1f} s)")
                cells.append("-" if c is None else f"{c:.2f} s/host")
            if any(c != "-" for c in cells):
                out.append(f"| {var} | " + " | ".join(cells) + " |")
        for base, var in (("role", "role-rolling"), ("baseline", "baseline-rolling"),
                          ("role", "role-forks5"), ("baseline", "baseline-forks5"),
                          ("role", "role-free"), ("role", "role-factcache"),
                          ("role", "role-interp"), ("role", "role-noverify"), ("role", "role-ssh"),
                          ("role-ssh", "role-ssh-nopipe"), ("baseline-ssh", "baseline-ssh-nopipe"),
                          ("role-ssh", "role-ssh-forks5"), ("baseline-ssh", "baseline-ssh-forks5"),
                          ("role-ssh", "role-ssh-rolling"),
                          ("baseline-ssh", "baseline-ssh-rolling")):
            if set(res.ns(apt, var)) & set(res.ns(apt, base)):
                out.append(f"\n### {var} ({VARIANTS[var]['note']}) against {base} "
                           f"({VARIANTS[base]['note']})")
                pair_table(res, apt, base, var, out)
    if args.profile:
        apt, n = args.profile.split(":")
        n = int(n)
        for phase in PHASES:
            out.append(f"\nprofile_tasks, apt {apt}, N={n}, {phase}: seconds per task (all hosts), "
                       "median over the repetitions, execution order:\n")
            for var in args.profile_variants:
                found = res.get(apt, var, n, phase)
                if not found:
                    continue
                per_task = defaultdict(list)
                for r in found:
                    for name, secs in r["profile"]:
                        per_task[name].append(secs)
                order = [name for name, _ in found[0]["profile"]]
                total = sum(statistics.median(per_task[t]) for t in order)
                out.append(f"{var} (sum {total:.1f} s, median wall "
                           f"{res.wall(apt, var, n, phase):.1f} s)")
                out.extend(f"  {statistics.median(per_task[t]):6.2f}  {t}" for t in order
                           if statistics.median(per_task[t]) >= args.profile_min)
    if args.explain:
        explain(res, args.explain, out)
    print("\n".join(out))
    if args.plot:
        plot(res, args.plot, Results(load_results(args.before)) if args.before else None)


# Role tasks that do on each host what a baseline task does too (the rest of the role's host
# tasks are its own probes, checks and clean-ups).
# Modules that run on the controller (or only steer the play): their tasks never reach a host.
CONTROLLER_MODULES = {"assert", "set_fact", "debug", "fail", "meta", "include_tasks",
                      "import_tasks", "include_role", "import_role", "add_host", "group_by"}


def task_names(paths):
    """{task name: whether it reaches the hosts} of the playbooks or task files at paths."""
    found = {}

    def walk(items):
        for task in items or []:
            if not isinstance(task, dict):
                continue
            for key in ("tasks", "handlers", "pre_tasks", "post_tasks", "block", "rescue",
                        "always"):
                walk(task.get(key))
            module = next((k for k in task if k.count(".") >= 2), None)  # FQCN, as linted
            if task.get("name") and module and "block" not in task:
                short = module.rsplit(".", 1)[-1]
                found[task["name"]] = (short not in CONTROLLER_MODULES
                                       and task.get("delegate_to") != "localhost")
    for path in paths:
        walk(yaml.safe_load(Path(path).read_text()))
    return found


def role_tasks():
    """The role's tasks, read from its task and handler files (never a copy of their names)."""
    role = ROOT / "roles" / "stacksense_agent"
    return task_names([*sorted((role / "tasks").glob("*.yml")), role / "handlers" / "main.yml"])


def baseline_twins():
    """Role task -> the baseline's task doing the same work: bench/baseline.yml names its tasks
    as the role does."""
    baseline = task_names([ROOT / PLAYBOOKS["baseline"]])
    return {name: name for name in role_tasks() if name in baseline}


def ran_min_s(n):
    """Below this (all n hosts together) a host task was skipped: here a skipped task costs
    about 0.012 s per host, one that reaches the hosts over ssh at least 0.13 s per host."""
    return max(0.1, 0.04 * n)


def explain(res, spec, out):
    """Where the role's extra seconds go: per task, against the baseline's matching task."""
    apt, n, var, base_var = ([*spec.split(":"), "role", "baseline"])[:4]
    n = int(n)
    twins, reaches_hosts = baseline_twins(), role_tasks()
    for phase in PHASES:
        role_runs, base_runs = res.get(apt, var, n, phase), res.get(apt, base_var, n, phase)
        if not role_runs or not base_runs:
            continue

        def medians(runs):
            per = defaultdict(list)
            for r in runs:
                for name, secs in r["profile"]:
                    per[name.split(" : ", 1)[-1]].append(secs)
            return {name: statistics.median(v) for name, v in per.items()}
        role, base = medians(role_runs), medians(base_runs)
        wall_r, wall_b = res.wall(apt, var, n, phase), res.wall(apt, base_var, n, phase)
        out.append(f"\nWhere the extra {wall_r - wall_b:.1f} s of {var} over {base_var} go "
                   f"(apt {apt}, N={n}, {phase}; {wall_r:.1f} s against {wall_b:.1f} s; medians; "
                   f"seconds are for all {n} hosts together):\n")
        out.append("| role task | role (s) | baseline task (s) | extra (s) |")
        out.append("|---|---|---|---|")
        controller = 0.0
        controller_tasks = 0
        total_extra = 0.0
        for name, secs in role.items():
            twin = twins.get(name)
            if twin is None and (not reaches_hosts.get(name) or secs < ran_min_s(n)):
                controller += secs
                controller_tasks += 1
                continue
            b = base.get(twin, 0.0) if twin else 0.0
            total_extra += secs - b
            out.append(f"| {name} | {secs:.2f} | {f'{b:.2f}' if twin else '-'} | "
                       f"{secs - b:+.2f} |")
        out.append(f"| {controller_tasks} tasks on the controller or skipped (checks, includes, "
                   f"debug, ...) | "
                   f"{controller:.2f} | - | {controller:+.2f} |")
        rest = (wall_r - sum(role.values())) - (wall_b - sum(base.values()))
        out.append(f"| start-up and play overhead outside tasks | - | - | {rest:+.2f} |")
        out.append(f"| **total** | | | **{total_extra + controller + rest:+.2f}** |")


def plot(res, path, before=None):
    """Time and CPU against N. `before`: results of an earlier role, drawn as "role before"."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, grid = plt.subplots(2, 3, figsize=(14, 8.2), sharex=True)
    # (results, apt, variant, label, colour, line style (None: markers only), marker)
    series = [(res, "seeded", "baseline-ssh", "baseline.yml over ssh", "tab:blue", "-", "o"),
              (res, "seeded", "role-ssh", "role (deploy.yml) over ssh", "tab:red", "-", "o"),
              (res, "seeded", "baseline", "baseline.yml, podman connection", "tab:cyan", "--",
               "s"),
              (res, "seeded", "role", "role, podman connection", "tab:orange", "--", "s"),
              (res, "seeded", "role-ssh-rolling", "role over ssh, default serial [1, 25%]",
               "tab:purple", None, "^"),
              (res, "seeded", "role-ssh-forks5", "role over ssh, forks 5", "tab:green", None,
               "v"),
              (res, "seeded", "role-ssh-nopipe", "role over ssh, pipelining off", "tab:brown",
               None, "x")]
    if before is not None:
        trees = ", ".join(sorted({r.get("tree", "?") for r in before.rows}))
        series.append((before, "seeded", "role-ssh", f"role before the cuts ({trees}) over ssh",
                       "tab:gray", "--", "D"))
    all_ns = sorted({r["n"] for r in res.rows})
    for row, (metric, ylabel) in enumerate((("wall", "wall time (s)"),
                                            ("cpu", "CPU s, controller + containers"))):
        for ax, phase in zip(grid[row], PHASES):
            for data, apt, var, label, color, line, marker in series:
                ns = data.ns(apt, var)
                value = data.wall if metric == "wall" else data.cpu
                pts = [(n, value(apt, var, n, phase)) for n in ns]
                pts = [(n, y) for n, y in pts if y is not None]
                if not pts:
                    continue
                xs, ys = zip(*pts)
                ax.plot(xs, ys, color=color, linestyle=line or "none", marker=marker,
                        label=label)
                if metric == "wall":  # every repetition, to show the spread
                    reps = [(n, r["wall_s"]) for n in ns for r in data.get(apt, var, n, phase)]
                    ax.scatter([x for x, _ in reps], [y for _, y in reps], color=color, s=10,
                               alpha=0.35)
            if row == 0:
                ax.set_title({"first": "first deploy", "rerun": "idempotent re-run",
                              "upgrade": "rolling upgrade (new AGENT_VERSION)"}[phase])
            else:
                ax.set_xlabel("hosts (N)")
            ax.set_ylabel(ylabel + (", median; dots: each run" if metric == "wall" else
                                    ", median"))
            ax.set_xticks(all_ns)
            ax.set_ylim(bottom=0)
            ax.grid(alpha=0.3)
    handles, names = grid[0][0].get_legend_handles_labels()
    fig.legend(handles, names, loc="lower center", ncol=4, fontsize=8, frameon=False)
    trees = ", ".join(sorted({r.get("tree", "?") for r in res.rows}))
    day = min(r["date"] for r in res.rows)[:10]
    fig.suptitle(f"StackSense agent deploy time vs number of hosts (Debian 12 containers, role at "
                 f"{trees}, {day}, 2-core VM). forks 25, all hosts in one batch unless noted, "
                 "apt cache pre-seeded.", fontsize=9.5)
    fig.tight_layout(rect=(0, 0.06, 1, 0.95))
    fig.savefig(path, dpi=90)
    print(f"plot written to {path}", file=sys.stderr)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="run the benchmark (appends to the results file)")
    run.add_argument("--n", type=int, nargs="+", default=[1, 5])
    run.add_argument("--variants", nargs="+", default=["baseline", "role"], choices=list(VARIANTS))
    run.add_argument("--apt", choices=["seeded", "network"], default="seeded")
    run.add_argument("--reps", type=int, default=1)
    run.add_argument("--results", type=Path, default=RESULTS,
                     help=f"JSON lines to append to (default {RESULTS})")
    run.add_argument("--tree", default="HEAD", metavar="REV|worktree",
                     help="what to benchmark: a git revision (default HEAD) or 'worktree'")
    run.add_argument("--max-load", type=float, default=4.0,
                     help="before each run, wait until the 1-min load average is below this "
                          "(default 4.0; the machine has 2 cores) ...")
    run.add_argument("--max-wait", type=float, default=60,
                     help="... but no longer than this many seconds (default 60)")
    run.add_argument("--settle", type=float, default=5.0,
                     help="seconds to wait after the containers booted (default 5)")
    rep = sub.add_parser("report", help="print the tables (and plot) from the results")
    rep.add_argument("--results", type=Path, default=RESULTS, help=f"default {RESULTS}")
    rep.add_argument("--plot", metavar="PNG")
    rep.add_argument("--before", type=Path, metavar="JSONL",
                     help="results of an earlier role, drawn on the plot as 'role before'")
    rep.add_argument("--profile", metavar="APT:N", help="also print profile_tasks, e.g. seeded:20")
    rep.add_argument("--profile-variants", nargs="+", default=["baseline", "role"])
    rep.add_argument("--explain", metavar="APT:N[:VARIANT:BASE]",
                     help="table of the role's extra seconds per task, e.g. seeded:20 or "
                          "seeded:20:role-ssh:baseline-ssh")
    rep.add_argument("--profile-min", type=float, default=0.0,
                     help="leave out tasks that took less (seconds)")
    sub.add_parser("cleanup", help="remove this benchmark's containers")
    args = parser.parse_args(argv)
    if args.command == "run":
        bench(args)
    elif args.command == "report":
        report(args)
    else:
        remove_containers()
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except KeyboardInterrupt:
        sys.exit(130)
