#!/usr/bin/python
"""Documentation of the action plugin plugins/action/agent_heartbeat.py (it runs on the
controller; this file only documents it, as ansible.builtin.set_fact's module file does)."""

DOCUMENTATION = r"""
module: agent_heartbeat
short_description: Start the heartbeat agent and wait for a heartbeat accepted by it
description:
  - With O(start), first enables and starts that systemd unit unless it runs
    (M(ansible.builtin.systemd_service)); a unit that does not start fails the task. With
    O(restart), reloads systemd's configuration and restarts the unit instead.
  - Every 2 seconds runs O(argv) on the host as a shell command (no module, no Python on the
    host; with the play's privilege escalation), and reads its answer, the agent's process
    (V(PID running) or V(PID exited:STATUS)), then the agent's state file.
  - Passes as soon as the running process has had a heartbeat accepted with agent
    O(version) in one of O(modes), and says by which server; fails at once when the process
    has exited, or when none was accepted within O(timeout) seconds.
version_added: 1.3.0
author: StackSense (@stacksense)
options:
  argv:
    description: The probe (the role's files/agent_process.sh run with C(process)) as argv.
    type: list
    elements: str
    required: true
  version:
    description: The agent version the running process must be.
    type: str
    required: true
  modes:
    description: The agent modes (V(token), V(legacy)) accepted.
    type: list
    elements: str
    required: true
  timeout:
    description: Seconds to wait, about (one try every 2 seconds, then one more).
    type: int
    required: true
  delay:
    description: Seconds between tries.
    type: float
    default: 2
  start:
    description: A systemd unit to enable and start first (unless it runs); null starts nothing.
    type: str
  restart:
    description: Whether to reload systemd's configuration and restart O(start) (its files changed).
    type: bool
    default: false
  wait:
    description: Whether to wait for the heartbeat; V(false) only starts O(start).
    type: bool
    default: true
  keep:
    description:
      - Once a heartbeat is accepted, keep the verified files for a rollback. C(dir) (str),
        where the copies go (created root-only); C(files) (list), each copied there when it
        differs from its copy (mode 0600, owned by root); C(forget) (list), copies to remove.
      - Null keeps nothing.
    type: dict
attributes:
  check_mode:
    support: full
    description: Says whether O(start) would start (or restart) the unit; the wait only reads.
  diff_mode:
    support: none
    description: Shows no diff.
  platform:
    support: full
    platforms: posix
    description: Any host with a POSIX shell.
notes:
  - The role's verification; not meant for playbooks of their own.
"""

EXAMPLES = r"""
- name: Wait for a heartbeat accepted by the running agent
  stacksense.fleet.agent_heartbeat:
    argv: [/bin/sh, -c, "{{ process_sh }}", sh, process, systemd, x.service, state.json]
    version: 2.0.0
    modes: [token]
    timeout: 60
"""

RETURN = r"""
msg:
  description: Who accepted the heartbeat, or why the wait failed.
  returned: always
  type: str
started:
  description: Whether O(start) is running (V(false) when it did not start; the task failed).
  returned: when O(start) is set
  type: bool
agent_version:
  description: The verified agent's version.
  returned: success
  type: str
kept:
  description: What O(keep) changed, one line each (V(kept PATH), V(forgot the kept PATH)).
  returned: when O(keep) changed anything
  type: list
  elements: str
exited:
  description: Whether the agent's process had exited (the task then failed at once).
  returned: failure
  type: bool
process:
  description: The probe's last first line (V(PID running) or V(PID exited:STATUS)).
  returned: failure
  type: str
attempts:
  description: How many times the host was asked.
  returned: failure
  type: int
"""
