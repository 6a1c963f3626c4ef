"""The answer of the role's host probe (roles/stacksense_agent/files/probe_host.sh), parsed.

The probe prints one ``name=value`` line per fact in one round trip; this filter turns its
lines into what the role asks: the facts, the files that exist, owner and mode of the role's
directories, the files already kept for a rollback and the packages installed.
"""

import re

DOCUMENTATION = r"""
name: host_probe
short_description: Parse the answer of the role's host probe
description:
  - Turns the C(name=value) lines that the stacksense_agent role's probe prints into facts,
    existing files, directory owners and modes, kept rollback files and installed packages.
positional: _input
options:
  _input:
    description: The probe's standard output, as lines (C(stdout_lines)).
    type: list
    elements: str
    required: true
version_added: 1.2.0
author: StackSense
"""

EXAMPLES = r"""
probe: "{{ probe_result.stdout_lines | stacksense.fleet.host_probe }}"
"""

RETURN = r"""
_value:
  description:
    - C(facts), the single-valued lines (pid1, systemd, os, os_name, container, propagation,
      apt_lists, ca_bundle); C(files), the paths that exist; C(dirs), directory to
      C("MODE OWNER:GROUP"); C(kept), the files identical to their kept copy; C(packages), the
      packages dpkg reports installed.
  type: dict
"""

FACT_LINE = re.compile(r"([a-z0-9_]+)=(.*)\Z", re.DOTALL)
# dpkg-query's ${db:Status-Abbrev}: "ii " is installed.
INSTALLED_PACKAGE = re.compile(r"(\S+) ii")


def host_probe(lines):
    """The probe's lines as {facts, files, dirs, kept, packages}; unknown lines are ignored."""
    probe = {"facts": {}, "files": [], "dirs": {}, "kept": [], "packages": []}
    for line in lines or []:
        match = FACT_LINE.match(line)
        if not match:
            continue
        name, value = match.groups()
        if name == "exists":
            probe["files"].append(value)
        elif name == "kept":
            probe["kept"].append(value)
        elif name == "dir":
            path, owner_mode = value.split(" ", 1) if " " in value else (value, "")
            probe["dirs"][path] = owner_mode
        elif name == "dpkg":
            installed = INSTALLED_PACKAGE.match(value)
            if installed:
                probe["packages"].append(installed.group(1))
        else:
            probe["facts"][name] = value
    return probe


def agent_packages(packages, requests_source, cron=False, installed=None):
    """The Debian packages the agent needs, in the table's order, less those `installed`.

    `packages` is the role's table: the packages of each requests source (package, pip) and
    those of cron; `installed` the probe's list (all are wanted when it is None).
    """
    wanted = list(packages[requests_source]) + (list(packages["cron"]) if cron else [])
    wanted = [name for index, name in enumerate(wanted) if name not in wanted[:index]]
    return [name for name in wanted if name not in (installed or ())]


class FilterModule:
    def filters(self):
        return {"host_probe": host_probe, "agent_packages": agent_packages}
