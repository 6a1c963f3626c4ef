#!/usr/bin/env bash
# Build the local, systemd-enabled Debian images the Molecule scenarios run:
#   localhost/stacksense-test:debian11  (bullseye)
#   localhost/stacksense-test:debian12  (bookworm)
#   localhost/stacksense-test:debian13  (trixie)
# No registry is needed: each image is a debootstrap "minbase" root file
# system (plus a minimal-server package set) imported with `podman import`.
#
# Usage: scripts/build-images.sh [--force] [--serial|--parallel] [debian11 ...]
#   --force      rebuild images that already exist (default: reuse them)
#   --serial     build one image after the other (about 60 s each)
#   --parallel   build all requested images at once (the default: on 2 cores
#                the three take 110-145 s together against 180 s serially)
#   debianNN     build only these (default: all three)
# Environment:
#   DEBIAN_MIRROR           default http://deb.debian.org/debian
#   DEBIAN_SECURITY_MIRROR  default http://deb.debian.org/debian-security
#   BUILD_DIR               scratch space, default /var/tmp (~500 MiB each)
#   CONTAINERS_CONF         podman settings; defaults to molecule/containers.conf
#
# Must run as root (debootstrap, chroot, and root podman storage, which is
# where Molecule's containers run from).
set -euo pipefail

SCRIPT_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
REPO_DIR="$(dirname "$SCRIPT_DIR")"
export CONTAINERS_CONF="${CONTAINERS_CONF:-$REPO_DIR/molecule/containers.conf}"

MIRROR="${DEBIAN_MIRROR:-http://deb.debian.org/debian}"
SECURITY_MIRROR="${DEBIAN_SECURITY_MIRROR:-http://deb.debian.org/debian-security}"
IMAGE_REPO=localhost/stacksense-test # molecule/shared/create.yml expects it
BUILD_DIR="${BUILD_DIR:-/var/tmp}"

# What a small, realistic Debian server has on top of minbase. Deliberately
# NOT python3-requests: the role under test has to install it.
PACKAGES=(
  systemd systemd-sysv dbus            # init, and the bus systemctl/logind use
  python3 python3-apt                  # Ansible, and its apt module
  ca-certificates curl                 # HTTPS trust store; HTTP checks in tests
  sudo                                 # Ansible's default become method
  iproute2 iputils-ping netbase procps # ip/ss, ping, /etc/services, ps/pgrep
  tzdata less
)

# Units with nothing to do in an unprivileged container: no consoles for a
# getty, a root file system podman has mounted, no kernel modules, devices or
# clock to manage, no first-boot wizard. Most skip themselves by a condition,
# but depending on host and systemd version some fail and leave the system
# "degraded", or stall the boot, so they are masked outright.
MASK_UNITS=(
  getty@tty1.service console-getty.service serial-getty@.service
  systemd-remount-fs.service
  systemd-firstboot.service
  sys-kernel-config.mount sys-kernel-debug.mount sys-kernel-tracing.mount
  sys-fs-fuse-connections.mount
  systemd-modules-load.service kmod-static-nodes.service
  systemd-udevd.service systemd-udev-trigger.service systemd-udev-settle.service
  systemd-hwdb-update.service
  systemd-timesyncd.service
  e2scrub_reap.service e2scrub_all.timer
)

declare -A SUITE=([debian11]=bullseye [debian12]=bookworm [debian13]=trixie)
ALL_TAGS=(debian11 debian12 debian13)

die() { echo "build-images: error: $*" >&2; exit 1; }
log() { echo "build-images: $*" >&2; }

usage() { sed -n '2,/^set -euo/{/^set -euo/d;s/^# \{0,1\}//;p}' "$0"; }

FORCE=0
MODE=parallel
TAGS=()
for arg in "$@"; do
  case "$arg" in
    --force) FORCE=1 ;;
    --serial) MODE=serial ;;
    --parallel) MODE=parallel ;;
    -h | --help) usage; exit 0 ;;
    debian11 | debian12 | debian13) TAGS+=("$arg") ;;
    *) usage >&2; die "unknown argument: $arg" ;;
  esac
