#!/bin/sh
# The role's one read-only look at the host (tasks/preflight.yml runs it in one round trip,
# in place of fact gathering, stats, dpkg-query, find and findmnt; plugins/filter/host_probe.py
# parses the answer). Prints name=value lines: the init system and its version, the OS, the
# container marker, the mount propagation of /, the apt lists, then, from the environment
# (lists one path a line, package names separated by spaces):
#   STACKSENSE_PROBE_FILES      exists=PATH for each that exists
#   STACKSENSE_PROBE_DIRS       dir=PATH MODE OWNER:GROUP for each directory
#   STACKSENSE_PROBE_KEPT       kept=PATH for each identical to its copy in
#                               STACKSENSE_PROBE_ROLLBACK_DIR
#   STACKSENSE_PROBE_CA_BUNDLE  ca_bundle=file when it names a file
#   STACKSENSE_PROBE_PACKAGES   dpkg=NAME STATUS for each package dpkg knows
#   STACKSENSE_PROBE_PROCESS_CMD
#                               stale=yes when the process it names (the agent's: the
#                               first word it prints is the pid) started before a file of
#                               STACKSENSE_PROBE_KEPT last changed
#   STACKSENSE_PROBE_PUSH_AGENT_FILES, STACKSENSE_PROBE_PUSH_AGENT_UNIT
#                               push_agent=PATH: the first of StackSense's push-agent files
#                               found, or the unit when it does not run heartbeat_agent.py
#                               (when it does, it is our 1.1.0 agent: legacy_unit=yes)
#   STACKSENSE_PROBE_LEGACY_CRON, STACKSENSE_PROBE_LEGACY_KEPT_CRON
#                               legacy_cron=yes: our 1.1.0 cron entry (it runs
#                               heartbeat_agent.py), or its copy kept by a move
#   STACKSENSE_PROBE_LEGACY_AGENT
#                               legacy_version=AGENT_VERSION of the 1.1.0 agent
echo "pid1=$(cat /proc/1/comm 2>/dev/null)"
# shellcheck disable=SC2046  # split on purpose: "systemd 252 (252.39-1~deb12u1)"
set -- $(systemctl --version 2>/dev/null)
echo "systemd=${2:-}"
# shellcheck disable=SC1091  # the host's file
(. /etc/os-release 2>/dev/null; echo "os=${ID:-} ${ID_LIKE:-}"; echo "os_name=${PRETTY_NAME:-unknown}")
echo "container=$(cat /run/systemd/container 2>/dev/null)"
echo "propagation=$(findmnt --noheadings --output PROPAGATION / 2>/dev/null)"
set -- /var/lib/apt/lists/*_Packages*
if [ -e "$1" ]; then echo "apt_lists=$#"; else echo "apt_lists=0"; fi
if [ -n "${STACKSENSE_PROBE_CA_BUNDLE:-}" ] && [ -f "$STACKSENSE_PROBE_CA_BUNDLE" ]; then
  echo "ca_bundle=file"
fi
printf '%s\n' "${STACKSENSE_PROBE_FILES:-}" | while IFS= read -r f; do
  if [ -n "$f" ] && [ -e "$f" ]; then echo "exists=$f"; fi
done
printf '%s\n' "${STACKSENSE_PROBE_DIRS:-}" | while IFS= read -r d; do
  if [ -n "$d" ]; then stat -c 'dir=%n %a %U:%G' "$d" 2>/dev/null || :; fi
done
printf '%s\n' "${STACKSENSE_PROBE_KEPT:-}" | while IFS= read -r f; do
  if [ -n "$f" ] && cmp -s "$f" "$STACKSENSE_PROBE_ROLLBACK_DIR/${f##*/}"; then echo "kept=$f"; fi
done
# stale=yes when the running agent started before one of its files last changed: an
# interrupted run installed them but never restarted it (configure.yml restarts it). The
# start (boot time + ticks, both truncated to seconds) may read up to 2 s early: only a
# change more than 2 s after it counts, so a run's own restart never does.
pid=$(sh -c "${STACKSENSE_PROBE_PROCESS_CMD:-echo 0}" 2>/dev/null) || pid=0
pid=${pid%% *}
if [ "${pid:-0}" -gt 0 ] 2>/dev/null && [ -r "/proc/$pid/stat" ]; then
  fields=$(cat "/proc/$pid/stat")
  # shellcheck disable=SC2086  # split on purpose: the fields after "(comm) "
  set -- ${fields##*) }
  started=$(( $(sed -n 's/^btime //p' /proc/stat) + ${20} / $(getconf CLK_TCK) ))
  printf '%s\n' "${STACKSENSE_PROBE_KEPT:-}" | while IFS= read -r f; do
    changed=$(stat -c %Y "$f" 2>/dev/null) || continue
    if [ "$changed" -gt $((started + 2)) ]; then echo "stale=yes"; break; fi
  done
fi
if [ -n "${STACKSENSE_PROBE_PACKAGES:-}" ]; then
  # shellcheck disable=SC2086  # package names, one word each
  dpkg-query --show --showformat='dpkg=${Package} ${db:Status-Abbrev}\n' \
    $STACKSENSE_PROBE_PACKAGES 2>/dev/null || :
fi
push=
while IFS= read -r f; do
  if [ -z "$push" ] && [ -n "$f" ] && [ -e "$f" ]; then push=$f; fi
done <<EOF
${STACKSENSE_PROBE_PUSH_AGENT_FILES:-}
EOF
unit=${STACKSENSE_PROBE_PUSH_AGENT_UNIT:-}
if [ -n "$unit" ] && grep -qsF heartbeat_agent.py "$unit"; then
  echo "legacy_unit=yes"
elif [ -z "$push" ] && [ -n "$unit" ] && [ -e "$unit" ]; then
  push=$unit
fi
echo "push_agent=$push"
if { [ -n "${STACKSENSE_PROBE_LEGACY_CRON:-}" ] && grep -qsF heartbeat_agent.py "$STACKSENSE_PROBE_LEGACY_CRON"; } ||
  { [ -n "${STACKSENSE_PROBE_LEGACY_KEPT_CRON:-}" ] && [ -e "$STACKSENSE_PROBE_LEGACY_KEPT_CRON" ]; }; then
  echo "legacy_cron=yes"
fi
if [ -n "${STACKSENSE_PROBE_LEGACY_AGENT:-}" ]; then
  echo "legacy_version=$(sed -n 's/^AGENT_VERSION = "\(.*\)"$/\1/p' "$STACKSENSE_PROBE_LEGACY_AGENT" 2>/dev/null)"
fi
