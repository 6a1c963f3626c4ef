#!/usr/bin/env python3
"""Start, reach and remove podman test hosts: Debian containers that boot systemd as PID 1.

The one way this repository makes a test host. molecule/shared/create.yml, scripts/demo.sh,
bench/deploy_scale.py and the collection and EE tests (scripts/delivery_test.py) all call it,
as a command or as a Python module:

    scripts/testhost.py start NAME --image IMAGE [options]   start one host (and wait for it)
    scripts/testhost.py wait NAME...                         wait until they have booted
    scripts/testhost.py address NAME                         its IPv4 address on its network
    scripts/testhost.py ssh-image BASE                       BASE + openssh-server (built once)
    scripts/testhost.py remove NAME... [--label KEY=VALUE]   remove them (only if labelled so)

    import testhost; testhost.start("coll-1", image, labels=["stacksense.test=coll"])

What each option of `start` is for:

  --image IMAGE        a systemd-enabled image, normally localhost/stacksense-test:debianNN
                       from scripts/build-images.sh.
  --hostname NAME      the host name inside (default: the container's name); the role and the
                       receiver see it.
  --label KEY=VALUE    (repeatable) marks the container as the caller's. An existing container
                       with that name is reused (or replaced with --replace) only if it carries
                       every label given; `remove --label` removes only containers carrying it.
                       So callers never touch each other's containers.
  --replace            remove an existing (own) container of that name first: a fresh host.
  --network NET        the podman network (default: podman's bridge). `host` or `none` too.
                       On a bridge the bridge's MAC address is pinned (see pin_bridge).
  --volume SRC:DST[:OPTS]  (repeatable) shared mounts: host files or directories the host and
                       the test both see (a receiver's records, a key, a fixture); podman -v.
  --tmpfs PATH[:OPTS]  (repeatable) a tmpfs inside, e.g. /run/lock.
  --env KEY=VALUE      (repeatable) environment of PID 1 (systemd passes it to nothing else).
  --cap-add CAP        (repeatable; default SYS_ADMIN) capabilities. Without CAP_SYS_ADMIN
                       systemd cannot set up the mount namespaces a hardened unit asks for
                       (ProtectSystem=, PrivateTmp=, ...): such a unit fails with 226/NAMESPACE.
  --ulimit NAME=SOFT:HARD  (repeatable; default nofile=1024:1024 and nproc=1024:1024) fixed
                       limits: podman's default copies the caller's hard limits, which a root
                       without CAP_SYS_RESOURCE (CI sandboxes) cannot set.
  --privileged         a privileged container (only for tests that need it).
  --cgroupns MODE      podman --cgroupns (host, private).
  --no-systemd         do not run systemd as PID 1 (give --command, e.g. sleep infinity): a
                       host without systemd; no boot to wait for.
  --command ARG...     PID 1's command line (default /sbin/init). Must come last.
  --ssh-user USER      reach the host over SSH like a real server: the image becomes
                       ssh-image(IMAGE) (sshd enabled), USER is created if missing and, unless
                       it is root, gets passwordless sudo (so Ansible's become is exercised);
                       --ssh-key PUBFILE goes to USER's authorized_keys.
  --ssh-key PUBFILE    the public key allowed to log in as --ssh-user.
  --no-wait            return once the container runs; `wait` later (boot several at once).
  --boot-timeout S     seconds to wait for systemd (default 120): `systemctl is-system-running`
                       must say running or degraded; degraded hosts' failed units are printed.

The runtime is runc and the ulimits are fixed by molecule/containers.conf, which this script
uses (CONTAINERS_CONF) unless the caller set another. Must run as root (root podman storage,
where the test images are).
"""

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_CAPABILITIES = ("SYS_ADMIN",)
DEFAULT_ULIMITS = ("nofile=1024:1024", "nproc=1024:1024")
BOOT_TIMEOUT = 120
SSH_LABEL = "stacksense.testhost.ssh"


class TestHostError(Exception):
    """A test host could not be started or reached; the message says why."""


def _env():
    env = dict(os.environ)
    env.setdefault("CONTAINERS_CONF", str(ROOT / "molecule" / "containers.conf"))
    return env


