"""The repository is the collection stacksense.fleet: one version everywhere, the same EE pins."""

import importlib.util
import re
import subprocess
import sys
import tarfile
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent


def load_script(name):
    spec = importlib.util.spec_from_file_location(name, ROOT / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def galaxy():
    return yaml.safe_load((ROOT / "galaxy.yml").read_text())


def agent_version():
    text = (ROOT / "agent" / "heartbeat_agent.py").read_text()
    return re.search(r'^AGENT_VERSION = "([^"]+)"$', text, re.M).group(1)


def readme_versions():
    """Every release number the README states: the artifact names and "release X.Y.Z"."""
    text = (ROOT / "README.md").read_text()
    return re.findall(r"stacksense-fleet-(\d+\.\d+\.\d+)\.tar\.gz|[Rr]elease (\d+\.\d+\.\d+)",
                      text)


def test_the_agent_the_collection_and_the_readme_state_one_version():
    version = galaxy()["version"]
    assert agent_version() == version, "AGENT_VERSION differs from galaxy.yml's version"
    stated = sorted({a or b for a, b in readme_versions()})
    assert stated == [version], f"the README states {stated}, galaxy.yml {version}"


def test_the_changelog_has_a_release_for_the_collection_version():
    changes = yaml.safe_load((ROOT / "changelogs" / "changelog.yaml").read_text())
    assert galaxy()["version"] in changes["releases"]
    assert f"v{galaxy()['version']}".replace(".", "\\.") in (ROOT / "CHANGELOG.md").read_text()


def ee_pins(name):
    deps = yaml.safe_load((ROOT / name).read_text())["dependencies"]
    return {key: deps[key]["package_pip"] for key in ("ansible_core", "ansible_runner")}


def test_both_execution_environments_pin_the_same_ansible_core_and_runner():
    production = ee_pins("execution-environment.yml")
    assert production == ee_pins("execution-environment-test.yml")
    assert all("==" in pin for pin in production.values()), production


def test_the_execution_environments_pin_what_the_tests_run():
    pins = dict(line.split("==") for line in (ROOT / "requirements-dev.txt").read_text().split()
                if "==" in line)
    ee = ee_pins("execution-environment.yml")
    assert ee["ansible_core"] == f"ansible-core=={pins['ansible-core']}"
    assert ee["ansible_runner"] == f"ansible-runner=={pins['ansible-runner']}"


def test_the_artifact_leaves_the_tests_out_and_keeps_the_agent():
    ignored = set(galaxy()["build_ignore"])
    assert {"molecule", "tests", "bench", "build", ".venv", "scripts"} <= ignored
    assert not {"agent", "roles", "playbooks", "meta"} & ignored


def test_the_role_finds_the_agent_at_the_collection_root():
    defaults = yaml.safe_load(
        (ROOT / "roles" / "stacksense_agent" / "defaults" / "main.yml").read_text())
    source = defaults["stacksense_agent_source"]
    assert source == "{{ role_path }}/../../agent/heartbeat_agent.py"
    role_path = ROOT / "roles" / "stacksense_agent"
    assert (role_path / ".." / ".." / "agent" / "heartbeat_agent.py").resolve().is_file()


def test_the_repository_and_the_artifact_carry_the_mit_licence_galaxy_yml_names(tmp_path):
    assert galaxy()["license"] == ["MIT"]
    licence = (ROOT / "LICENSE").read_text()
    assert licence.startswith("MIT License\n")
    assert f"Copyright (c) 2026 {', '.join(galaxy()['authors'])}\n" in licence
    subprocess.run([sys.executable, "-m", "ansible.cli.galaxy", "collection", "build",
                    "--output-path", str(tmp_path), str(ROOT)], check=True, capture_output=True)
    (artifact,) = tmp_path.glob("stacksense-fleet-*.tar.gz")
    with tarfile.open(artifact) as tar:
        assert tar.extractfile("LICENSE").read().decode() == licence


def test_the_gates_shellcheck_every_shell_script_and_nothing_else(tmp_path):
    gates = load_script("gates")
    files = {"run": "#!/usr/bin/env bash\n", "setup.sh": "echo\n", "x": "#!/bin/sh -e\n",
             "tool.py": "#!/usr/bin/env python3\n", "notes.txt": "run it with #!/bin/bash\n"}
    for name, text in files.items():
        (tmp_path / name).write_text(text)
    assert [p.name for p in gates.shell_scripts(sorted(tmp_path.iterdir()))] == [
        "run", "setup.sh", "x"]
    ours = {p.relative_to(ROOT).as_posix() for p in gates.shell_scripts(gates.repository_files())}
    assert {".ci/run", "scripts/demo.sh", "scripts/build-images.sh"} <= ours


def test_the_claimed_oldest_ansible_core_is_the_one_the_tests_run():
    pins = dict(line.split("==") for line in (ROOT / "requirements-dev.txt").read_text().split()
                if "==" in line)
    tested = ".".join(pins["ansible-core"].split(".")[:2])
    runtime = yaml.safe_load((ROOT / "meta" / "runtime.yml").read_text())
    assert runtime["requires_ansible"] == f">={tested}.0"
    role_meta = yaml.safe_load(
        (ROOT / "roles" / "stacksense_agent" / "meta" / "main.yml").read_text())
    assert role_meta["galaxy_info"]["min_ansible_version"] == tested
