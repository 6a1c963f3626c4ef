#!/usr/bin/python
"""Converge a set of directories, files and removals on the host in one round trip.

The stacksense_agent role's install directory, agent, configuration directory, token, proxy
settings, CA certificates and systemd unit, and the files it removes when they are not used,
in one module call instead of one or three round trips each: at fleet scale every task costs
controller CPU on every host (docs/DEPLOY_BENCHMARKS.md). Files are written atomically (a
temporary file in the same directory, then a rename) and only when their content, owner,
group or mode differ. The content of C(secret_files) is never returned, not even in a diff.
Runs on the host's Python 3 (3.6 and newer).
"""

DOCUMENTATION = r"""
module: agent_files
short_description: Converge the heartbeat agent's files on a host in one round trip
description:
  - Creates directories, writes files and removes paths, each only when it differs from what
    is asked, and says which paths changed.
  - A file is written to a temporary file in its directory, given its owner, group and mode,
    and renamed over the old one, so a reader sees the old content or the new, never a part.
    When only its owner, group or mode differ, those are corrected in place.
  - The content of O(secret_files) is never shown, in the result, a diff or a failure message.
version_added: 1.2.0
author: StackSense (@stacksense)
options:
  directories:
    description: Directories that must exist with this owner, group and mode, in this order
      (missing parents are created 0755, owned by root).
    type: list
    elements: dict
    default: []
    suboptions:
      path:
        description: Absolute path.
        type: path
        required: true
      owner:
        description: User name of the owner.
        type: str
        default: root
      group:
        description: Group name.
        type: str
        default: root
      mode:
        description: Octal mode as a string, e.g. V(0755).
        type: str
        default: '0755'
  files:
    description: Files that must have this content, owner, group and mode. Shown in a diff.
    type: list
    elements: dict
    default: []
    suboptions:
      path:
        description: Absolute path; its directory must exist (or be in O(directories)).
        type: path
        required: true
      content:
        description: The whole content of the file (text, written as UTF-8).
        type: str
        required: true
      owner:
        description: User name of the owner.
        type: str
        default: root
      group:
        description: Group name.
        type: str
        default: root
      mode:
        description: Octal mode as a string, e.g. V(0644).
        type: str
        default: '0644'
  secret_files:
    description:
      - Like O(files), but the content is a secret (no_log) and is never shown; a diff only
        says that the file changed.
    type: list
    elements: dict
    default: []
    suboptions:
      path:
        description: Absolute path; its directory must exist (or be in O(directories)).
        type: path
        required: true
      content:
        description: The whole content of the file (text, written as UTF-8). Never shown (no_log).
        type: str
        required: true
      owner:
        description: User name of the owner.
        type: str
        default: root
      group:
        description: Group name.
        type: str
        default: root
      mode:
        description: Octal mode as a string, e.g. V(0600).
        type: str
        default: '0600'
  absent:
    description: Paths to remove when they exist (a directory with everything it holds).
    type: list
    elements: path
    default: []
  packages:
    description:
      - Debian packages to install before anything else, with M(ansible.builtin.apt)
        (C(update_cache), O(apt_cache_valid_time)); the role passes those its probe found
        missing. When they cannot be installed the task fails and no file changes.
      - In check mode they are only reported (C(packages) in the result).
    type: list
    elements: str
    default: []
  apt_cache_valid_time:
    description: Update the apt lists first when they are older than this many seconds
      (V(0) always updates them).
    type: int
    default: 0
  plan:
    description:
      - The stacksense_agent role's plan (what its preflight task registered,
        C(plugins/filter/role_plan.py)). The action takes O(packages), O(apt_cache_valid_time),
        O(directories), O(files), O(secret_files) and O(absent) from it and fills in each
        file's content (the agent, the CA certificates, the unit rendered from the role's
        template, the secrets). For the role only.
    type: dict
  secrets:
    description:
      - With O(plan), the role's C(stacksense_api_token) and C(stacksense_https_proxy),
        C(stacksense_http_proxy), C(stacksense_no_proxy), for the token and the proxy
        settings files. Never shown.
    type: dict
  ca_certificate:
    description: With O(plan), the role's C(stacksense_ca_certificate) (PEM text).
    type: str
attributes:
  action:
    support: full
    description: The packages are installed by the action plugin, then the module runs.
  check_mode:
    support: full
    description: Says what would change and changes nothing.
  diff_mode:
    support: full
    description: Shows the old and new content of O(files), never of O(secret_files).
"""

EXAMPLES = r"""
- name: Install the agent's files
  stacksense.fleet.agent_files:
    directories:
      - {path: /opt/stacksense-heartbeat, mode: '0755'}
      - {path: /etc/stacksense-heartbeat, mode: '0700'}
    files:
      - path: /opt/stacksense-heartbeat/heartbeat_agent.py
        content: "{{ lookup('ansible.builtin.file', 'heartbeat_agent.py', rstrip=false) }}"
        mode: '0755'
    secret_files:
      - path: /etc/stacksense-heartbeat/api_token
        content: "{{ stacksense_api_token }}\n"
        mode: '0600'
    absent:
      - /opt/stacksense-heartbeat/venv
  register: files
  notify: Restart stacksense-heartbeat
"""

