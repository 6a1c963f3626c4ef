#!/usr/bin/python
"""Documentation of the action plugin plugins/action/agent_probe.py (it runs on the
controller; this file only documents it, as ansible.builtin.set_fact's module file does)."""

DOCUMENTATION = r"""
module: agent_probe
short_description: Check the role's variables, probe a host and judge whether it can run the agent
description:
  - When O(problems) is not empty, fails the host with all of them in one message, and
    nothing reaches the host.
  - Otherwise runs O(script) (the role's files/probe_host.sh) on the host as a shell command, with
    O(environment) set, in one round trip (no module, no Python on the host; with the play's
    privilege escalation), and parses its C(name=value) lines.
  - With O(checks), fails the host with every reason it cannot run the agent (the init
    system, systemd's version, the OS, the CA bundle, a container's mount propagation), in
    one message.
version_added: 1.3.0
author: StackSense (@stacksense)
options:
  problems:
    description: What is wrong with the role's variables (found on the controller), one
      message each.
    type: list
    elements: str
    default: []
  script:
    description: The probe, a POSIX shell script.
    type: str
    required: true
  environment:
    description: Its settings, C(STACKSENSE_PROBE_*) names only.
    type: dict
    default: {}
  checks:
    description:
      - What the agent needs of this host; null (removal) probes only.
      - C(cron) (bool), cron runs the agent; C(token) (bool), the agent gets a token;
        C(ca_bundle) (str), the CA bundle that must exist on the host.
    type: dict
  role:
    description:
      - The stacksense_agent role's preflight. The action templates the role's variables
        and the fixed values of its vars/main.yml once, adds every problem of them
        (plugins/filter/role_plan.py's variable_problems, then the role's
        meta/argument_specs.yml with Ansible's validator) to O(problems), derives the role's
        plan from them (role_plan), probes with the plan's settings (O(environment) adds to
        them) and checks the host with the plan's O(checks) unless they are given.
    type: bool
    default: false
attributes:
  check_mode:
    support: full
    description: Read-only; runs in check mode too.
  diff_mode:
    support: none
    description: Changes nothing.
  platform:
    support: full
    platforms: posix
    description: Any host with a POSIX shell.
notes:
  - The role's preflight; not meant for playbooks of their own.
"""

EXAMPLES = r"""
- name: Probe the host
  stacksense.fleet.agent_probe:
    script: "{{ lookup('ansible.builtin.file', 'probe_host.sh') }}"
    environment:
      STACKSENSE_PROBE_FILES: /etc/systemd/system/stacksense-heartbeat.service
    checks: {cron: false, token: true, ca_bundle: ""}
  register: probe
"""

RETURN = r"""
facts:
  description: The probe's single-valued lines (pid1, systemd, os, os_name, container,
    propagation, apt_lists, ca_bundle, and what it found of other agents).
  returned: success
  type: dict
files:
  description: The paths of C(STACKSENSE_PROBE_FILES) that exist.
  returned: success
  type: list
  elements: str
dirs:
  description: Directory to C("MODE OWNER:GROUP").
  returned: success
  type: dict
kept:
  description: The files identical to their copy kept for a rollback.
  returned: success
  type: list
  elements: str
packages:
  description: The packages of C(STACKSENSE_PROBE_PACKAGES) that dpkg reports installed.
  returned: success
  type: list
  elements: str
plan:
  description:
    - The role's derived values for this host (plugins/filter/role_plan.py), which its
      vars/main.yml and tasks read; no secret (only whether a token or proxy is set).
    - With what the probe decided, among them C(steps), whether the host needs the role's
      every step (removal, a push-agent host, cron or a move from it, pip, a stale agent,
      role 1.1.0's agent), not its usual deploy.
  returned: when O(role) is true and the probe ran
  type: dict
msg:
  description: What is wrong with the variables, why the host cannot run the agent, or why
    the probe failed.
  returned: failure
  type: str
"""
