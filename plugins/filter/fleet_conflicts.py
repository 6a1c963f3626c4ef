"""Hosts of one run that would report as one server: the same token or the same server id.

StackSense ties a token to one server and shows one row per server id; two hosts with the
same token or id would overwrite each other's heartbeats, and one of them would look
online while it is not. tasks/preflight.yml asks this once per batch, over all hosts of the
play (ansible_play_hosts_all, not only the batch), so the canary batch already refuses a
run that holds such a pair, before any host changes. A token is never shown.
"""

DOCUMENTATION = r"""
name: fleet_conflicts
short_description: Hosts of one run that share a token or a server id
description:
  - For the hosts given, one message per token or server id that more than one of them
    sets, naming the hosts (never the token).
positional: _input, hosts
options:
  _input:
    description: C(hostvars).
    type: dict
    required: true
  hosts:
    description: The hosts of the run (C(ansible_play_hosts_all)).
    type: list
    elements: str
    required: true
version_added: 1.2.0
author: StackSense
"""

EXAMPLES = r"""
conflicts: "{{ hostvars | stacksense.fleet.fleet_conflicts(ansible_play_hosts_all) }}"
"""

RETURN = r"""
_value:
  description: One-line messages naming the hosts and the fix; empty when every host is its own.
  type: list
  elements: str
"""


def _setting(host_vars, name):
    value = host_vars.get(name)
    return "" if value is None else str(value).strip()


def _shared(hostvars, hosts, name):
    """{value: [hosts]} for the values of `name` that more than one host sets, in host order."""
    holders = {}
    for host in hosts:
        value = _setting(hostvars[host], name)
        if value:
            holders.setdefault(value, []).append(host)
    return {value: names for value, names in holders.items() if len(names) > 1}


def _listed(hosts):
    return ", ".join(hosts[:-1]) + " and " + hosts[-1]


def fleet_conflicts(hostvars, hosts):
    """One message per token or server id that several of `hosts` share."""
    problems = []
    for names in _shared(hostvars, hosts, "stacksense_api_token").values():
        problems.append(
            f"{_listed(names)} have the same stacksense_api_token (value hidden): a token "
            "belongs to one server, so the server would take their heartbeats for one host's. "
            "Fix: give each host its own token (in host_vars/HOST/vault.yml), minted for its "
            "server with the server's manage.py create_agent_token.")
    for server_id, names in _shared(hostvars, hosts, "stacksense_server_id").items():
        problems.append(
            f"{_listed(names)} have the same stacksense_server_id ({server_id}): the server "
            "would show them as one host, online while any of them reports. Fix: set each "
            "host's stacksense_server_id to its own id from the StackSense dashboard.")
    return problems


class FilterModule:
    def filters(self):
        return {"fleet_conflicts": fleet_conflicts}
