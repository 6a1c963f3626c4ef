"""The cron entry of stacksense_service_manager=cron: its environment and its command.

Cron starts the agent every minute as the cron user under `flock -n` on the lock file: while
one agent runs (it holds the lock for life) the others give up at once, and a dead one is
back within a minute. templates/stacksense-heartbeat.cron.j2 renders what cron_entry()
returns; files/agent_process.sh starts the agent at once from the installed entry (its
command and NAME="value" lines), exactly as cron would.
"""

import shlex

DOCUMENTATION = r"""
name: cron_entry
short_description: The environment and command of the heartbeat agent's cron entry
description:
  - The variables the cron entry sets (the agent's settings, and what systemd would give the
    agent otherwise) and the command that starts the agent under C(flock -n).
positional: _input
options:
  _input:
    description: The agent's settings as environment variables (C(agent_env) of the role's table).
    type: dict
    required: true
  python:
    description: The Python that runs the agent.
    type: str
    required: true
  agent:
    description: The agent file.
    type: str
    required: true
  lock_file:
    description: The lock the running agent holds.
    type: str
    required: true
  pid_file:
    description: Where the agent that got the lock writes its pid.
    type: str
    required: true
  log_file:
    description: Where the agent's output goes.
    type: str
    required: true
  state_file:
    description: The agent's state file.
    type: str
    required: true
  home:
    description: The agent's HOME (its state directory).
    type: str
    required: true
  token_file:
    description: The token file, when the agent uses one; empty otherwise.
    type: str
    default: ""
  proxy_file:
    description: The proxy settings (NAME='value' lines) the job exports, when there are any.
    type: str
    default: ""
version_added: 1.2.0
author: StackSense
"""

EXAMPLES = r"""
entry: >-
  {{ {'STACKSENSE_API_URL': 'https://stacksense.example.com'} | stacksense.fleet.cron_entry(
       python='/usr/bin/python3', agent='/opt/a/heartbeat_agent.py',
       lock_file='/var/lib/a/agent.lock', pid_file='/var/lib/a/agent.pid',
       log_file='/var/log/a/agent.log',
       state_file='/var/lib/a/state.json', home='/var/lib/a') }}
"""

RETURN = r"""
_value:
  description: C(env), the variables in the cron file (name to value), and C(command), the job.
  type: dict
"""


def cron_env(agent_env, state_file, home, token_file=""):
    """The agent's environment under cron: its settings, and what systemd would give it
    otherwise (cron's PATH and shell, a HOME, the state file, the token file)."""
    env = {"PATH": "/usr/bin:/bin", "SHELL": "/bin/sh", "HOME": home,
           "STACKSENSE_STATE_FILE": state_file}
    env.update(agent_env)
    if token_file:
        env["STACKSENSE_API_TOKEN_FILE"] = token_file
    return env


def cron_command(python, agent, lock_file, pid_file, log_file, proxy_file=""):
    """The job, run by /bin/sh as the cron user.

    `flock -n` gives up at once when the lock is held; -F (no fork) makes the agent itself
    the lock holder, whose pid the little shell records before it execs the agent ($0 is the
    pid file, "$@" the agent's command). With a proxy, it exports the proxy settings from
    their file (never in the cron file, which anyone may read) just before that exec.
    """
    exports = f"set -a && . {shlex.quote(proxy_file)} && set +a && " if proxy_file else ""
    script = f'echo $$ >"$0" && {exports}exec "$@"'
    return " ".join([
        "/usr/bin/flock -n -F", shlex.quote(lock_file), "/bin/sh -c", shlex.quote(script),
        shlex.quote(pid_file), shlex.quote(python), shlex.quote(agent),
        f">>{shlex.quote(log_file)} 2>&1"])


def cron_entry(agent_env, python, agent, lock_file, pid_file, log_file, state_file, home,
               token_file="", proxy_file=""):
    """{"env": the cron file's variables, "command": the job}."""
    return {"env": cron_env(agent_env, state_file, home, token_file),
            "command": cron_command(python, agent, lock_file, pid_file, log_file, proxy_file)}


class FilterModule:
    def filters(self):
        return {"cron_entry": cron_entry}
