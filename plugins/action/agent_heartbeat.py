"""Start the agent, and wait for a heartbeat accepted by the running agent, in one task.

The role's start under systemd and its verification (tasks/wait_for_heartbeat.yml, after a
deploy and after a rollback). With `start` (a systemd unit), the unit is first enabled and
started unless it runs, by ansible.builtin.systemd_service (a failure fails the task with
`started: false` and systemd's first line); that was a task of its own. With `restart` too
(this run changed the agent's files), systemd reloads its configuration and restarts the unit
instead: that was the role's restart handler, one task more on every host a deploy changed.
With `wait` false (stacksense_verify off, check mode) nothing more happens.
Every 2 s it runs the role's process probe on the host (files/agent_process.sh: "PID running"
or "PID exited:STATUS", then the agent's state file) and judges the answer here, on the
controller, until the running process has had a heartbeat accepted (the task passes and says
by whom), has exited (the task fails at once with its exit status) or the time is up. One
task where it was four (a command with `until`, a fail when the agent exited, a debug that
reported the heartbeat, a shell that kept the files below): at fleet scale every task costs
the controller a worker per host, and the `until` conditions were templated again on every
try (docs/DEPLOY_BENCHMARKS.md).
The probe runs as a shell command (as ansible.builtin.raw does: one round trip, no module, no
Python on the host), with the play's privilege escalation.

With `keep`, a heartbeat accepted also keeps the verified files for a rollback (what
tasks/recover.yml restores when a later run deploys something that fails): each file of
keep.files that differs from its copy in keep.dir is copied there (root-only), and the copies
of keep.forget (files this run no longer uses) go. The task is changed when it started the
unit, kept or forgot anything.
"""

import json
import re
import shlex
import time

from ansible.errors import AnsibleActionFail
from ansible.module_utils.parsing.convert_bool import boolean
from ansible.plugins.action import ActionBase

DELAY_S = 2
EXITED = re.compile(r"\A[0-9]+ exited")


def judge(rc, stdout, version, modes):
    """What one probe's answer says: ("accepted", state), ("exited", first line) or
    ("waiting", None). Accepted: the state file was written by the running process (same pid),
    of the wanted version and mode, and its last heartbeat was accepted (no failure since)."""
    lines = stdout.splitlines()
    first = lines[0].strip() if lines else ""
    if rc != 0:
        return "waiting", None
    if EXITED.match(first):
        return "exited", first
    try:
        pid = int(first.split()[0])
    except (IndexError, ValueError):
        return "waiting", None
    try:
        state = json.loads(" ".join(lines[1:])) if len(lines) > 1 else {}
    except ValueError:
        return "waiting", None  # a state file being replaced, or not yet written
    if not isinstance(state, dict) or pid <= 0:
        return "waiting", None
    accepted = (
        str(state.get("pid")) == str(pid)
        and state.get("agent_version") == version
        and state.get("last_success_at") is not None
        and state.get("consecutive_failures", 1) == 0
        and state.get("mode") in modes
    )
    return ("accepted", state) if accepted else ("waiting", None)


