#!/usr/bin/env bash
# Local fleet demo: a few systemd containers, the reference receiver on this
# machine, the agent deployed with the real playbook, and a live status view.
# See docs/DEMO.md. The Makefile targets demo, demo-status, demo-outage,
# demo-restore, demo-down and demo-check call this script.
#
# Usage: scripts/demo.sh COMMAND
#   up [--no-watch]   set up what is missing (packages, venv, images), start or
#                     reuse the containers and the receiver, deploy, then watch
#                     the fleet every 2 s until Ctrl-C (--no-watch: print once)
#   status            watch the fleet (every 2 s until Ctrl-C)
#   outage HOST       stop the container of HOST (demo-2, or 2): it turns
#                     offline DEMO_OFFLINE_AFTER s after its last heartbeat
#   restore HOST      start it again and wait until it is back online
#   down              remove the containers, their network, the receiver and
#                     build/demo
#   check             up --no-watch, assert in headless chromium that every
#                     host is online on the receiver's HTML page, then down
#   prereqs           only apt-install the missing packages
# Environment (read by `up`; later commands reuse what `up` saved):
#   DEMO_HOSTS           number of containers, default 3 (Debian 11, 12, 13, 11, ...)
#   DEMO_PORT            receiver port on this machine, default 8480
#   DEMO_INTERVAL        agent heartbeat interval in the demo, default 5 s
#   DEMO_OFFLINE_AFTER   receiver's offline threshold, default 30 s
# Must run as root (root podman storage, apt).
set -euo pipefail

SCRIPT_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
REPO_DIR="$(dirname "$SCRIPT_DIR")"
DEMO_DIR="$REPO_DIR/build/demo"
STATE_FILE="$DEMO_DIR/demo.env"
export CONTAINERS_CONF="${CONTAINERS_CONF:-$REPO_DIR/molecule/containers.conf}"

PREFIX=stacksense-demo-   # container names: stacksense-demo-1 .. N
LABEL=stacksense.demo=true # every demo container carries it; down removes only these
NETWORK=stacksense-demo    # the demo's own podman network (bridge), also labelled
IMAGE_REPO=localhost/stacksense-test
IMAGE_TAGS=(debian11 debian12 debian13)
BOOT_TIMEOUT=120
RECEIVER="$REPO_DIR/receiver/stacksense_receiver.py"
FLEET_STATUS="$REPO_DIR/scripts/fleet_status.py"
VENV_BIN="$REPO_DIR/.venv/bin"
# The receiver keeps running after `make demo`: the system's Python, not .venv's
# (which `make clean` deletes). It only needs the standard library.
RECEIVER_PYTHON=python3
[[ -x /usr/bin/python3 ]] && RECEIVER_PYTHON=/usr/bin/python3

log() { echo "demo: $*" >&2; }
die() {
  echo "demo: error: $*" >&2
  exit 1
}
usage() { sed -n '2,/^set -euo/{/^set -euo/d;s/^# \{0,1\}//;p}' "$0"; }

# Settings: the environment wins at `up`; other commands use what `up` saved.
load_settings() {
  local saved_hosts="" saved_port="" saved_interval="" saved_offline=""
  if [[ -r $STATE_FILE ]]; then
    # shellcheck disable=SC1090
    source "$STATE_FILE"
    saved_hosts=${SAVED_HOSTS:-} saved_port=${SAVED_PORT:-}
    saved_interval=${SAVED_INTERVAL:-} saved_offline=${SAVED_OFFLINE_AFTER:-}
  fi
  HOSTS=${DEMO_HOSTS:-${saved_hosts:-3}}
  PORT=${DEMO_PORT:-${saved_port:-8480}}
  INTERVAL=${DEMO_INTERVAL:-${saved_interval:-5}}
  OFFLINE_AFTER=${DEMO_OFFLINE_AFTER:-${saved_offline:-30}}
  [[ $HOSTS =~ ^[1-9][0-9]*$ && $HOSTS -le 50 ]] || die "DEMO_HOSTS=$HOSTS: expected 1 to 50"
  [[ $PORT =~ ^[1-9][0-9]*$ && $PORT -le 65535 ]] || die "DEMO_PORT=$PORT: expected a port number"
  [[ $INTERVAL =~ ^[1-9][0-9]*$ ]] || die "DEMO_INTERVAL=$INTERVAL: expected whole seconds"
  [[ $OFFLINE_AFTER =~ ^[1-9][0-9]*$ ]] || die "DEMO_OFFLINE_AFTER=$OFFLINE_AFTER: expected whole seconds"
  URL="http://127.0.0.1:$PORT"
}

