"""Install the agent's missing packages, then converge its files, in one task.

The action of plugins/modules/agent_files.py (Ansible runs it for that module). When
`packages` names packages the probe found missing, they are installed first with
ansible.builtin.apt (update_cache, `apt_cache_valid_time`), as the role's own apt task did;
in check mode they are only reported (apt cannot update its lists in check mode, so on a
fresh host it could not even resolve them). Then the module converges the files. One task
where it was two (an apt task every first deploy runs, and its check-mode report, skipped on
every other run): at fleet scale every task costs the controller a worker per host
(docs/DEPLOY_BENCHMARKS.md). The packages' failure (dpkg locked, a broken package manager)
fails the task before any file changes, and says which packages.

With `plan` (the role's: what its preflight task registered, plugins/filter/role_plan.py),
the packages, the directories, files, secret files and paths to remove come from the plan's
`files`, whose contents this action fills in: the agent (read from the plan's agent_source),
the CA certificates (`ca_certificate`), the systemd unit (the role's template, rendered here
with the plan's values), the token and the proxy settings (`secrets`: the role's variables
stacksense_api_token and stacksense_*_proxy, never shown). One template per host where the
task's arguments were a hundred (docs/DEPLOY_BENCHMARKS.md).
"""

import importlib.util
from pathlib import Path

from ansible.errors import AnsibleActionFail
from ansible.plugins.action import ActionBase
from ansible.plugins.loader import lookup_loader


def _role_plan_module():
    spec = importlib.util.spec_from_file_location(
        "stacksense_filter_role_plan",
        str(Path(__file__).resolve().parent.parent / "filter" / "role_plan.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


_PLAN = _role_plan_module()
UNIT_TEMPLATE = "stacksense-heartbeat.service.j2"
# The fixed values of vars/main.yml the unit names (the rest is the plan's).
UNIT_PATHS = ("__stacksense_agent_path", "__stacksense_token_path", "__stacksense_proxy_env_path")


class ActionModule(ActionBase):
    TRANSFERS_FILES = False
    _supports_check_mode = True

    def run(self, tmp=None, task_vars=None):
        result = super().run(tmp, task_vars)
        task_vars = task_vars or {}
        args = dict(self._task.args)
        plan = args.pop("plan", None)
        secrets = args.pop("secrets", None) or {}
        ca_certificate = args.pop("ca_certificate", "")
        if plan is not None:
            args.update(self._files(plan, secrets, ca_certificate, task_vars))
            args.update(packages=plan["missing_packages"],
                        apt_cache_valid_time=plan["apt_cache_valid_time"])
        packages = args.pop("packages", None) or []
        valid_time = args.pop("apt_cache_valid_time", 0)
        if not isinstance(packages, list) or not all(isinstance(p, str) for p in packages):
            raise AnsibleActionFail("agent_files: packages must be a list of package names")
        if packages and self._task.check_mode:
            result.update(changed=True, packages=packages,
                          msg=f"would install {', '.join(packages)}")
        elif packages:
            apt = self._execute_module(
                module_name="ansible.builtin.apt", task_vars=task_vars,
                module_args={"name": packages, "state": "present", "update_cache": True,
                             "cache_valid_time": valid_time})
            if apt.get("failed"):
                result.update(failed=True, msg=f"the agent's packages ({', '.join(packages)}) "
                                               f"could not be installed: {apt.get('msg', apt)}")
                return result
            result.update(changed=bool(apt.get("changed")), packages=packages)
        files = self._execute_module(module_name="stacksense.fleet.agent_files",
                                     module_args=args, task_vars=task_vars)
        changed = result.get("changed", False) or files.get("changed", False)
        result.update(files)
        result["changed"] = changed
        return result

    def _files(self, plan, secrets, ca_certificate, task_vars):
        """The module's arguments from the plan's files, each content filled in."""
        contents = {}

        def content(name):
            if name not in contents:
                contents[name] = self._content(name, plan, secrets, ca_certificate, task_vars)
            return contents[name]

        spec = plan["files"]
        return {
            "directories": spec["directories"],
            "files": [dict(f, content=content(f["content"])) for f in spec["files"]],
            "secret_files": [dict(f, content=content(f["content"]))
                             for f in spec["secret_files"]],
            "absent": spec["absent"],
        }

    def _content(self, name, plan, secrets, ca_certificate, task_vars):
        if name == "token":
            return f"{_PLAN._text(secrets.get('stacksense_api_token')).strip()}\n"
        if name == "proxy":
            return _PLAN.proxy_env_text(_PLAN.proxy_env(secrets))
        if name == "ca":
            return f"{_PLAN._text(ca_certificate).strip()}\n"
        variables = {"ansible_search_path": task_vars.get("ansible_search_path", []),
                     "role_path": task_vars.get("role_path", "")}
        if name == "agent":
            lookup = lookup_loader.get("ansible.builtin.file", loader=self._loader,
                                       templar=self._templar)
            return lookup.run([plan["agent_source"]], variables=variables, rstrip=False)[0]
        if name == "unit":
            # The unit's template reads the plan's values under vars/main.yml's names
            # (__stacksense_X is the plan's X) and the probe's facts (host,
            # in_container), as plain data.
            variables.update({f"__stacksense_{key}": value for key, value in plan.items()})
            variables.update(self._templar.template(
                {name: task_vars[name] for name in UNIT_PATHS if name in task_vars}))
            lookup = lookup_loader.get("ansible.builtin.template", loader=self._loader,
                                       templar=self._templar)
            return lookup.run([UNIT_TEMPLATE], variables=variables)[0]
        raise AnsibleActionFail(f"agent_files: no content named {name!r}")
