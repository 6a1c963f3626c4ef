#!/usr/bin/env python3
"""The deploy as others consume it: from the installed collection, and the way AWX runs it.

    scripts/delivery_test.py collection   (make collection-test)
    scripts/delivery_test.py ee           (make ee-test)

collection: `ansible-galaxy collection build`, install the artifact into a temporary
collections path, then, from a directory outside the repository with no roles path and no
ansible.cfg, a playbook that uses only `stacksense.fleet.stacksense_agent` deploys a podman
systemd host (coll-1) against the reference receiver (port 18194): the role verifies the
first heartbeat, this script checks the receiver heard the host with the collection's version
and that the host runs the collection's copy of the agent; then `ansible-playbook
stacksense.fleet.deploy` (the collection's playbook by its FQCN) changes nothing.

ee: builds the test execution environment (execution-environment-test.yml) with
ansible-builder on a Debian base made with debootstrap (both reused while their inputs are
unchanged), starts two SSH hosts (ee-1, ee-2: sshd, an unprivileged user `deployer` with
sudo) and the receiver (port 18195), lays out a private data dir as AWX does (project copy,
inventory script, env/ssh_key, env/cmdline, env/extravars, env/envvars) and runs
playbooks/deploy.yml through `ansible-runner run --process-isolation
--process-isolation-executable podman --container-image <EE>`: the deploy succeeds in two
serial batches with become, the receiver hears both hosts; a re-run changes nothing; a deploy
to a bad URL fails the job with the role's message, and the canary is rolled back and heard
again; then the same deploy with a new interval through `ansible-runner transmit | worker |
process` (AWX on Kubernetes, receptor).

Environment:
  EE_CA_BUNDLE   a CA bundle to mount into the EE build as the image's system CA file, for
                 pip inside the build (empty: none; `make ee-test` sets it to
                 /etc/ssl/certs/ca-certificates.crt when this machine has one). pip's index
                 settings (PIP_INDEX_URL, PIP_EXTRA_INDEX_URL, PIP_TRUSTED_HOST, or pip config's
                 global.index-url etc.) are passed to the build too, http(s) ones only.
  EE_REBUILD=1   rebuild the base image and the EE even if present.
  KEEP=1         leave hosts, receiver and work directory in place for a look (the next run
                 replaces them).
Containers carry the label stacksense.test=<test> and are removed by name at the end;
images made: localhost/stacksense-ee-base:debian12 and localhost/stacksense-ee:test-<hash>
(older test-* tags of that repository are removed when a new one is built). Never prunes.
"""

import hashlib
import json
import os
import re
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "scripts"))
import testhost  # noqa: E402
from receiver_process import ReceiverError, ReceiverProcess  # noqa: E402

VENV_BIN = ROOT / ".venv" / "bin"
HOST_IMAGE = "localhost/stacksense-test:debian12"
EE_BASE_IMAGE = "localhost/stacksense-ee-base:debian12"
EE_REPO = "localhost/stacksense-ee"
EE_DEFINITION = ROOT / "execution-environment-test.yml"
DEBIAN_MIRROR = os.environ.get("DEBIAN_MIRROR", "http://deb.debian.org/debian")
SSH_USER = "deployer"
PROJECT_PARTS = ["ansible.cfg", "agent", "roles", "playbooks", "plugins", "galaxy.yml"]
os.environ.setdefault("CONTAINERS_CONF", str(ROOT / "molecule" / "containers.conf"))


class Failure(Exception):
    """The test failed: the message says what was expected and what happened."""


def log(msg):
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def run(cmd, check=True, **kw):
    kw.setdefault("text", True)
    result = subprocess.run([str(c) for c in cmd], **kw)
    if check and result.returncode != 0:
        raise Failure(f"{' '.join(str(c) for c in cmd[:4])} ... exited {result.returncode}")
    return result


def version_of_agent():
    text = (ROOT / "agent" / "heartbeat_agent.py").read_text()
    return re.search(r'^AGENT_VERSION = "([^"]+)"$', text, re.M).group(1)


def start_receiver(port, servers, workdir):
    """The reference receiver on 0.0.0.0:PORT, knowing the given (id, name) servers."""
    try:
        return ReceiverProcess(port, Path(workdir) / f"receiver-{port}.log",
                               [{"id": i, "name": n} for i, n in servers]).start()
    except ReceiverError as error:
        raise Failure(str(error)) from None