def podman(*args, check=True, input=None, timeout=600):
    """Run podman; return the CompletedProcess (text). check=True raises TestHostError."""
    result = subprocess.run(["podman", *args], env=_env(), input=input, timeout=timeout,
                            capture_output=True, text=True)
    if check and result.returncode != 0:
        raise TestHostError(f"podman {' '.join(args[:3])} ... exited {result.returncode}: "
                            f"{result.stderr.strip() or result.stdout.strip()}")
    return result


def exists(name):
    return podman("container", "exists", name, check=False).returncode == 0


def labels_of(name):
    out = podman("container", "inspect", "--format", "{{json .Config.Labels}}", name).stdout
    return json.loads(out) or {}


def _owned(name, labels):
    have = labels_of(name)
    return all(have.get(k) == v for k, v in (label.split("=", 1) for label in labels))


def ensure_ssh_image(base, keep_apt=False):
    """BASE plus openssh-server, sshd enabled at boot: `BASE-ssh`, built once and reused.

    keep_apt: keep the apt lists and downloaded .debs (an image seeded with them for the
    benchmarks, bench/deploy_scale.py), else they are removed as in the test images."""
    if base.endswith("-ssh"):  # made here already
        return base
    image = base + "-ssh"
    if podman("image", "exists", image, check=False).returncode == 0:
        return image
    print(f"testhost: building {image} (openssh-server, about 20 s)", file=sys.stderr)
    name = "testhost-build-" + str(os.getpid())
    podman("rm", "-f", "-t", "0", name, check=False)
    try:
        podman("run", "--name", name, "--systemd=false", base, "sh", "-euc",
               "export DEBIAN_FRONTEND=noninteractive; apt-get -q update >/dev/null; "
               "apt-get -qy install openssh-server >/dev/null; "
               "systemctl enable ssh.service >/dev/null 2>&1; "
               + ("true" if keep_apt else
                  "rm -rf /var/lib/apt/lists/* /var/cache/apt/archives/*.deb; "
                  "touch -d @0 /var/lib/apt/lists"))
        podman("commit", "--quiet", "--change", f"LABEL {SSH_LABEL}=true", name, image)
    finally:
        podman("rm", "-f", "-t", "0", name, check=False)
    return image


def pin_bridge(network=None):
    """Pin the MAC address of a podman bridge (default: podman's own).

    A Linux bridge takes the lowest MAC of its ports unless one was set: when another test's
    container leaves, the bridge's MAC changes and these hosts lose this machine (and so the
    receiver) until their ARP entries expire. Setting the MAC to its current value pins it.
    netavark deletes the bridge with its last container, hence after every start.
    """
    network = network or "podman"
    if network in ("host", "none") or network.startswith(("container:", "ns:", "slirp")):
        return False
    bridge = podman("network", "inspect", "--format", "{{.NetworkInterface}}", network,
                    check=False).stdout.strip()
    sys_dir = Path("/sys/class/net") / bridge
    if not bridge or not sys_dir.exists():
        return False
    if (sys_dir / "addr_assign_type").read_text().strip() == "3":  # 3: set explicitly
        return False
    address = (sys_dir / "address").read_text().strip()
    subprocess.run(["ip", "link", "set", "dev", bridge, "address", address], check=True)
    return True


def setup_ssh(name, user, pubkey_text):
    """Create USER (sudo without password unless root) and authorize the key."""
    script = r"""
set -eu
user=$1
if ! id -u "$user" >/dev/null 2>&1; then useradd --create-home --shell /bin/bash "$user"; fi
if [ "$user" != root ]; then
  printf '%s ALL=(ALL:ALL) NOPASSWD: ALL\n' "$user" >"/etc/sudoers.d/90-$user"
  chmod 0440 "/etc/sudoers.d/90-$user"
fi
home=$(getent passwd "$user" | cut -d: -f6)
group=$(id -gn "$user")
install -d -m 0700 -o "$user" -g "$group" "$home/.ssh"
cat >"$home/.ssh/authorized_keys"
chown "$user:$group" "$home/.ssh/authorized_keys"
chmod 0600 "$home/.ssh/authorized_keys"
"""
    podman("exec", "-i", name, "sh", "-c", script, "setup-ssh", user, input=pubkey_text)