done
[[ ${#TAGS[@]} -gt 0 ]] || TAGS=("${ALL_TAGS[@]}")

[[ $(id -u) -eq 0 ]] || die "must run as root (debootstrap and chroot need it; Molecule uses root's podman storage)"
command -v debootstrap >/dev/null || die "debootstrap not found: apt-get install debootstrap"
command -v podman >/dev/null || die "podman not found: apt-get install podman runc"
[[ -r /usr/share/keyrings/debian-archive-keyring.gpg ]] ||
  die "no Debian archive keyring: apt-get install debian-archive-keyring"
mkdir -p "$BUILD_DIR"

write_sources() { # ROOT SUITE
  local root=$1 suite=$2
  rm -f "$root/etc/apt/sources.list"
  if [[ $suite == trixie ]]; then
    # trixie installs write deb822 sources, as a real trixie server has them.
    cat >"$root/etc/apt/sources.list.d/debian.sources" <<EOF
Types: deb
URIs: $MIRROR
Suites: $suite $suite-updates
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg

Types: deb
URIs: $SECURITY_MIRROR
Suites: $suite-security
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg
EOF
  else
    cat >"$root/etc/apt/sources.list" <<EOF
deb $MIRROR $suite main
deb $MIRROR $suite-updates main
deb $SECURITY_MIRROR $suite-security main
EOF
  fi
}

build_one() { # TAG
  local tag=$1 suite=${SUITE[$1]} image="$IMAGE_REPO:$1" root start
  start=$SECONDS
  root="$(mktemp -d "$BUILD_DIR/stacksense-$tag.XXXXXX")"
  chmod 0755 "$root" # becomes the image's /: mktemp made it 0700
  # Always unmount and delete the scratch root, even on failure.
  # shellcheck disable=SC2064
  trap "umount -l '$root/proc' 2>/dev/null || true; rm -rf --one-file-system '$root'" EXIT
  trap 'exit 143' INT TERM # so that the EXIT trap runs

  log "$tag: debootstrap $suite"
  debootstrap --variant=minbase --components=main \
    --include="$(IFS=,; echo "${PACKAGES[*]}")" \
    "$suite" "$root" "$MIRROR"

  write_sources "$root" "$suite"
  # No daemons may start inside the build chroot.
  printf '#!/bin/sh\nexit 101\n' >"$root/usr/sbin/policy-rc.d"
  chmod 0755 "$root/usr/sbin/policy-rc.d"
  # Keep images small, as Debian's own slim container images do.
  cat >"$root/etc/dpkg/dpkg.cfg.d/01-container-slim" <<'EOF'
path-exclude /usr/share/doc/*
path-include /usr/share/doc/*/copyright
path-exclude /usr/share/man/*
path-exclude /usr/share/info/*
path-exclude /usr/share/locale/*
path-include /usr/share/locale/locale.alias
EOF
  cat >"$root/etc/apt/apt.conf.d/01-container" <<'EOF'
APT::Install-Recommends "false";
APT::Install-Suggests "false";
EOF

  log "$tag: apply $suite-updates and $suite-security"
  mount -t proc proc "$root/proc"
  chroot "$root" env DEBIAN_FRONTEND=noninteractive LC_ALL=C.UTF-8 \
    sh -euc 'apt-get -q update; apt-get -qy -o Dpkg::Use-Pty=0 -o Dpkg::Options::=--force-confold dist-upgrade'
  umount "$root/proc"

  local unit
  for unit in "${MASK_UNITS[@]}"; do
    ln -sfn /dev/null "$root/etc/systemd/system/$unit"
  done
  # Boot to multi-user, not graphical.
  ln -sfn /lib/systemd/system/multi-user.target "$root/etc/systemd/system/default.target"
  # Journal in memory only: nothing to flush to an overlay on stop.
  mkdir -p "$root/etc/systemd/journald.conf.d"
  printf '[Journal]\nStorage=volatile\n' >"$root/etc/systemd/journald.conf.d/container.conf"

  # Each container gets its own machine id at boot; files podman bind-mounts.
  : >"$root/etc/machine-id"
  rm -f "$root/var/lib/dbus/machine-id"
  : >"$root/etc/resolv.conf"
  : >"$root/etc/hostname"

  rm -f "$root/usr/sbin/policy-rc.d"
  rm -rf "$root"/var/cache/apt/*.bin "$root"/var/cache/apt/archives/*.deb \
    "$root"/var/cache/apt/archives/partial/* "$root"/var/lib/apt/lists/* \
    "$root"/var/cache/debconf/*-old "$root"/var/lib/dpkg/*-old \
    "$root"/var/log/*.log "$root"/var/log/apt/* "$root"/tmp/* "$root"/var/tmp/* \
    "$root"/usr/share/man/* "$root"/usr/share/info/*
  find "$root/usr/share/doc" -mindepth 2 ! -type d ! -name copyright -delete
  find "$root/usr/share/doc" -mindepth 1 -type d -empty -delete
  find "$root/usr/share/locale" -mindepth 1 -maxdepth 1 ! -name locale.alias -exec rm -rf {} +
  find "$root/usr/lib" -name __pycache__ -type d -prune -exec rm -rf {} +
  # No package lists ship (as in Debian's own images), and the empty lists
  # directory is dated 1970, so that apt's cache_valid_time sees a stale cache
  # and updates it: with a fresh date it would skip the update and find nothing.
  chroot "$root" install -d -o _apt -g root -m 0700 /var/lib/apt/lists/partial
  rm -f "$root/var/lib/apt/periodic/update-success-stamp"
  touch -d @0 "$root/var/lib/apt/lists"

  log "$tag: podman import $image"
  local old_id
  old_id="$(podman image inspect --format '{{.Id}}' "$image" 2>/dev/null || true)"
  tar --numeric-owner --xattrs --acls -C "$root" -c . |
    podman import \
      --change 'CMD ["/sbin/init"]' \
      --change 'STOPSIGNAL SIGRTMIN+3' \
      --change "LABEL org.opencontainers.image.title=stacksense-test org.opencontainers.image.version=$tag debian.suite=$suite" \
      --message "debootstrap minbase $suite for StackSense Molecule tests" \
      - "$image" >/dev/null
  # A --force rebuild leaves the previous image untagged: drop it, unless a
  # container still uses it.
  if [[ -n $old_id ]]; then podman rmi "$old_id" >/dev/null 2>&1 || true; fi
  log "$tag: built $image in $((SECONDS - start)) s"
}

# Which of the requested images still need a build?
TODO=()
for tag in "${TAGS[@]}"; do
  if [[ $FORCE -eq 0 ]] && podman image exists "$IMAGE_REPO:$tag"; then
    log "$tag: $IMAGE_REPO:$tag exists, reusing it (--force rebuilds)"
  else
    TODO+=("$tag")
  fi
done
[[ ${#TODO[@]} -gt 0 ]] || exit 0

start=$SECONDS
if [[ $MODE == serial || ${#TODO[@]} -eq 1 ]]; then
  for tag in "${TODO[@]}"; do
    (build_one "$tag")
  done
else
  # One log per build, so parallel output stays readable; shown on failure.
  logdir="$(mktemp -d "$BUILD_DIR/stacksense-logs.XXXXXX")"
  declare -A PIDS=()
  # On Ctrl-C or TERM stop every process of every build (each build runs in
  # its own process group); each build then deletes its scratch root.
  stop_builds() {
    local pid
    for pid in "${PIDS[@]}"; do kill -TERM -- "-$pid"; done 2>/dev/null
    wait
    rm -rf "$logdir"
    exit 130
  }
  trap stop_builds INT TERM
  set -m # job control: a process group per background build
  for tag in "${TODO[@]}"; do
    (build_one "$tag") </dev/null >"$logdir/$tag.log" 2>&1 &
    PIDS[$tag]=$!
    log "$tag: building in the background (log: $logdir/$tag.log)"
  done
  set +m
  failed=()
  for tag in "${TODO[@]}"; do
    if wait "${PIDS[$tag]}"; then
      grep '^build-images:' "$logdir/$tag.log" | tail -n 1 >&2
    else
      failed+=("$tag")
      log "$tag: FAILED, last lines of its log:"
      tail -n 40 "$logdir/$tag.log" >&2
    fi
  done
  [[ ${#failed[@]} -eq 0 ]] || die "failed to build: ${failed[*]} (logs in $logdir)"
  rm -rf "$logdir"
fi
log "done in $((SECONDS - start)) s: ${TODO[*]}"