RETURN = r"""
changed_paths:
  description: The paths created, written, corrected (owner, group or mode) or removed, in order.
  returned: always
  type: list
  elements: str
  sample: [/opt/stacksense-heartbeat/heartbeat_agent.py]
changes:
  description:
    - What happened to each changed path, C(created), C(updated), C(attributes) or C(removed).
  returned: always
  type: dict
  sample: {/opt/stacksense-heartbeat/heartbeat_agent.py: updated}
packages:
  description: The packages of O(packages), now installed (in check mode, that would be).
  returned: when O(packages) is not empty
  type: list
  elements: str
  sample: [python3-requests]
"""

import contextlib
import grp
import os
import pwd
import re
import shutil
import stat
import tempfile

from ansible.module_utils.basic import AnsibleModule

MODE_RE = re.compile(r"\A0?[0-7]{3}\Z")
NOT_SHOWN = "(content not shown: a secret)"


class FilesError(Exception):
    """A request the module cannot carry out; its message names the path and the fix."""


def parse_mode(mode, path):
    """The permission bits of an octal string such as '0644' (no setuid, setgid or sticky)."""
    if not MODE_RE.match(str(mode)):
        raise FilesError(f"{path}: mode {mode!r} is not an octal mode such as 0644")
    return int(str(mode), 8)


def ids(owner, group, path, check_mode=False):
    """(uid, gid) of a user and a group name, which must exist on the host. In check mode one
    that does not exist yet (an earlier task of the run would create it) is -1: different
    from any file's, so the path is reported as one that would change."""
    try:
        uid = pwd.getpwnam(owner).pw_uid
    except KeyError:
        if not check_mode:
            raise FilesError(f"{path}: the user {owner} does not exist on the host") from None
        uid = -1
    try:
        gid = grp.getgrnam(group).gr_gid
    except KeyError:
        if not check_mode:
            raise FilesError(f"{path}: the group {group} does not exist on the host") from None
        gid = -1
    return uid, gid


def _lstat(path):
    try:
        return os.lstat(path)
    except FileNotFoundError:
        return None


def _describe(st):
    if st is None:
        return "absent"
    try:
        owner = pwd.getpwuid(st.st_uid).pw_name
    except KeyError:
        owner = str(st.st_uid)
    try:
        group = grp.getgrgid(st.st_gid).gr_name
    except KeyError:
        group = str(st.st_gid)
    return f"mode {stat.S_IMODE(st.st_mode):04o}, owner {owner}:{group}"


def _wanted(spec, mode):
    return f"mode {mode:04o}, owner {spec.get('owner', 'root')}:{spec.get('group', 'root')}"


def _attributes_differ(st, uid, gid, mode):
    return (st.st_uid, st.st_gid, stat.S_IMODE(st.st_mode)) != (uid, gid, mode)


def _set_attributes(path, uid, gid, mode):
    os.chown(path, uid, gid, follow_symlinks=False)
    os.chmod(path, mode)


def converge_directory(spec, check_mode=False):
    """Make spec['path'] a directory with its owner, group and mode.

    Returns None when it already was, else (action, diff) with action 'created' or
    'attributes'."""
    path = spec["path"]
    mode = parse_mode(spec.get("mode", "0755"), path)
    uid, gid = ids(spec.get("owner", "root"), spec.get("group", "root"), path, check_mode)
    st = _lstat(path)
    if st is not None and not stat.S_ISDIR(st.st_mode):
        raise FilesError(f"{path} exists and is not a directory: remove it, or move it away")
    if st is not None and not _attributes_differ(st, uid, gid, mode):
        return None
    wanted = f"directory, {_wanted(spec, mode)}"
    before = "directory, " + _describe(st) if st else "absent"
    diff = {"before_header": path, "after_header": path,
            "before": before + "\n", "after": wanted + "\n"}
    if not check_mode:
        if st is None:
            parent = os.path.dirname(path)
            if parent and not os.path.isdir(parent):
                os.makedirs(parent, 0o755)
            os.mkdir(path, 0o700)  # the mode below, once the owner is right
        _set_attributes(path, uid, gid, mode)
    return ("created" if st is None else "attributes"), diff


def _read(path):
    with open(path, "rb") as handle:
        return handle.read()


def write_atomically(path, data, uid, gid, mode):
    """Write data to path: a temporary file in the same directory, owner, group and mode set
    before the content goes in, then renamed over path."""
    directory, name = os.path.split(path)
    fd, temporary = tempfile.mkstemp(prefix="." + name + ".", dir=directory)
    try:
        os.fchown(fd, uid, gid)
        os.fchmod(fd, mode)
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view):]
        os.fsync(fd)
        os.close(fd)
        fd = None
        os.rename(temporary, path)
    except BaseException:
        if fd is not None:
            os.close(fd)
        with contextlib.suppress(OSError):
            os.unlink(temporary)
        raise


