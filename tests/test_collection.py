"""The repository is the collection stacksense.fleet: one version everywhere, the same EE pins."""

import re
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent


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
