"""scripts/run_scenarios.py: Molecule scenarios in lanes, each one's cost reported."""

import importlib.util
import threading
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def runner():
    spec = importlib.util.spec_from_file_location(
        "run_scenarios", ROOT / "scripts" / "run_scenarios.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_two_lanes_run_two_scenarios_at_once_and_report_each(tmp_path, monkeypatch):
    module = runner()
    monkeypatch.setattr(module, "LOG_DIR", tmp_path)
    monkeypatch.setattr(module, "ROOT", tmp_path)
    both_running = threading.Barrier(2, timeout=5)
    started = []

    def run(scenario, log_path):
        started.append(scenario)
        log_path.write_text(f"{scenario} log\n")
        if scenario in ("a", "b"):
            both_running.wait()  # a and b overlap, or this times out
        return True, 1.0

    said = []
    results = module.run_all(["a", "b", "c"], 2, run=run, say=said.append)
    assert results == {"a": (True, 1.0), "b": (True, 1.0), "c": (True, 1.0)}
    assert started[:2] in (["a", "b"], ["b", "a"]) and started[2] == "c"
    assert {line for line in said if "passed" in line} == {
        "=== a passed in 1 s", "=== b passed in 1 s", "=== c passed in 1 s"}


def test_a_failure_shows_its_log_and_starts_nothing_more(tmp_path, monkeypatch):
    module = runner()
    monkeypatch.setattr(module, "LOG_DIR", tmp_path)
    monkeypatch.setattr(module, "ROOT", tmp_path)

    a_failed = threading.Event()

    def run(scenario, log_path):
        if log_path is not None:
            log_path.write_text(f"{scenario}: the assertion that failed\n")
            if scenario == "b":
                a_failed.wait(5)  # b, in the other lane, ends after a has failed
        return scenario != "a", 2.0

    assert module.run_all(["a", "b", "c"], 1, run=run, say=lambda line: None) == {
        "a": (False, 2.0)}
    said = []

    def say(line):
        said.append(line)
        if "a FAILED" in line:
            a_failed.set()

    results = module.run_all(["a", "b", "c"], 2, run=run, say=say)
    assert results["a"] == (False, 2.0) and "c" not in results
    assert any("a: the assertion that failed" in line for line in said)
    assert "=== a FAILED in 2 s" in said
