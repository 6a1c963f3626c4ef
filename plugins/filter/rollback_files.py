"""Which files a rollback of the stacksense_agent role restores, and which kept copies go.

A verified run keeps copies of the files it deployed in the rollback directory; a later run
that fails restores them, so the previous agent runs with exactly the set it was verified
with. The set depends on the run: the agent, the unit (or under cron the cron entry), and
the token, CA certificates and proxy settings when the run uses them.
"""

import posixpath

DOCUMENTATION = r"""
name: rollback_files
short_description: The files a rollback of the stacksense_agent role restores
description:
  - From the role's paths and what the run uses, the files a rollback restores, every file
    one may restore, and the kept copies that a verified run forgets.
positional: _input, rollback_dir
options:
  _input:
    description: The role's paths, keys C(agent), C(unit), C(cron), C(token), C(ca), C(proxy).
    type: dict
    required: true
  rollback_dir:
    description: Where the kept copies are.
    type: str
    required: true
  cron:
    description: The run uses cron rather than systemd.
    type: bool
    default: false
  token:
    description: The run writes the token file.
    type: bool
    default: false
  ca:
    description: The run installs CA certificates.
    type: bool
    default: false
  proxy:
    description: The run writes proxy settings.
    type: bool
    default: false
version_added: 1.2.0
author: StackSense
"""

EXAMPLES = r"""
rollback: "{{ paths | stacksense.fleet.rollback_files('/opt/x/rollback', cron=true) }}"
"""

RETURN = r"""
_value:
  description:
    - C(restore), the files this run's rollback restores, the agent and the unit or cron entry
      first; C(candidates), every file a rollback may restore; C(unused_kept), the kept copies
      of the files this run does not use (forgotten once it is verified).
  type: dict
"""

OPTIONAL = ("token", "ca", "proxy")


def rollback_files(paths, rollback_dir, cron=False, token=False, ca=False, proxy=False):
    """{"restore": [...], "candidates": [...], "unused_kept": [...]} for this run."""
    manager, other = ("cron", "unit") if cron else ("unit", "cron")
    used = {"token": token, "ca": ca, "proxy": proxy}
    restore = [paths["agent"], paths[manager]] + [paths[name] for name in OPTIONAL if used[name]]
    candidates = [paths["agent"], paths[manager]] + [paths[name] for name in OPTIONAL]
    unused = [path for path in candidates if path not in restore] + [paths[other]]
    return {"restore": restore, "candidates": candidates,
            "unused_kept": [posixpath.join(rollback_dir, posixpath.basename(path))
                            for path in unused]}


class FilterModule:
    def filters(self):
        return {"rollback_files": rollback_files}
