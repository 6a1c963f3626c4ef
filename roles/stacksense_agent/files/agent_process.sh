#!/bin/sh
# The running heartbeat agent's process, under systemd or under cron
# (stacksense_service_manager=cron). The role runs this file's text with its arguments,
# `/bin/sh -c TEXT agent_process.sh ACTION ARG...` (ansible.builtin.command with argv, or raw),
# so that nothing is copied to the host: one round trip, as for any command.
#   pid PID_FILE          the cron-run agent's pid, 0 if none runs: the pid file's process,
#                         if it still runs heartbeat_agent.py (only the process that got the
#                         lock writes the pid file, and an agent holds the lock until it exits)
#   process cron PID_FILE [STATE_FILE]
#   process systemd SERVICE [STATE_FILE]
#                         "PID running", or "PID exited:STATUS" when the agent has exited
#                         since it started (systemd: ExecMainCode is set until the next
#                         start, and a unit that will not restart is "failed"; cron: no agent
#                         holds the lock), then the state file's text, if one is named
#   stop PID_FILE         stop the cron-run agent, if one runs: SIGTERM, SIGKILL after 15 s;
#                         prints "stopping PID" when there was one
#   start PID_FILE CRON_FILE CRON_USER LOG_FILE
#                         start the agent now unless it runs, exactly as cron would: the cron
#                         entry's own command, with the variables the entry sets (NAME="value"
#                         lines, quotes stripped as cron strips them) and nothing else, as
#                         CRON_USER, detached from the caller's session. Prints "running: PID"
#                         or "started: PID"; fails with the end of LOG_FILE when no agent runs
#                         5 s later
#   restart PID_FILE CRON_FILE CRON_USER LOG_FILE
#                         stop, then start
set -u

usage="usage: agent_process.sh pid|process|stop|start|restart ARG..."

cron_pid() {
  pid=$(cat "$1" 2>/dev/null || :)
  case $pid in '' | *[!0-9]*) pid=0 ;; esac
  grep -qsF heartbeat_agent.py /proc/"$pid"/cmdline || pid=0
  echo "$pid"
}

systemd_process() {
  systemctl show --property=MainPID --property=ExecMainCode --property=ExecMainStatus \
    --property=ActiveState "$1" | {
    pid=0 code=0 status="?" active=
    while IFS="=" read -r key value; do
      case $key in
        MainPID) pid=$value ;;
        ExecMainCode) code=$value ;;
        ExecMainStatus) status=$value ;;
        ActiveState) active=$value ;;
      esac
    done
    if [ "$code" != 0 ] || [ "$active" = failed ]; then echo "$pid exited:exit status $status"
    else echo "$pid running"; fi
  }
}

process() {
  manager=${1:?$usage} target=${2:?$usage}
  if [ "$manager" = systemd ]; then
    systemd_process "$target"
  else
    pid=$(cron_pid "$target")
    if [ "$pid" -gt 0 ]; then echo "$pid running"; else echo "0 exited:unknown status"; fi
  fi
  if [ -n "${3:-}" ]; then cat "$3" 2>/dev/null || :; fi
}

stop() {
  pid_file=${1:?$usage}
  pid=$(cron_pid "$pid_file")
  [ "$pid" -gt 0 ] || return 0
  echo "stopping $pid"
  kill -TERM "$pid"
  for _ in $(seq 150); do
    [ "$(cron_pid "$pid_file")" = "$pid" ] || return 0
    sleep 0.1
  done
  kill -KILL "$pid"
}

start() {
  pid_file=${1:?$usage} cron_file=${2:?$usage} cron_user=${3:?$usage} log_file=${4:?$usage}
  pid=$(cron_pid "$pid_file")
  if [ "$pid" -gt 0 ]; then echo "running: $pid"; return 0; fi
  set --
  while IFS= read -r line; do
    case $line in
      [A-Z]*=\"*\")
        name=${line%%=*}
        value=${line#*=}
        value=${value#\"}
        value=${value%\"}
        set -- "$@" "$name=$value"
        ;;
    esac
  done <"$cron_file"
  cmd=$(sed -n "s/^\* \* \* \* \* $cron_user //p" "$cron_file" | sed 's/\\%/%/g')
  if [ -z "$cmd" ]; then
    echo "no command in $cron_file" >&2
    return 1
  fi
  cd / || return
  /usr/bin/env -i "$@" /usr/bin/setsid -f /usr/bin/setpriv --reuid="$cron_user" \
    --regid="$cron_user" --init-groups /bin/sh -c "$cmd" </dev/null >/dev/null 2>&1 || return
  for _ in $(seq 50); do
    pid=$(cron_pid "$pid_file")
    if [ "$pid" -gt 0 ]; then
      echo "started: $pid"
      return 0
    fi
    sleep 0.1
  done
  echo "the agent did not start; the end of $log_file:" >&2
  tail -n 20 "$log_file" >&2
  return 1
}

action=${1:?$usage}
shift
case $action in
  pid) cron_pid "${1:?$usage}" ;;
  process) process "$@" ;;
  stop) stop "$@" ;;
  start) start "$@" ;;
  restart)
    (stop "$@")
    start "$@"
    ;;
  *)
    echo "$usage" >&2
    exit 2
    ;;
esac