def start(name, image, *, hostname=None, labels=(), replace=False, network=None, volumes=(),
          tmpfs=(), env=(), capabilities=DEFAULT_CAPABILITIES, ulimits=DEFAULT_ULIMITS,
          privileged=False, cgroupns=None, systemd=True, command=None, ssh_user=None,
          ssh_key=None, wait=True, boot_timeout=BOOT_TIMEOUT):
    """Start test host NAME (see the module docstring for each option).

    Returns "created", "started" (it existed, stopped) or "running" (reused as it was).
    """
    labels = list(labels)
    state = ""
    if exists(name):
        if not _owned(name, labels):
            raise TestHostError(f"a container named {name} exists without the labels "
                                f"{labels}: not made by this caller; remove or rename it")
        if replace:
            podman("rm", "-f", "-t", "0", name)
        else:
            state = podman("container", "inspect", "--format", "{{.State.Status}}",
                           name).stdout.strip()
    if ssh_user:
        image = ensure_ssh_image(image)
    result = "running"
    if not state:
        args = ["run", "--detach", "--name", name, "--hostname", hostname or name,
                "--systemd=always" if systemd else "--systemd=false"]
        for cap in capabilities:
            args += ["--cap-add", cap]
        for limit in ulimits:
            args += ["--ulimit", limit]
        for label in labels:
            args += ["--label", label]
        if network:
            args += ["--network", network]
        for volume in volumes:
            args += ["--volume", volume]
        for mount in tmpfs:
            args += ["--tmpfs", mount]
        for item in env:
            args += ["--env", item]
        if privileged:
            args.append("--privileged")
        if cgroupns:
            args.append("--cgroupns=" + cgroupns)
        podman(*args, image, *(command or ["/sbin/init"]))
        result = "created"
    elif state != "running":
        podman("start", name)
        result = "started"
    pin_bridge(network)
    if ssh_user:
        if podman("container", "inspect", "--format", "{{.State.Status}}",
                  name).stdout.strip() != "running":
            raise TestHostError(f"{name}: systemd exited at once; {inotify_hint()}")
        setup_ssh(name, ssh_user, Path(ssh_key).read_text() if ssh_key else "")
    if wait and systemd:
        wait_booted([name], boot_timeout)
    return result


def wait_booted(names, timeout=BOOT_TIMEOUT):
    """Wait until systemd in each host says running or degraded; print degraded units.

    The deadline is shared: hosts boot in parallel. Raises TestHostError on timeout.
    Returns {name: state}.
    """
    deadline = time.monotonic() + timeout
    states = {}
    for name in names:
        while True:
            state = podman("exec", name, "systemctl", "is-system-running",
                           check=False).stdout.strip()
            if state in ("running", "degraded"):
                break
            status = podman("container", "inspect", "--format", "{{.State.Status}}", name,
                            check=False).stdout.strip()
            if status in ("exited", "stopped"):
                raise TestHostError(f"{name}: systemd exited at once; {inotify_hint()}")
            if time.monotonic() > deadline:
                raise TestHostError(f"{name}: systemd did not finish booting within "
                                    f"{timeout} s (state: {state or 'unknown'})")
            time.sleep(0.5)
        states[name] = state
        if state == "degraded":
            failed = podman("exec", name, "systemctl", "--failed", "--no-legend", "--plain",
                            check=False).stdout.strip()
            print(f"testhost: {name} is degraded: {failed}", file=sys.stderr)
    return states


def inotify_hint():
    """Why a container's systemd may die silently: every systemd takes inotify instances."""
    limit = int(Path("/proc/sys/fs/inotify/max_user_instances").read_text())
    used = 0
    for fd_dir in Path("/proc").glob("[0-9]*/fd"):
        try:
            used += sum(1 for fd in fd_dir.iterdir() if os.readlink(fd) == "anon_inode:inotify")
        except OSError:
            continue
    if used >= limit * 0.9:
        return (f"inotify instances are exhausted ({used} in use, fs.inotify.max_user_instances "
                f"= {limit}): stop other containers or raise it, e.g. "
                "sysctl -w fs.inotify.max_user_instances=1024")
    return "see podman logs and podman inspect for why"


