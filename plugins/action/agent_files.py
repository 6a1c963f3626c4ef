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
"""

from ansible.errors import AnsibleActionFail
from ansible.plugins.action import ActionBase


class ActionModule(ActionBase):
    TRANSFERS_FILES = False
    _supports_check_mode = True

    def run(self, tmp=None, task_vars=None):
        result = super().run(tmp, task_vars)
        args = dict(self._task.args)
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