def converge_file(spec, secret=False, check_mode=False):
    """Give spec['path'] the content spec['content'] and its owner, group and mode.

    Returns None when it already had them, else (action, diff) with action 'created',
    'updated' or 'attributes'. A secret's content is in no diff."""
    path = spec["path"]
    mode = parse_mode(spec.get("mode", "0600" if secret else "0644"), path)
    uid, gid = ids(spec.get("owner", "root"), spec.get("group", "root"), path, check_mode)
    data = spec["content"].encode("utf-8")
    st = _lstat(path)
    if st is not None and not stat.S_ISREG(st.st_mode):
        raise FilesError(f"{path} exists and is not a regular file: remove it, or move it away")
    if not os.path.isdir(os.path.dirname(path)) and not check_mode:
        raise FilesError(f"{path}: its directory does not exist")
    current = _read(path) if st is not None else None
    if current == data and not _attributes_differ(st, uid, gid, mode):
        return None
    wanted = _wanted(spec, mode)
    if current == data:
        action = "attributes"
        diff = {"before_header": path + " (attributes)", "after_header": path + " (attributes)",
                "before": _describe(st) + "\n", "after": wanted + "\n"}
    else:
        action = "created" if st is None else "updated"
        if secret:
            diff = {"prepared": f"{path}: {action}, {wanted} {NOT_SHOWN}\n"}
        else:
            diff = {"before_header": path, "after_header": path,
                    "before": current.decode("utf-8", "replace") if current is not None else "",
                    "after": spec["content"]}
    if not check_mode:
        if action == "attributes":
            _set_attributes(path, uid, gid, mode)
        else:
            write_atomically(path, data, uid, gid, mode)
    return action, diff


def converge_absent(path, check_mode=False):
    """Remove path (a directory with all it holds) when it exists."""
    st = _lstat(path)
    if st is None:
        return None
    kind = "directory" if stat.S_ISDIR(st.st_mode) else "file"
    if not check_mode:
        if kind == "directory":
            shutil.rmtree(path)
        else:
            os.unlink(path)
    return "removed", {"before_header": path, "after_header": path,
                       "before": kind + "\n", "after": "absent\n"}


def converge(directories=(), files=(), secret_files=(), absent=(), check_mode=False):
    """Directories, then files, then secret files, then removals; stops at the first error.

    Returns {"changed_paths": [...], "changes": {path: action}, "diff": [...]}."""
    steps = ([(converge_directory, spec, {}) for spec in directories]
             + [(converge_file, spec, {"secret": False}) for spec in files]
             + [(converge_file, spec, {"secret": True}) for spec in secret_files])
    result = {"changed_paths": [], "changes": {}, "diff": []}

    def note(path, outcome):
        if outcome is not None:
            result["changed_paths"].append(path)
            result["changes"][path] = outcome[0]
            result["diff"].append(outcome[1])

    for step, spec, options in steps:
        note(spec["path"], step(spec, check_mode=check_mode, **options))
    for path in absent:
        note(path, converge_absent(path, check_mode=check_mode))
    return result


FILE_OPTIONS = dict(
    path=dict(type="path", required=True),
    content=dict(type="str", required=True),
    owner=dict(type="str", default="root"),
    group=dict(type="str", default="root"),
    mode=dict(type="str", default="0644"),
)


def argument_spec():
    secret = dict(FILE_OPTIONS, content=dict(type="str", required=True, no_log=True),
                  mode=dict(type="str", default="0600"))
    directory = dict(path=dict(type="path", required=True), owner=dict(type="str", default="root"),
                     group=dict(type="str", default="root"), mode=dict(type="str", default="0755"))
    return dict(
        directories=dict(type="list", elements="dict", default=[], options=directory),
        files=dict(type="list", elements="dict", default=[], options=FILE_OPTIONS),
        # The list itself is not secret (paths, modes); each content is no_log.
        secret_files=dict(type="list", elements="dict", default=[], options=secret, no_log=False),
        absent=dict(type="list", elements="path", default=[]),
        # Handled by the action (plugins/action/agent_files.py) before the module runs.
        packages=dict(type="list", elements="str", default=[]),
        apt_cache_valid_time=dict(type="int", default=0),
        plan=dict(type="dict"),
        secrets=dict(type="dict", no_log=True),
        ca_certificate=dict(type="str"),
    )


def main():
    module = AnsibleModule(argument_spec=argument_spec(), supports_check_mode=True)
    params = module.params
    try:
        result = converge(params["directories"], params["files"], params["secret_files"],
                          params["absent"], check_mode=module.check_mode)
    except FilesError as error:
        module.fail_json(msg=str(error))
    except OSError as error:
        # The path and the reason, never the content.
        module.fail_json(msg=f"{error.filename or 'a file'}: {error.strerror or error}")
    diff = result.pop("diff")
    if module._diff:
        result["diff"] = diff
    module.exit_json(changed=bool(result["changed_paths"]), **result)


if __name__ == "__main__":
    main()