def attempts_for(timeout):
    """As `until` with retries ceil(timeout / 2) and delay 2 did: that many retries after the
    first try, so the wait lasts about the timeout."""
    return -(-int(timeout) // DELAY_S) + 1


KEEP_SCRIPT = """set -e
dir=$1; shift
install -d -m 0700 -o root -g root "$dir"
while [ "$#" -gt 0 ] && [ "$1" != -- ]; do
  if ! cmp -s "$1" "$dir/${1##*/}"; then
    install -m 0600 -o root -g root "$1" "$dir/"
    echo "kept $1"
  fi
  shift
done
[ "$#" -gt 0 ] && shift
for f in "$@"; do
  if [ -e "$f" ]; then rm -f "$f"; echo "forgot the kept $f"; fi
done
"""


def keep_command(keep):
    """The shell command that keeps keep["files"] in keep["dir"] and forgets keep["forget"]."""
    argv = ["/bin/sh", "-c", KEEP_SCRIPT, "keep", str(keep["dir"]),
            *[str(f) for f in keep.get("files") or []], "--",
            *[str(f) for f in keep.get("forget") or []]]
    return " ".join(shlex.quote(a) for a in argv)


def report(host, state):
    return (f"{host}: heartbeat accepted by {state.get('api_url')} as server "
            f"'{state.get('server_name')}' (id {state.get('server_id')}), agent "
            f"{state.get('agent_version')}")


class ActionModule(ActionBase):
    TRANSFERS_FILES = False
    _supports_check_mode = True
    _requires_connection = True

    def run(self, tmp=None, task_vars=None):
        result = super().run(tmp, task_vars)
        args = self._task.args
        try:
            argv = [str(a) for a in args["argv"]]
            version = str(args["version"])
            modes = [str(m) for m in args["modes"]]
            attempts = attempts_for(args["timeout"])
            delay = float(args.get("delay", DELAY_S))
            keep = args.get("keep") or None
            start = args.get("start") or None
            restart = boolean(args.get("restart", False), strict=True)
            wait = boolean(args.get("wait", True), strict=True)
            if keep is not None and not (isinstance(keep, dict) and keep.get("dir")):
                raise ValueError(f"keep must be a dict with dir, files and forget: {keep!r}")
        except (KeyError, TypeError, ValueError) as e:
            raise AnsibleActionFail(
                f"agent_heartbeat needs argv (list), version, modes (list), timeout "
                f"(seconds), keep (dict or null), start (a unit or null), restart (bool) and "
                f"wait (bool): "
                f"{e}") from None
        if start:
            unit = {"name": str(start), "enabled": True, "state": "started"}
            if restart:
                unit.update(state="restarted", daemon_reload=True)
            started = self._execute_module(
                module_name="ansible.builtin.systemd_service", task_vars=task_vars,
                module_args=unit)
            if started.get("failed"):
                why = str(started.get("msg") or "unknown error").strip().splitlines()
                result.update(failed=True, started=False,
                              msg=f"{start} did not start ({why[0] if why else ''})")
                return result
            result.update(changed=bool(started.get("changed")), started=True)
        if not wait:
            return result
        command = " ".join(shlex.quote(a) for a in argv)
        host = (task_vars or {}).get("inventory_hostname", "")
        first = ""
        for attempt in range(1, attempts + 1):
            if attempt > 1:
                time.sleep(delay)
            answer = self._low_level_execute_command(command)
            verdict, found = judge(answer.get("rc", 1), answer.get("stdout", ""), version, modes)
            lines = answer.get("stdout", "").splitlines()
            first = lines[0].strip() if lines else first
            if verdict == "accepted":
                # Shown without -v (as the debug task that reported it was), so kept short.
                result.update(agent_version=version, msg=report(host, found))
                result["_ansible_verbose_always"] = True
                return self._keep(result, keep) if keep else result
            if verdict == "exited":
                result.update(failed=True, attempts=attempt, exited=True, process=first,
                              msg="the agent " + re.sub(r"\A[0-9]+ ", "", first))
                return result
        result.update(failed=True, attempts=attempts, exited=False, process=first,
                      msg=f"no heartbeat from agent {version} (the running process) was "
                          f"accepted within {args['timeout']} s")
        return result

    def _keep(self, result, keep):
        answer = self._low_level_execute_command(keep_command(keep))
        lines = [line.strip() for line in answer.get("stdout", "").splitlines() if line.strip()]
        if answer.get("rc") != 0:
            why = (answer.get("stderr") or "").strip().splitlines()
            result.update(failed=True, msg=f"{result['msg']}; but keeping its files for a "
                          f"rollback failed (rc {answer.get('rc')}): {why[-1] if why else ''}")
            return result
        if lines:
            result.update(changed=True, kept=lines)
        return result
