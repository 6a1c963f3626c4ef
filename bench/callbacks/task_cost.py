"""Controller CPU per task, and the templates each worker compiles: a callback for profiling.

Not part of the collection (bench/ is not shipped). Enable it for one run of a playbook:

    ANSIBLE_CALLBACK_PLUGINS=bench/callbacks ANSIBLE_CALLBACKS_ENABLED=task_cost \
    TASK_COST_OUT=cost.json [TASK_COST_COMPILES=1] ansible-playbook -i INVENTORY PLAYBOOK

cost.json then has, per task banner (summed over batches and hosts): the controller's own CPU
seconds, its reaped children's (the forked workers and their ssh processes), the wall
seconds, the ok / skipped / failed counts and, with TASK_COST_COMPILES=1, the templates the
workers compiled (Jinja's from_string: ansible-core 2.19 compiles a template each time it
evaluates one) and how many of them were distinct. docs/DEPLOY_BENCHMARKS.md ("Controller
CPU, 2026-12-06 night") was measured with it on bench/deploy_scale.py's hosts. Counting
compiles patches ansible-core's template environment in each worker: a profiling aid only.
"""

import json
import os
import resource
import time

from ansible.plugins.callback import CallbackBase

DOCUMENTATION = """
name: task_cost
type: aggregate
short_description: controller CPU and compiled templates per task (profiling)
description: Controller CPU and compiled templates per task, written to TASK_COST_OUT.
"""


def _cpu():
    own = resource.getrusage(resource.RUSAGE_SELF)
    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime, children.ru_utime + children.ru_stime


def _count_compiles(directory):
    """In each worker, record the sources of the templates it compiles (one file a worker)."""
    from ansible._internal._templating import _jinja_bits
    from ansible.executor.process import worker

    compiled = []
    from_string = _jinja_bits.AnsibleEnvironment.from_string

    def counting_from_string(self, source, *args, **kwargs):
        compiled.append(source if isinstance(source, str) else "<parsed>")
        return from_string(self, source, *args, **kwargs)

    run = worker.WorkerProcess._run

    def counting_run(self):
        _jinja_bits.AnsibleEnvironment.from_string = counting_from_string
        try:
            return run(self)
        finally:
            path = os.path.join(directory, f"{os.getpid()}.json")
            with open(path, "w") as out:
                json.dump({"task": self._task.get_name(), "compiled": compiled}, out)

    worker.WorkerProcess._run = counting_run


class CallbackModule(CallbackBase):
    CALLBACK_VERSION = 2.0
    CALLBACK_TYPE = "aggregate"
    CALLBACK_NAME = "task_cost"
    CALLBACK_NEEDS_ENABLED = True

    def __init__(self):
        super().__init__()
        self.out = os.environ.get("TASK_COST_OUT", "task_cost.json")
        self.compiles = None
        if os.environ.get("TASK_COST_COMPILES") == "1":
            self.compiles = self.out + ".compiles"
            os.makedirs(self.compiles, exist_ok=True)
            _count_compiles(self.compiles)
        self.current = "(start)"
        self.mark, self.started = _cpu(), time.monotonic()
        self.rows = {}

    def _row(self, name):
        return self.rows.setdefault(name, {"own_s": 0.0, "children_s": 0.0, "wall_s": 0.0,
                                           "ok": 0, "skipped": 0, "failed": 0})

    def _switch(self, name):
        now, wall = _cpu(), time.monotonic()
        row = self._row(self.current)
        row["own_s"] += now[0] - self.mark[0]
        row["children_s"] += now[1] - self.mark[1]
        row["wall_s"] += wall - self.started
        self.mark, self.started, self.current = now, wall, name

    def v2_playbook_on_task_start(self, task, is_conditional):
        self._switch(task.get_name())

    def v2_playbook_on_handler_task_start(self, task):
        self._switch("HANDLER " + task.get_name())

    def v2_runner_on_ok(self, result):
        self._row(self.current)["ok"] += 1

    def v2_runner_on_skipped(self, result):
        self._row(self.current)["skipped"] += 1

    def v2_runner_on_failed(self, result, ignore_errors=False):
        self._row(self.current)["failed"] += 1

    def v2_playbook_on_stats(self, stats):
        self._switch("(end)")
        if self.compiles:
            for name in sorted(os.listdir(self.compiles)):
                with open(os.path.join(self.compiles, name)) as worker_file:
                    record = json.load(worker_file)
                row = self._row(record["task"])
                row.setdefault("compiled", 0)
                row.setdefault("distinct_per_worker", [])
                row["compiled"] += len(record["compiled"])
                row["distinct_per_worker"].append(len(set(record["compiled"])))
        with open(self.out, "w") as out:
            json.dump(self.rows, out, indent=1)
