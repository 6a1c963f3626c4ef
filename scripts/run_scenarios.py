#!/usr/bin/env python3
"""Run Molecule scenarios, JOBS at a time, and say what each cost (`make molecule`).

    scripts/run_scenarios.py [--jobs N] SCENARIO...

With --jobs 1 each scenario's output streams as it runs. With more, each scenario writes
build/molecule/<scenario>.log and the next one starts as soon as a lane is free, in the order
given (the Makefile lists the longest first so that the lanes end together); a failed
scenario's log tail is printed, no new scenario starts, and the exit status is 1. Scenarios
can share the machine: each has its own containers (molecule-<scenario>-<platform>), receiver
and proxy ports and Molecule state; they spend most of their time waiting on containers, so
two lanes fit 2 cores.
"""

import argparse
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
LOG_DIR = ROOT / "build" / "molecule"
TAIL_LINES = 80


def molecule_argv(scenario):
    return [str(Path(sys.executable).parent / "molecule"), "test", "-s", scenario]


def run_one(scenario, log_path):
    """One `molecule test -s scenario`, to the terminal or to log_path; returns (ok, seconds)."""
    started = time.monotonic()
    if log_path is None:
        code = subprocess.run(molecule_argv(scenario), cwd=ROOT, check=False).returncode
    else:
        with log_path.open("w") as log:
            code = subprocess.run(molecule_argv(scenario), cwd=ROOT, stdout=log,
                                  stderr=subprocess.STDOUT, check=False).returncode
    return code == 0, time.monotonic() - started


def tail(path, lines=TAIL_LINES):
    return "".join(path.read_text(errors="replace").splitlines(keepends=True)[-lines:])


def run_all(scenarios, jobs, run=run_one, say=print):
    """Run scenarios in jobs lanes; returns {scenario: (ok, seconds)} for those that ran."""
    pending = list(scenarios)
    results = {}
    lock = threading.Lock()
    jobs = max(1, min(jobs, len(scenarios)))  # one scenario, one lane: its output streams
    if jobs > 1:
        LOG_DIR.mkdir(parents=True, exist_ok=True)

    def lane():
        while True:
            with lock:
                if not pending or not all(ok for ok, _ in results.values()):
                    return
                scenario = pending.pop(0)
                log_path = LOG_DIR / f"{scenario}.log" if jobs > 1 else None
                say(f"=== molecule test -s {scenario}"
                    + (f" (log: {log_path.relative_to(ROOT)})" if log_path else ""))
            ok, seconds = run(scenario, log_path)
            with lock:
                results[scenario] = (ok, seconds)
                if not ok and log_path is not None:
                    say(f"=== {scenario}: last lines of {log_path.relative_to(ROOT)}:\n"
                        + tail(log_path))
                say(f"=== {scenario} {'passed' if ok else 'FAILED'} in {seconds:.0f} s")

    lanes = [threading.Thread(target=lane) for _ in range(jobs)]
    for thread in lanes:
        thread.start()
    for thread in lanes:
        thread.join()
    return results


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, default=int(os.environ.get("MOLECULE_JOBS", "1")))
    parser.add_argument("scenarios", nargs="+")
    args = parser.parse_args(argv)
    if args.jobs < 1:
        parser.error(f"--jobs {args.jobs}: give 1 or more")
    started = time.monotonic()
    results = run_all(args.scenarios, args.jobs)
    failed = [name for name, (ok, _) in results.items() if not ok]
    not_run = [name for name in args.scenarios if name not in results]
    summary = ", ".join(f"{name} {seconds:.0f} s" for name, (_, seconds) in results.items())
    print(f"=== molecule: {summary}; {time.monotonic() - started:.0f} s in all"
          f" with {args.jobs} lane(s)")
    if failed:
        print(f"=== molecule: FAILED {' '.join(failed)}"
              + (f"; not run: {' '.join(not_run)}" if not_run else ""))
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
