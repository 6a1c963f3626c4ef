#!/bin/sh
# The heartbeat agent as role 1.1.0 installed it, under the names that StackSense's own push
# agent uses. Run as root by the role (ansible.builtin.script):
#   legacy_agent.sh stop KEEP_DIR     stop it, right before the new agent starts: its unit
#                                     is stopped, its cron entry moved into KEEP_DIR
#   legacy_agent.sh restore KEEP_DIR  start it again (the new agent failed verification)
#   legacy_agent.sh remove KEEP_DIR   stop it and delete what is ours (the new agent is
#                                     verified, or remove.yml)
# Ours is what runs heartbeat_agent.py: the unit stacksense-agent.service and the cron entry
# /etc/cron.d/stacksense-agent count only when they name it. Nothing of the push agent
# (stacksense_agent.py, its venv, agent.env, its unit, the user stacksense, its sudoers file)
# is stopped, changed or deleted: with a push agent on the host, only the files 1.1.0 wrote
# are deleted, and a directory they share only when it is empty.
# Prints one line per change, nothing when there is nothing to do; non-zero on an error.
set -eu

usage="usage: legacy_agent.sh stop|restore|remove KEEP_DIR"
action=${1:?$usage}
keep=${2:?$usage}
service=stacksense-agent.service
unit=/etc/systemd/system/$service
cron=/etc/cron.d/stacksense-agent
kept_cron=$keep/stacksense-agent.cron
opt=/opt/stacksense-agent
etc=/etc/stacksense-agent
state=/var/lib/stacksense-agent
private_state=/var/lib/private/stacksense-agent
log=/var/log/stacksense-agent
logrotate=/etc/logrotate.d/stacksense-agent

ours() { grep -qsF heartbeat_agent.py "$1"; }

push_agent() {
  [ -e $opt/stacksense_agent.py ] || [ -e $etc/agent.env ] || [ -e /etc/sudoers.d/stacksense-agent ] ||
    { [ -e $unit ] && ! ours $unit; }
}

# The pid of the cron-run 1.1.0 agent, 0 when none runs.
cron_pid() {
  pid=$(cat $state/agent.pid 2>/dev/null || :)
  case $pid in '' | *[!0-9]*) pid=0 ;; esac
  grep -qsF heartbeat_agent.py /proc/"$pid"/cmdline || pid=0
  echo "$pid"
}

# SIGTERM, SIGKILL after 15 s (as the role stops its own cron-run agent).
stop_cron_agent() {
  pid=$(cron_pid)
  [ "$pid" -gt 0 ] || return 0
  kill -TERM "$pid" 2>/dev/null || :
  for _ in $(seq 150); do
    if [ "$(cron_pid)" != "$pid" ]; then
      echo "stopped the cron-run 1.1.0 agent (pid $pid)"
      return 0
    fi
    sleep 0.1
  done
  kill -KILL "$pid" 2>/dev/null || :
  echo "killed the cron-run 1.1.0 agent (pid $pid)"
}

stop() {
  if ours $unit && systemctl is-active --quiet $service; then
    systemctl stop $service
    echo "stopped $service (1.1.0)"
  fi
  if ours $cron; then
    install -d -m 0700 "$keep"
    mv -f $cron "$kept_cron"
    echo "moved $cron aside"
  fi
  stop_cron_agent
}

# Under cron, the role then starts the restored entry's agent at once, as cron would.
restore() {
  if [ -e "$kept_cron" ]; then
    mv -f "$kept_cron" $cron
    echo "put $cron back"
  fi
  if ours $unit && ! systemctl is-active --quiet $service; then
    systemctl start $service
    echo "started $service (1.1.0)"
  fi
}

delete() {
  for path in "$@"; do
    if [ -e "$path" ] || [ -L "$path" ]; then
      rm -rf "$path"
      echo "deleted $path"
    fi
  done
}

delete_if_empty() {
  for dir in "$@"; do
    if [ -d "$dir" ] && [ ! -L "$dir" ] && rmdir "$dir" 2>/dev/null; then
      echo "deleted $dir"
    fi
  done
}

remove() {
  cron_was_ours=no
  if ours $cron || [ -e "$kept_cron" ]; then cron_was_ours=yes; fi
  if ours $unit; then
    systemctl disable --now $service >/dev/null 2>&1 || :
    rm -f $unit
    systemctl daemon-reload
    systemctl reset-failed $service >/dev/null 2>&1 || :
    echo "deleted $unit (1.1.0)"
  fi
  if ours $cron; then delete $cron; fi
  delete "$kept_cron"
  stop_cron_agent
  # What 1.1.0 wrote, whoever else uses these directories.
  delete $opt/heartbeat_agent.py $opt/ca-certificates.pem $opt/rollback $etc/api_token $etc/proxy.env \
    $state/state.json $state/agent.lock $state/agent.pid $log/agent.log $log/agent.log.[0-9]*
  if grep -qsF $log/agent.log $logrotate; then delete $logrotate; fi
  if ! push_agent; then
    # Without the push agent, the rest under these names is 1.1.0's too.
    delete $opt/venv
    if [ $cron_was_ours = yes ] && id -u stacksense >/dev/null 2>&1; then
      userdel -f stacksense
      echo "deleted the user stacksense (1.1.0, cron)"
    fi
    if getent group stacksense >/dev/null 2>&1 && ! id -u stacksense >/dev/null 2>&1 &&
      [ $cron_was_ours = yes ]; then
      groupdel stacksense
      echo "deleted the group stacksense (1.1.0, cron)"
    fi
  fi
  delete_if_empty $private_state $opt $etc $log
  # DynamicUser=: a link to $private_state, gone now.
  if [ -L $state ] && [ ! -e $state ]; then delete $state; fi
  delete_if_empty $state
}

case $action in
  stop) stop ;;
  restore) restore ;;
  remove) remove ;;
  *) echo "$usage" >&2; exit 2 ;;
esac