def utc_now():
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime())


# --- collection -----------------------------------------------------------------------------

COLLECTION_PLAYBOOK = """\
---
# Outside the repository: only the installed collection provides the role.
- name: Deploy the agent with the collection's role
  hosts: stacksense_agents
  gather_facts: false
  become: true
  roles:
    - role: stacksense.fleet.stacksense_agent
"""


def recap(text):
    """{host: {"ok": n, "changed": n, "failed": n, "unreachable": n}} from PLAY RECAP."""
    rows = {}
    for m in re.finditer(r"^(\S+)\s+:\s+ok=(\d+)\s+changed=(\d+)\s+unreachable=(\d+)\s+"
                         r"failed=(\d+)", text, re.M):
        rows[m[1]] = {"ok": int(m[2]), "changed": int(m[3]), "unreachable": int(m[4]),
                      "failed": int(m[5])}
    return rows


def collection_test():
    start = time.monotonic()
    import yaml  # from the virtualenv (ansible-core needs it)

    galaxy = yaml.safe_load((ROOT / "galaxy.yml").read_text())
    fqcn = f"{galaxy['namespace']}.{galaxy['name']}"
    work = Path(tempfile.mkdtemp(prefix="stacksense-coll-", dir="/var/tmp"))
    name, port, server_id = "coll-1", 18194, 194
    receiver = None
    try:
        log(f"ansible-galaxy collection build ({fqcn} {galaxy['version']})")
        run([VENV_BIN / "ansible-galaxy", "collection", "build", "--output-path", work, ROOT],
            stdout=subprocess.DEVNULL)
        artifact = work / f"{galaxy['namespace']}-{galaxy['name']}-{galaxy['version']}.tar.gz"
        listing = run(["tar", "-tzf", artifact], capture_output=True).stdout.split()
        leaked = [p for p in listing if p.split("/")[0] in
                  ("molecule", "tests", "bench", "build", ".venv", "scripts", "receiver")]
        if leaked:
            raise Failure(f"the artifact holds test files: {leaked[:5]}")
        log(f"{artifact.name}: {artifact.stat().st_size // 1024} KiB, {len(listing)} entries")
        collections = work / "collections"
        # --force: without it ansible-galaxy installs nothing when the same version is in a
        # configured path already (e.g. the user's ~/.ansible/collections).
        run([VENV_BIN / "ansible-galaxy", "collection", "install", "--force", "-p", collections,
             artifact], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        installed = collections / "ansible_collections" / galaxy["namespace"] / galaxy["name"]
        role_default = installed / "roles" / "stacksense_agent" / ".." / ".." / "agent"
        agent_file = (role_default / "heartbeat_agent.py").resolve()
        if not agent_file.is_file():
            raise Failure(f"the role's default agent source is missing: {agent_file}")

        testhost.start(name, HOST_IMAGE, labels=["stacksense.test=collection"], replace=True)
        receiver = start_receiver(port, [(server_id, name)], work)
        play = work / "play"
        play.mkdir()
        (play / "site.yml").write_text(COLLECTION_PLAYBOOK)
        (play / "inventory.yml").write_text(json.dumps({"stacksense_agents": {"hosts": {name: {
            "ansible_connection": "containers.podman.podman",
            "stacksense_server_id": server_id,
            "stacksense_api_url": f"http://host.containers.internal:{port}",
            "stacksense_interval": 15}}}}))
        (work / "no-roles").mkdir()
        env = {k: v for k, v in os.environ.items() if not k.startswith("ANSIBLE_")}
        env.update(ANSIBLE_COLLECTIONS_PATH=str(collections),
                   ANSIBLE_ROLES_PATH=str(work / "no-roles"), ANSIBLE_NOCOLOR="1",
                   ANSIBLE_LOCAL_TEMP=str(work / "tmp"), ANSIBLE_HOME=str(work / "ansible-home"))
        since = utc_now()
        log("deploy: ansible-playbook site.yml (role stacksense.fleet.stacksense_agent)")
        first = run([VENV_BIN / "ansible-playbook", "-i", "inventory.yml", "site.yml"],
                    cwd=play, env=env, check=False, capture_output=True)
        (work / "first.log").write_text(first.stdout + first.stderr)
        if first.returncode != 0:
            print(first.stdout[-4000:], first.stderr[-2000:], file=sys.stderr)
            raise Failure("the deploy from the installed collection failed "
                          f"(rc {first.returncode})")
        heard = receiver.heartbeats(server_id, since)
        versions = sorted({h["agent_version"] for h in heard})
        if not heard or versions != [galaxy["version"]]:
            raise Failure(f"receiver heard {len(heard)} heartbeat(s) from {name}, versions "
                          f"{versions}; expected the collection's version {galaxy['version']}")
        on_host = run(["podman", "exec", name, "sha256sum",
                       "/opt/stacksense-heartbeat/heartbeat_agent.py"],
                      capture_output=True).stdout.split()[0]
        if on_host != hashlib.sha256(agent_file.read_bytes()).hexdigest():
            raise Failure(f"{name} does not run the collection's agent file")
        log(f"deployed and verified: {len(heard)} heartbeat(s), agent {versions[0]}, "
            "the collection's agent file")
        log(f"re-run: ansible-playbook {fqcn}.deploy")
        again = run([VENV_BIN / "ansible-playbook", "-i", "inventory.yml", f"{fqcn}.deploy"],
                    cwd=play, env=env, check=False, capture_output=True)
        (work / "rerun.log").write_text(again.stdout + again.stderr)
        rows = recap(again.stdout)
        if again.returncode != 0 or rows.get(name, {}).get("changed") != 0:
            print(again.stdout[-4000:], file=sys.stderr)
            raise Failure(f"{fqcn}.deploy re-run: rc {again.returncode}, recap {rows}; "
                          "expected success with changed=0")
        log(f"collection-test passed in {time.monotonic() - start:.0f} s "
            f"(re-run by FQCN: {rows[name]})")
    finally:
        if receiver:
            receiver.stop()
        if os.environ.get("KEEP") != "1":
            testhost.remove([name], "stacksense.test=collection")
            shutil.rmtree(work, ignore_errors=True)


# --- execution environment ------------------------------------------------------------------

def image_exists(image):
    return run(["podman", "image", "exists", image], check=False).returncode == 0


def ensure_ee_base():
    """A minimal Debian 12 made with debootstrap: python3 and Debian's python3-pip."""
    if image_exists(EE_BASE_IMAGE) and os.environ.get("EE_REBUILD") != "1":
        log(f"{EE_BASE_IMAGE} exists, reusing it (EE_REBUILD=1 rebuilds)")
        return
    log(f"building {EE_BASE_IMAGE} with debootstrap (about a minute)")
    root = Path(tempfile.mkdtemp(prefix="stacksense-ee-base.", dir="/var/tmp"))
    try:
        root.chmod(0o755)
        run(["debootstrap", "--variant=minbase", "--include=python3,python3-pip,ca-certificates",
             "bookworm", root, DEBIAN_MIRROR], stdout=subprocess.DEVNULL)
        (root / "etc/apt/sources.list").write_text(
            f"deb {DEBIAN_MIRROR} bookworm main\ndeb {DEBIAN_MIRROR} bookworm-updates main\n"
            "deb http://deb.debian.org/debian-security bookworm-security main\n")
        (root / "etc/apt/apt.conf.d/01-container").write_text(
            'APT::Install-Recommends "false";\nAPT::Install-Suggests "false";\n')
        for junk in ("var/cache/apt/archives", "var/lib/apt/lists"):
            for path in (root / junk).glob("*"):
                if path.is_file():
                    path.unlink()
        tar = subprocess.Popen(["tar", "--numeric-owner", "-C", str(root), "-c", "."],
                               stdout=subprocess.PIPE)
        run(["podman", "import", "--change", 'CMD ["/bin/bash"]', "--message",
             "debootstrap minbase bookworm + python3-pip, base of the StackSense test EE",
             "-", EE_BASE_IMAGE], stdin=tar.stdout, capture_output=True)
        tar.wait()
    finally:
        shutil.rmtree(root, ignore_errors=True)


def pip_index_build_args():
    """This machine's pip index settings (http(s) only), as build args for pip in the build."""
    args = []
    for key in ("index-url", "extra-index-url", "trusted-host"):
        env_key = "PIP_" + key.upper().replace("-", "_")
        value = os.environ.get(env_key)
        if value is None:
            value = run([VENV_BIN / "pip", "config", "get", "global." + key], check=False,
                        capture_output=True).stdout.strip()
        keep = [v for v in value.split()
                if key == "trusted-host" or v.startswith(("http:", "https:"))]
        if keep:
            args += ["--build-arg", f"{env_key}={' '.join(keep)}"]
    return args


def ensure_ee():
    """Build the test EE unless an image built from the same inputs exists; return its name."""
    builder_version = run([VENV_BIN / "ansible-builder", "--version"],
                          capture_output=True).stdout.strip()
    base_id = run(["podman", "image", "inspect", "--format", "{{.Id}}", EE_BASE_IMAGE],
                  capture_output=True).stdout.strip()
    digest = hashlib.sha256(EE_DEFINITION.read_bytes() + builder_version.encode()
                            + base_id.encode()).hexdigest()[:12]
    image = f"{EE_REPO}:test-{digest}"
    if image_exists(image) and os.environ.get("EE_REBUILD") != "1":
        log(f"{image} exists, reusing it")
        return image
    context = Path(tempfile.mkdtemp(prefix="stacksense-ee-context.", dir="/var/tmp"))
    extra = ["--layers=false"]  # no intermediate images left behind: nothing to prune
    ca_bundle = os.environ.get("EE_CA_BUNDLE", "")
    if ca_bundle:
        extra += ["--volume", f"{ca_bundle}:/etc/ssl/certs/ca-certificates.crt:ro"]
    cmd = [VENV_BIN / "ansible-builder", "build", "--file", EE_DEFINITION, "--context", context,
           "--tag", image, "--container-runtime", "podman", "--verbosity", "2",
           "--extra-build-cli-args", " ".join(extra), *pip_index_build_args()]
    log(f"building {image}: ansible-builder {builder_version} (CA bundle: {ca_bundle or 'none'})")
    started = time.monotonic()
    try:
        result = run(cmd, check=False, capture_output=True)
        (Path("/var/tmp") / "stacksense-ee-build.log").write_text(result.stdout + result.stderr)
        if result.returncode != 0:
            print(result.stdout[-5000:], result.stderr[-3000:], file=sys.stderr)
            raise Failure("ansible-builder build failed (log: /var/tmp/stacksense-ee-build.log)")
    finally:
        shutil.rmtree(context, ignore_errors=True)
    log(f"built {image} in {time.monotonic() - started:.0f} s")
    old = run(["podman", "images", "--format", "{{.Repository}}:{{.Tag}}", EE_REPO],
              capture_output=True).stdout.split()
    for tag in old:
        if tag.startswith(f"{EE_REPO}:test-") and tag != image:
            run(["podman", "rmi", tag], check=False, capture_output=True)
    return image


INVENTORY_SCRIPT = """\
#!/usr/bin/env python3
# An inventory script, as AWX writes one for a job: --list prints the whole inventory.
import json
import sys

INVENTORY = {inventory}
if len(sys.argv) > 1 and sys.argv[1] == "--host":
    print(json.dumps({{}}))
else:
    print(json.dumps(INVENTORY))
"""


def private_data_dir(work, hosts, key):
    """AWX's layout: project/ (a copy), inventory/hosts (script), env/ssh_key, env/cmdline..."""
    pdd = work / "private_data_dir"
    (pdd / "project").mkdir(parents=True)
    for part in PROJECT_PARTS:
        src = ROOT / part
        (shutil.copytree if src.is_dir() else shutil.copy2)(src, pdd / "project" / part)
    # The project as the collection stacksense.fleet: the link the repository commits.
    link = pdd / "project" / ".collections" / "ansible_collections" / "stacksense" / "fleet"
    link.parent.mkdir(parents=True)
    link.symlink_to("../../..")
    inventory = {"stacksense_agents": {"hosts": list(hosts)},
                 "_meta": {"hostvars": {h: {"ansible_host": v["address"],
                                            "stacksense_server_id": v["id"]}
                                        for h, v in hosts.items()}}}
    (pdd / "inventory").mkdir()
    script = pdd / "inventory" / "hosts"
    script.write_text(INVENTORY_SCRIPT.format(inventory=json.dumps(inventory, indent=1)))
    script.chmod(0o755)
    env = pdd / "env"
    env.mkdir()
    shutil.copyfile(key, env / "ssh_key")
    (env / "ssh_key").chmod(stat.S_IRUSR | stat.S_IWUSR)
    # The machine credential's user, as AWX passes it, and the job template's forks.
    (env / "cmdline").write_text(f"-u {SSH_USER} --forks 5")
    # AWX's job timeout; the runner ends a job that outlives it.
    (env / "settings").write_text(json.dumps({"job_timeout": 600}))
    (env / "envvars").write_text(json.dumps({"ANSIBLE_HOST_KEY_CHECKING": "False",
                                             "ANSIBLE_NOCOLOR": "1"}))
    return pdd


def job_stats(artifacts):
    """(status, rc, stats event data, play starts, stdout) of one runner job's artifacts."""
    status = (artifacts / "status").read_text().strip()
    rc = int((artifacts / "rc").read_text().strip())
    stats, plays = {}, 0
    for path in (artifacts / "job_events").glob("*.json"):
        event = json.loads(path.read_text())
        if event.get("event") == "playbook_on_stats":
            stats = event["event_data"]
        elif event.get("event") == "playbook_on_play_start":
            plays += 1
    return status, rc, stats, plays, (artifacts / "stdout").read_text()


def check_job(label, artifacts, expect_status="successful"):
    status, rc, stats, plays, stdout = job_stats(artifacts)
    failed = sum(stats.get("failures", {}).values()) + sum(stats.get("dark", {}).values())
    if status != expect_status:
        print(stdout[-6000:], file=sys.stderr)
        raise Failure(f"{label}: job status {status} (rc {rc}); expected {expect_status}")
    if expect_status == "successful" and failed:
        raise Failure(f"{label}: failed/unreachable hosts {stats.get('failures')} "
                      f"{stats.get('dark')}")
    changed = sum(stats.get("changed", {}).values())
    log(f"{label}: status {status}, rc {rc}, {plays} serial batch(es), changed {changed}, "
        f"failed {failed}")
    return stats, plays, stdout


def ee_test():
    start = time.monotonic()
    os.environ["PATH"] = f"{VENV_BIN}:{os.environ['PATH']}"
    ensure_ee_base()
    image = ensure_ee()
    t_build = time.monotonic() - start
    work = Path(tempfile.mkdtemp(prefix="stacksense-ee-", dir="/var/tmp"))
    names = ["ee-1", "ee-2"]
    ids = {"ee-1": 195, "ee-2": 196}
    port, bad_port = 18195, 18196
    label = "stacksense.test=ee"
    receiver = None
    try:
        key = work / "id_ed25519"
        run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", "ee-test", "-f", key])
        for name in names:
            testhost.start(name, HOST_IMAGE, labels=[label], replace=True, ssh_user=SSH_USER,
                           ssh_key=f"{key}.pub", wait=False)
        testhost.wait_booted(names)
        hosts = {n: {"address": testhost.address(n), "id": ids[n]} for n in names}
        receiver = start_receiver(port, [(ids[n], n) for n in names], work)
        pdd = private_data_dir(work, hosts, key)
        url = f"http://host.containers.internal:{port}"
        # As AWX runs podman EEs: as root inside (the EE's default user, 1000, cannot read
        # the root-owned private data dir's 0600 files such as the SSH key's FIFO).
        isolation = ["--process-isolation", "--process-isolation-executable", "podman",
                     "--container-image", image, "--container-option=--user=root"]

        def extravars(**overrides):
            values = {"stacksense_api_url": url, "stacksense_interval": 15}
            values.update(overrides)
            (pdd / "env" / "extravars").write_text(json.dumps(values))

        def runner(ident):
            result = run([VENV_BIN / "ansible-runner", "run", pdd, "-p", "playbooks/deploy.yml",
                          "--ident", ident, *isolation], check=False, capture_output=True,
                         timeout=900)
            return pdd / "artifacts" / ident, result

        def heard(name, since):
            return receiver.heartbeats(ids[name], since)

        version = version_of_agent()
        extravars()
        since = utc_now()
        log(f"deploy: ansible-runner run --process-isolation (podman, {image}) on {names}")
        artifacts, _ = runner("deploy")
        stats, plays, _ = check_job("deploy", artifacts)
        if plays < 2:
            raise Failure(f"deploy ran {plays} batch(es); expected the canary, then the rest")
        for name in names:
            got = heard(name, since)
            if not got or {h["agent_version"] for h in got} != {version}:
                raise Failure(f"receiver heard {len(got)} heartbeat(s) from {name}; expected "
                              f"agent {version}")
        sudo = run(["podman", "exec", "ee-1", "journalctl", "-q", "--no-pager", "_COMM=sudo"],
                   capture_output=True).stdout
        if f"{SSH_USER} : " not in sudo:
            raise Failure(f"no sudo by {SSH_USER} in ee-1's journal: become was not used")
        log(f"the receiver heard {', '.join(names)} with agent {version}; "
            f"{SSH_USER} used sudo on ee-1")
        t_deploy = time.monotonic() - start - t_build

        artifacts, _ = runner("rerun")
        stats, _, _ = check_job("re-run", artifacts)
        if sum(stats.get("changed", {}).values()) != 0:
            raise Failure(f"re-run changed {stats.get('changed')}; expected nothing")

        extravars(stacksense_api_url=f"http://host.containers.internal:{bad_port}",
                  stacksense_verify_timeout=10)
        since = utc_now()
        log("bad URL: the job must fail and the canary be rolled back")
        artifacts, _ = runner("bad-url")
        _, _, stdout = check_job("bad URL", artifacts, expect_status="failed")
        if "rolled back to agent" not in stdout:
            raise Failure("bad URL: the job output lacks the role's 'rolled back to agent' message")
        unit = run(["podman", "exec", "ee-1", "systemctl", "cat", "stacksense-heartbeat"],
                   capture_output=True).stdout
        if f":{bad_port}" in unit or f":{port}" not in unit:
            raise Failure("bad URL: ee-1's unit does not point at the good receiver again")
        if not heard("ee-1", since):
            raise Failure("bad URL: ee-1 was not heard again after its rollback")
        log("bad URL: job failed with the role's message; ee-1 rolled back and heard again")

        extravars(stacksense_interval=20)
        since = utc_now()
        log("worker mode: ansible-runner transmit | ansible-runner worker | ansible-runner process")
        worker_dir = work / "worker"
        process_dir = work / "process"
        process_dir.mkdir()
        # transmit has no process-isolation flags: the settings travel in env/settings, as
        # AWX sends them to an execution node.
        settings = pdd / "env" / "settings"
        settings.write_text(json.dumps({
            **json.loads(settings.read_text()), "process_isolation": True,
            "process_isolation_executable": "podman", "container_image": image,
            "container_options": ["--user=root"]}))
        transmit = subprocess.Popen(
            [str(VENV_BIN / "ansible-runner"), "transmit", str(pdd), "-p", "playbooks/deploy.yml",
             "--ident", "worker"], stdout=subprocess.PIPE)
        worker = subprocess.Popen(
            [str(VENV_BIN / "ansible-runner"), "worker", "--private-data-dir", str(worker_dir)],
            stdin=transmit.stdout, stdout=subprocess.PIPE)
        transmit.stdout.close()
        process = run([VENV_BIN / "ansible-runner", "process", process_dir, "--ident", "worker"],
                      stdin=worker.stdout, check=False, capture_output=True, timeout=900)
        worker.stdout.close()
        worker.wait()
        transmit.wait()
        if transmit.returncode or worker.returncode:
            raise Failure(f"worker mode: transmit rc {transmit.returncode}, "
                          f"worker rc {worker.returncode}, process rc {process.returncode}")
        stats, _, _ = check_job("worker mode", process_dir / "artifacts" / "worker")
        if sum(stats.get("changed", {}).values()) == 0:
            raise Failure("worker mode: a new interval changed nothing")
        for name in names:
            if not heard(name, since):
                raise Failure(f"worker mode: {name} was not heard after its restart")
        log(f"ee-test passed in {time.monotonic() - start:.0f} s (images {t_build:.0f} s, "
            f"first deploy {t_deploy:.0f} s)")
    finally:
        if receiver:
            receiver.stop()
        if os.environ.get("KEEP") != "1":
            testhost.remove(names, label)
            shutil.rmtree(work, ignore_errors=True)


def main(argv):
    # Ctrl-C or a TERM still removes the hosts and stops the receiver (the finally blocks).
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    tests = {"collection": collection_test, "ee": ee_test}
    if len(argv) != 1 or argv[0] not in tests:
        print(__doc__.split("\n\n")[1], file=sys.stderr)
        return 2
    try:
        tests[argv[0]]()
    except (Failure, testhost.TestHostError) as error:
        print(f"delivery_test {argv[0]}: FAILED: {error}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