save_settings() {
  mkdir -p "$DEMO_DIR"
  printf 'SAVED_HOSTS=%s\nSAVED_PORT=%s\nSAVED_INTERVAL=%s\nSAVED_OFFLINE_AFTER=%s\n' \
    "$HOSTS" "$PORT" "$INTERVAL" "$OFFLINE_AFTER" >"$STATE_FILE"
}

require_root() {
  [[ $(id -u) -eq 0 ]] || die "run as root (the demo uses root's podman storage and apt)"
}

# ---------------------------------------------------------------- set-up

apt_install_missing() { # PACKAGE...
  local pkg missing=()
  for pkg in "$@"; do
    dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q 'install ok installed' ||
      missing+=("$pkg")
  done
  [[ ${#missing[@]} -gt 0 ]] || return 0
  log "apt-get install ${missing[*]} (one time)"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -q
  apt-get install -qy --no-install-recommends "${missing[@]}"
}

ensure_prereqs() {
  require_root
  command -v apt-get >/dev/null || die "apt-get not found: the demo needs Debian or Ubuntu"
  # python3-venv for `make venv`; the keyring for scripts/build-images.sh; openssh-client
  # (ssh-keygen) for `make ee-test`; shellcheck for `make gates`. `make prereqs` (part of
  # `make test`) runs this too.
  apt_install_missing podman runc debootstrap iptables debian-archive-keyring python3-venv \
    openssh-client shellcheck
}

ensure_venv() {
  log "virtualenv: make venv"
  make -C "$REPO_DIR" --no-print-directory venv >&2
}

image_for() { # INDEX (1-based) -> image, cycling over the Debian releases
  echo "$IMAGE_REPO:${IMAGE_TAGS[$((($1 - 1) % ${#IMAGE_TAGS[@]}))]}"
}

ensure_images() {
  local count=$((HOSTS < ${#IMAGE_TAGS[@]} ? HOSTS : ${#IMAGE_TAGS[@]}))
  log "images: ${IMAGE_TAGS[*]:0:count} (built only if missing, about 2 min)"
  "$REPO_DIR/scripts/build-images.sh" "${IMAGE_TAGS[@]:0:count}"
}

# ---------------------------------------------------------------- containers

# Map demo-2 / stacksense-demo-2 / 2 to the container name.
container_of() { # HOST
  local host=${1#"$PREFIX"}
  host=${host#demo-}
  [[ $host =~ ^[1-9][0-9]*$ ]] || die "HOST=$1: expected demo-N, e.g. HOST=demo-2"
  echo "$PREFIX$host"
}

container_state() { # NAME -> running/exited/... or "" if it does not exist
  podman container inspect --format '{{.State.Status}}' "$1" 2>/dev/null || true
}

is_demo_container() { # NAME
  [[ $(podman container inspect --format '{{index .Config.Labels "stacksense.demo"}}' "$1" \
    2>/dev/null) == true ]]
}

demo_containers() { # names of every demo container, running or not
  podman ps -a --filter "label=$LABEL" --format '{{.Names}}' | grep "^${PREFIX}[0-9]*$" || true
}

is_demo_network() {
  [[ $(podman network inspect --format '{{index .Labels "stacksense.demo"}}' "$NETWORK" \
    2>/dev/null) == true ]]
}

# The demo's containers get their own bridge, so that other containers on this
# machine coming and going never disturb the fleet (see pin_bridge in scripts/testhost.py).
ensure_network() {
  if podman network exists "$NETWORK"; then
    is_demo_network || die "a podman network named $NETWORK exists but was not made by the demo"
    return 0
  fi
  log "podman network create $NETWORK"
  podman network create --label "$LABEL" "$NETWORK" >/dev/null
}

# Every demo container is a test host from scripts/testhost.py (systemd as PID 1, runc,
# SYS_ADMIN, fixed ulimits; it also pins the bridge's MAC address, so that a demo-outage does
# not cut the other hosts off the receiver). This only names and labels them.
TESTHOST="$REPO_DIR/scripts/testhost.py"

start_container() { # INDEX
  local name="$PREFIX$1" state
  state="$(container_state "$name")"
  if [[ -n $state ]] && ! is_demo_container "$name"; then
    die "a container named $name exists but was not made by the demo; remove or rename it"
  fi
  case "$state" in
    running) log "$name: running, reusing it" ;;
    "") log "$name: starting from $(image_for "$1")" ;;
    *) log "$name: $state, starting it again" ;;
  esac
  python3 "$TESTHOST" start "$name" --image "$(image_for "$1")" --hostname "demo-$1" \
    --label "$LABEL" --network "$NETWORK" --no-wait >/dev/null
}

wait_booted() { # NAME...
  python3 "$TESTHOST" wait --boot-timeout "$BOOT_TIMEOUT" "$@" >/dev/null ||
    die "$*: systemd did not finish booting within $BOOT_TIMEOUT s"
  share_mounts "$@"
}

# systemd hands the agent its token (LoadCredential=) through a mount, which podman's private
# mount propagation blocks; real hosts have shared propagation already. A container booted
# again (demo-restore) starts private, so an agent that failed at boot is started once more.
share_mounts() { # NAME...
  local name
  for name in "$@"; do
    podman exec "$name" sh -c 'mount --make-rshared / &&
      if systemctl is-enabled -q stacksense-heartbeat 2>/dev/null &&
        ! systemctl is-active -q stacksense-heartbeat; then
        systemctl restart stacksense-heartbeat
      fi' || die "$name: cannot make its / a shared mount"
  done
}

ensure_containers() {
  local i name names=()
  ensure_network
  for ((i = 1; i <= HOSTS; i++)); do
    start_container "$i"
    names+=("$PREFIX$i")
  done
  # A smaller DEMO_HOSTS than last time: drop the extra demo containers.
  for name in $(demo_containers); do
    if ((${name#"$PREFIX"} > HOSTS)); then
      log "$name: beyond DEMO_HOSTS=$HOSTS, removing it"
      python3 "$TESTHOST" remove --label "$LABEL" "$name" >/dev/null
    fi
  done
  log "waiting for systemd to boot in the containers"
  wait_booted "${names[@]}"
}

# ---------------------------------------------------------------- receiver

receiver_command() { # sets RECEIVER_CMD
  RECEIVER_CMD=("$RECEIVER_PYTHON" "$RECEIVER" --listen "0.0.0.0:$PORT" --servers "$DEMO_DIR/servers.json"
    --offline-after "$OFFLINE_AFTER")
}

# The receiver's pid if the pid file names a live demo receiver, else nothing.
receiver_pid() {
  local pid
  pid="$(cat "$DEMO_DIR/receiver.pid" 2>/dev/null || true)"
  [[ $pid =~ ^[0-9]+$ ]] || return 0
  tr '\0' ' ' <"/proc/$pid/cmdline" 2>/dev/null | grep -q "stacksense_receiver.py" && echo "$pid"
  return 0
}

# Demo receivers whose pid file is gone (build/demo deleted by hand): the
# process listening on PORT, if it runs this repository's receiver.
orphan_receiver_pids() {
  command -v ss >/dev/null || return 0
  local pid
  for pid in $(ss -Hltnp "sport = :$PORT" 2>/dev/null | grep -o 'pid=[0-9]*' | cut -d= -f2 | sort -u); do
    tr '\0' ' ' <"/proc/$pid/cmdline" 2>/dev/null |
      grep -q "$RECEIVER --listen 0.0.0.0:$PORT --servers $DEMO_DIR/servers.json" && echo "$pid"
  done
  return 0
}

stop_pid() { # PID: TERM, then KILL after 5 s
  local pid=$1 i
  kill "$pid" 2>/dev/null || return 0
  for ((i = 0; i < 50; i++)); do
    kill -0 "$pid" 2>/dev/null || return 0
    sleep 0.1
  done
  kill -KILL "$pid" 2>/dev/null || true
}

stop_receiver() {
  local pid
  for pid in $({ receiver_pid; orphan_receiver_pids; } | sort -u); do
    log "stopping the receiver (pid $pid)"
    stop_pid "$pid"
  done
  rm -f "$DEMO_DIR/receiver.pid" "$DEMO_DIR/receiver.args"
}

port_in_use() { (exec 3<>"/dev/tcp/127.0.0.1/$PORT") 2>/dev/null; }

# Each demo host's own API token (the token API, as on the real server: one token per
# server), made once and kept in build/demo/tokens/ (mode 0600), so that a rerun reuses
# the receiver and changes nothing on the hosts.
host_token() { # host_token N: prints demo-N's token
  local file="$DEMO_DIR/tokens/demo-$1"
  if [[ ! -s $file ]]; then
    (umask 077 && mkdir -p "$DEMO_DIR/tokens" &&
      python3 -c 'import secrets; print(secrets.token_urlsafe(32))' >"$file")
  fi
  cat "$file"
}

write_servers_file() {
  local i sep=""
  local mask
  mask="$(umask)"
  umask 077 # tokens: owner only
  {
    echo "["
    for ((i = 1; i <= HOSTS; i++)); do
      printf '%s  {"id": %d, "name": "demo-%d", "token": "%s"}\n' "$sep" "$i" "$i" "$(host_token "$i")"
      sep=","
    done
    echo "]"
  } >"$DEMO_DIR/servers.json.new"
  umask "$mask"
  mv "$DEMO_DIR/servers.json.new" "$DEMO_DIR/servers.json"
}

ensure_receiver() {
  write_servers_file
  local pid wanted
  pid="$(receiver_pid)"
  receiver_command
  wanted="${RECEIVER_CMD[*]} $(md5sum <"$DEMO_DIR/servers.json")"
  if [[ -n $pid && $(cat "$DEMO_DIR/receiver.args" 2>/dev/null) == "$wanted" ]]; then
    log "receiver: running (pid $pid), reusing it"
    return 0
  fi
  [[ -z $pid ]] || log "receiver: settings changed, restarting it"
  stop_receiver
  if port_in_use; then
    die "port $PORT is in use by another program (see: ss -ltnp 'sport = :$PORT');" \
      "stop it or choose another port: make demo DEMO_PORT=8481"
  fi
  log "receiver: starting on 0.0.0.0:$PORT, offline after $OFFLINE_AFTER s (log: build/demo/receiver.log)"
  # Its own session, so that Ctrl-C in the status view leaves it running.
  # shellcheck disable=SC2016
  setsid bash -c 'echo $$ >"$0"; exec "$@"' "$DEMO_DIR/receiver.pid" "${RECEIVER_CMD[@]}" \
    </dev/null >"$DEMO_DIR/receiver.log" 2>&1 &
  echo "$wanted" >"$DEMO_DIR/receiver.args"
  local i
  for ((i = 0; i < 50; i++)); do
    python3 "$FLEET_STATUS" "$URL" --once >/dev/null 2>&1 && return 0
    sleep 0.2
  done
  tail -n 20 "$DEMO_DIR/receiver.log" >&2 || true
  die "the receiver did not answer on $URL"
}

# ---------------------------------------------------------------- deploy

write_inventory() {
  local i
  local mask
  mask="$(umask)"
  umask 077 # tokens: owner only
  {
    echo "---"
    echo "# Generated by scripts/demo.sh: the demo's containers (make demo-down deletes it)."
    echo "all:"
    echo "  children:"
    echo "    stacksense_agents:"
    echo "      hosts:"
    for ((i = 1; i <= HOSTS; i++)); do
      echo "        demo-$i:"
      echo "          ansible_host: $PREFIX$i"
      echo "          stacksense_server_id: $i"
      echo "          stacksense_api_token: $(host_token "$i")"
    done
    echo "      vars:"
    echo "        ansible_connection: containers.podman.podman"
    echo "        # The receiver on this machine, as the containers see it."
    echo "        stacksense_api_url: http://host.containers.internal:$PORT"
  } >"$DEMO_DIR/inventory.yml.new"
  umask "$mask"
  mv "$DEMO_DIR/inventory.yml.new" "$DEMO_DIR/inventory.yml"
}

deploy() {
  write_inventory
  log "deploying: ansible-playbook -i build/demo/inventory.yml playbooks/deploy.yml" \
    "-e stacksense_interval=$INTERVAL (canary first, then the rest)"
  (cd "$REPO_DIR" && ANSIBLE_NOCOLOR=1 ANSIBLE_DISPLAY_SKIPPED_HOSTS=false "$VENV_BIN/ansible-playbook" \
    -i build/demo/inventory.yml playbooks/deploy.yml \
    -e "stacksense_interval=$INTERVAL" -e '{"stacksense_serial": [1, "100%"]}')
}

# ---------------------------------------------------------------- commands

print_guide() {
  local example="demo-$((HOSTS >= 2 ? 2 : 1))"
  cat <<EOF

  The demo fleet is up: $HOSTS container(s) ${PREFIX}1..$HOSTS, agents beating every $INTERVAL s.
  Receiver (a test stand-in for the StackSense server) on port $PORT;
  a server turns offline after $OFFLINE_AFTER s without a heartbeat.

  Status page in a browser:  $URL/
  Fleet in the terminal:     make demo-status
  Simulate an outage:        make demo-outage HOST=$example   (offline within ~$OFFLINE_AFTER s)
  Bring it back:             make demo-restore HOST=$example
  Tear everything down:      make demo-down

EOF
}

cmd_up() {
  local watch=1
  case "${1:-}" in
    --no-watch) watch=0 ;;
    "") ;;
    *) die "up: unknown option: $1" ;;
  esac
  local start=$SECONDS
  ensure_prereqs
  load_settings
  ensure_venv
  ensure_images
  mkdir -p "$DEMO_DIR"
  save_settings
  ensure_containers
  ensure_receiver
  deploy
  log "fleet up in $((SECONDS - start)) s"
  print_guide
  if ((watch)); then
    exec python3 "$FLEET_STATUS" "$URL" --interval 2
  fi
  python3 "$FLEET_STATUS" "$URL" --once
}

cmd_status() {
  load_settings
  [[ -n $(receiver_pid) ]] || die "the demo is not up (no receiver): make demo"
  exec python3 "$FLEET_STATUS" "$URL" --interval 2
}

cmd_outage() { # HOST
  [[ -n ${1:-} ]] || die "which host? make demo-outage HOST=demo-2"
  require_root
  load_settings
  local name
  name="$(container_of "$1")"
  is_demo_container "$name" || die "no demo container $name (make demo DEMO_HOSTS=...?)"
  log "$name: podman stop (shuts its systemd down: no more heartbeats)"
  podman stop --time 10 "$name" >/dev/null
  log "demo-${name#"$PREFIX"} is down since $(date +%T); the receiver marks it offline" \
    "$OFFLINE_AFTER s after its last heartbeat. Watch: make demo-status"
}

cmd_restore() { # HOST
  [[ -n ${1:-} ]] || die "which host? make demo-restore HOST=demo-2"
  require_root
  load_settings
  local name
  name="$(container_of "$1")"
  is_demo_container "$name" || die "no demo container $name (make demo DEMO_HOSTS=...?)"
  log "$name: podman start (systemd boots; the agent is enabled and starts at boot)"
  start_container "${name#"$PREFIX"}"
  wait_booted "$name"
  log "waiting for demo-${name#"$PREFIX"}'s next heartbeat"
  python3 "$FLEET_STATUS" "$URL" --wait-online 60 --server "demo-${name#"$PREFIX"}"
  log "demo-${name#"$PREFIX"} is back online"
}

cmd_down() {
  require_root
  load_settings
  local name
  for name in $(demo_containers); do
    log "$name: removing"
    python3 "$TESTHOST" remove --label "$LABEL" "$name" >/dev/null
  done
  if is_demo_network; then
    log "podman network rm $NETWORK"
    podman network rm "$NETWORK" >/dev/null
  fi
  stop_receiver
  rm -rf "$DEMO_DIR"
  log "down: no demo containers, network or receiver; build/demo removed"
}

cmd_check() {
  local start=$SECONDS t_apt t_up t_page
  ensure_prereqs
  apt_install_missing chromium
  t_apt=$((SECONDS - start))
  if [[ -n $(demo_containers) ]]; then
    log "a demo is up: the check reuses it and tears it down at the end"
  fi
  trap 'cmd_down' EXIT
  cmd_up --no-watch
  t_up=$((SECONDS - start - t_apt))
  local hosts=() i
  for ((i = 1; i <= HOSTS; i++)); do hosts+=("demo-$i"); done
  log "opening $URL/ in headless chromium"
  DEMO_URL="$URL" DEMO_EXPECT_HOSTS="${hosts[*]}" \
    "$VENV_BIN/pytest" -q -s -p no:cacheprovider "$REPO_DIR/tests/test_demo_page.py" -k chromium
  t_page=$((SECONDS - start - t_apt - t_up))
  trap - EXIT
  cmd_down
  log "demo-check passed in $((SECONDS - start)) s (packages $t_apt s, demo up $t_up s," \
    "chromium check $t_page s, teardown $((SECONDS - start - t_apt - t_up - t_page)) s)"
}

main() {
  local cmd=${1:-}
  shift || true
  case "$cmd" in
    up) cmd_up "$@" ;;
    status) cmd_status ;;
    outage) cmd_outage "$@" ;;
    restore) cmd_restore "$@" ;;
    down) cmd_down ;;
    check) cmd_check ;;
    prereqs) ensure_prereqs ;;
    -h | --help | help) usage ;;
    *)
      usage >&2
      exit 2
      ;;
  esac
}

main "$@"