def address(name):
    """The host's IPv4 address on its (first) network, as other containers reach it."""
    out = podman("container", "inspect", "--format",
                 "{{range .NetworkSettings.Networks}}{{.IPAddress}} {{end}}", name).stdout
    addresses = out.split() or [podman("container", "inspect", "--format",
                                       "{{.NetworkSettings.IPAddress}}", name).stdout.strip()]
    if not addresses or not addresses[0]:
        raise TestHostError(f"{name} has no IP address (network host or none?)")
    return addresses[0]


def remove(names, label=None):
    """Remove the named hosts that exist (and carry LABEL=VALUE, when given)."""
    names = [n for n in names if exists(n) and (label is None or _owned(n, [label]))]
    if names:
        # systemd stops in a second on SIGRTMIN+3: do not wait podman's default 10 s
        podman("rm", "-f", "-t", "5", *names)
    return names


def names_with_label(label):
    """Every container (running or not) that carries LABEL=VALUE."""
    out = podman("ps", "-a", "--filter", "label=" + label, "--format", "{{.Names}}").stdout
    return out.split()


def main(argv=None):
    parser = argparse.ArgumentParser(
        prog="testhost.py", description="Podman systemd test hosts (see the docstring).")
    sub = parser.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("start", help="start one host")
    p.add_argument("name")
    p.add_argument("--image", required=True)
    p.add_argument("--hostname")
    p.add_argument("--label", action="append", default=[])
    p.add_argument("--replace", action="store_true")
    p.add_argument("--network")
    p.add_argument("--volume", action="append", default=[])
    p.add_argument("--tmpfs", action="append", default=[])
    p.add_argument("--env", action="append", default=[])
    p.add_argument("--cap-add", action="append", dest="capabilities")
    p.add_argument("--ulimit", action="append", dest="ulimits")
    p.add_argument("--privileged", action="store_true")
    p.add_argument("--cgroupns")
    p.add_argument("--no-systemd", dest="systemd", action="store_false")
    p.add_argument("--ssh-user")
    p.add_argument("--ssh-key")
    p.add_argument("--no-wait", dest="wait", action="store_false")
    p.add_argument("--boot-timeout", type=int, default=BOOT_TIMEOUT)
    p.add_argument("--command", nargs=argparse.REMAINDER)
    p = sub.add_parser("wait", help="wait until the hosts have booted")
    p.add_argument("names", nargs="+")
    p.add_argument("--boot-timeout", type=int, default=BOOT_TIMEOUT)
    p = sub.add_parser("address", help="print a host's IPv4 address")
    p.add_argument("name")
    p = sub.add_parser("ssh-image", help="print BASE-ssh, building it if missing")
    p.add_argument("base")
    p = sub.add_parser("remove", help="remove hosts")
    p.add_argument("names", nargs="*")
    p.add_argument("--label", help="only containers carrying KEY=VALUE (all of them if no NAME)")
    args = parser.parse_args(argv)
    try:
        if args.cmd == "start":
            print(start(args.name, args.image, hostname=args.hostname, labels=args.label,
                        replace=args.replace, network=args.network, volumes=args.volume,
                        tmpfs=args.tmpfs, env=args.env,
                        capabilities=args.capabilities or DEFAULT_CAPABILITIES,
                        ulimits=args.ulimits or DEFAULT_ULIMITS, privileged=args.privileged,
                        cgroupns=args.cgroupns, systemd=args.systemd, command=args.command,
                        ssh_user=args.ssh_user, ssh_key=args.ssh_key, wait=args.wait,
                        boot_timeout=args.boot_timeout))
        elif args.cmd == "wait":
            for name, state in wait_booted(args.names, args.boot_timeout).items():
                print(name, state)
        elif args.cmd == "address":
            print(address(args.name))
        elif args.cmd == "ssh-image":
            print(ensure_ssh_image(args.base))
        elif args.cmd == "remove":
            if not args.names and not args.label:
                parser.error("remove: give NAMEs, --label, or both")
            names = args.names or names_with_label(args.label)
            for name in remove(names, args.label):
                print(name)
    except TestHostError as error:
        print(f"testhost: error: {error}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
