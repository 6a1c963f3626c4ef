"""Check the role's variables, probe the host and judge whether it can run the agent, in one task.

The role's preflight (tasks/preflight.yml). When `problems` (what the role's filters found
wrong with its variables, computed on the controller) is not empty, the host fails with every
one of them in one line, and nothing reaches the host. Otherwise the role's one read-only
look at the host: it runs the probe script
(roles/stacksense_agent/files/probe_host.sh) as a shell command with its STACKSENSE_PROBE_*
settings (as ansible.builtin.raw does: one round trip, no module, no Python needed on the
host; with the play's privilege escalation), parses the answer (plugins/filter/host_probe.py:
host_probe) and, when `checks` is given, fails the host with every reason it cannot run the
agent (host_problems), one line. Registered, the result is what host_probe returns (facts,
files, dirs, kept, packages).

With `role` (the role's preflight) the action itself templates the role's variables and the
fixed values of vars/main.yml once, finds their problems (plugins/filter/role_plan.py:
variable_problems, then meta/argument_specs.yml), derives the role's plan from them
(role_plan: the probe's settings and checks among it) and, after the probe, what the host's
answer decides (after_probe). The result's `plan` is what vars/main.yml and the usual
deploy's tasks read: no template chain is compiled again at each use
(docs/DEPLOY_BENCHMARKS.md).

One task where it was five: the probe, a set_fact that parsed its answer and a fail that
judged it; the variables' check, a fail skipped on every host that passed it; and Ansible's
own check of the role's variables against meta/argument_specs.yml (their types and choices),
which playbooks/deploy.yml and remove.yml turn off (rolespec_validate: false) because it runs
here, with Ansible's validator, after the role's own checks (theirs name the value and the
fix). At fleet scale every task costs the controller a worker per host
(docs/DEPLOY_BENCHMARKS.md).
"""

import functools
import importlib.util
import re
import shlex
from pathlib import Path

import yaml
from ansible.errors import AnsibleActionFail
from ansible.module_utils.common.arg_spec import ArgumentSpecValidator
from ansible.plugins.action import ActionBase

ARGUMENT_SPECS = (Path(__file__).resolve().parent.parent.parent
                  / "roles" / "stacksense_agent" / "meta" / "argument_specs.yml")


def _filter_module(name):
    spec = importlib.util.spec_from_file_location(
        f"stacksense_filter_{name}",
        str(Path(__file__).resolve().parent.parent / "filter" / f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


_PROBE = _filter_module("host_probe")
_PLAN = _filter_module("role_plan")
SETTING_NAME = re.compile(r"STACKSENSE_PROBE_[A-Z0-9_]+")


def probe_command(script, environment):
    """The shell command line: the settings as assignments, then `/bin/sh -c SCRIPT`."""
    bad = [name for name in environment if not SETTING_NAME.fullmatch(str(name))]
    if bad:
        raise AnsibleActionFail(f"agent_probe: not a probe setting: {bad!r}")
    assignments = [f"{name}={shlex.quote(str(value))}" for name, value in environment.items()]
    return " ".join([*assignments, "/bin/sh", "-c", shlex.quote(script), "probe_host.sh"])


@functools.lru_cache(maxsize=None)
def role_options():
    """The options of the role's entry point main (meta/argument_specs.yml), read once."""
    specs = yaml.safe_load(ARGUMENT_SPECS.read_text(encoding="utf-8"))
    return specs["argument_specs"]["main"]["options"]


def spec_problems(values):
    """What Ansible's role argument validation says of these values (the role's variables that
    are set), one line per problem."""
    validator = ArgumentSpecValidator(role_options())
    result = validator.validate(values, validate_role_argument_spec=True)
    # One line each: a value's line breaks shown as \\n, as JSON would.
    return [str(message).replace("\r", "\\r").replace("\n", "\\n")
            for message in result.error_messages]


def last_line(text):
    lines = [line for line in (text or "").splitlines() if line.strip()]
    return lines[-1].strip() if lines else ""


class ActionModule(ActionBase):
    TRANSFERS_FILES = False
    _supports_check_mode = True  # read-only: it runs in check mode too
    _requires_connection = True

    def run(self, tmp=None, task_vars=None):
        result = super().run(tmp, task_vars)
        args = self._task.args
        problems = args.get("problems") or []
        script = args.get("script")
        environment = args.get("environment") or {}
        checks = args.get("checks")
        role = args.get("role", False)
        if not isinstance(problems, list) or not isinstance(script, str) or not isinstance(
                environment, dict) or not (checks is None or isinstance(checks, dict)) or not (
                isinstance(role, bool)):
            raise AnsibleActionFail(
                "agent_probe needs problems (list), script (text), environment (dict), "
                "checks (dict or null) and role (bool)")
        task_vars = task_vars or {}
        host = task_vars.get("inventory_hostname", "")
        plan = None
        if role:
            # The role's variables and the fixed values of vars/main.yml, templated once.
            names = [*role_options(), *_PLAN.INTERNAL]
            values = self._templar.template(
                {name: task_vars[name] for name in names if name in task_vars})
            problems = [*problems, *_PLAN.variable_problems(values)]
            # Then, as Ansible's validate_argument_spec does it, the role's variables against
            # meta/argument_specs.yml: types and choices of the variables the role's own
            # checks do not look at (theirs name the value and the fix, so they come first).
            if not problems:
                wrong = spec_problems({name: values[name] for name in role_options()
                                       if name in values})
                problems = [f"the role's arguments: {'; '.join(wrong)}"] if wrong else []
            if not problems:
                plan = _PLAN.role_plan(values)
                environment = dict(_PLAN.probe_settings(values, plan), **environment)
                if "checks" not in args:  # given, it replaces the plan's (tests: None)
                    checks = _PLAN.host_checks(values, plan)
        if problems:
            result.update(failed=True, msg=f"{host}: {' '.join(str(p) for p in problems)}")
            return result
        answer = self._low_level_execute_command(probe_command(script, environment))
        if answer.get("rc") != 0:
            why = last_line(answer.get("stderr")) or last_line(answer.get("stdout"))
            result.update(failed=True, rc=answer.get("rc"), stderr=answer.get("stderr", ""),
                          msg=f"the probe of the host failed (rc {answer.get('rc')}): {why}")
            return result
        result.update(_PROBE.host_probe(answer.get("stdout", "").splitlines()), changed=False)
        if plan is not None:
            result["plan"] = _PLAN.after_probe(
                values, plan, result, bool(self._task.check_mode),
                (task_vars.get("ansible_run_tags"), task_vars.get("ansible_skip_tags")))
        if checks is not None:
            problems = _PROBE.host_problems(
                result["facts"], bool(checks.get("cron")), bool(checks.get("token")),
                str(checks.get("ca_bundle") or ""))
            if problems:
                result.update(failed=True, msg=f"{host}: {' '.join(problems)}")
        return result
