"""The repository is the collection stacksense.fleet: one version everywhere, the same EE pins."""

import re
import subprocess
import sys
import tarfile
from pathlib import Path

import yaml
from conftest import COLLECTION_LINK, load_module

ROOT = Path(__file__).resolve().parent.parent


def load_script(name):
    return load_module(name, f"scripts/{name}.py")


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


def test_the_home_check_names_what_appeared_and_ignores_ansibles_own_temporary_dirs(tmp_path):
    home_check = load_script("home_check")
    ansible = tmp_path / ".ansible"
    (ansible / "tmp" / "ansible-local-123abc").mkdir(parents=True)
    before = home_check.entries(ansible)
    assert before == {"tmp"}
    (ansible / "tmp" / "ansible-local-123abc" / "x").write_text("")
    (ansible / "collections" / "ansible_collections" / "stacksense").mkdir(parents=True)
    after = home_check.entries(ansible)
    assert home_check.differences(before, after) == [
        "new: ~/.ansible/collections", "new: ~/.ansible/collections/ansible_collections",
        "new: ~/.ansible/collections/ansible_collections/stacksense"]
    snapshot = tmp_path / "before.txt"
    assert home_check.main(["snapshot", str(snapshot)], {"HOME": str(tmp_path)}) == 0
    assert home_check.main(["compare", str(snapshot)], {"HOME": str(tmp_path)}) == 0
    (ansible / "roles").mkdir()
    assert home_check.main(["compare", str(snapshot)], {"HOME": str(tmp_path)}) == 1


def test_a_clone_runs_the_collections_own_plugins_and_the_artifact_carries_them():
    import configparser

    cfg = configparser.ConfigParser()
    cfg.read(ROOT / "ansible.cfg")
    paths = cfg["defaults"]["collections_path"].split(":")
    assert paths[0] == ".collections" and "~/.ansible/collections" in paths, paths
    ignored = set(galaxy()["build_ignore"])
    assert ".collections" in ignored and "plugins" not in ignored
    assert (ROOT / "plugins" / "filter").is_dir()


def test_a_checkout_is_the_collection_through_its_committed_link():
    # What a plain `git clone` (an AWX project sync) gets, with no make run.
    assert COLLECTION_LINK.is_symlink() and COLLECTION_LINK.resolve() == ROOT
    listed = subprocess.run(["git", "-C", str(ROOT), "ls-files", "--stage", "--",
                             str(COLLECTION_LINK.relative_to(ROOT))],
                            capture_output=True, text=True, check=False)
    if listed.returncode == 0:  # a git checkout, not an unpacked copy
        mode, blob = listed.stdout.split()[:2]
        assert mode == "120000", listed.stdout  # a symbolic link
        target = subprocess.run(["git", "-C", str(ROOT), "cat-file", "blob", blob],
                                capture_output=True, text=True, check=True).stdout
        assert target == "../../.."


def test_every_scenario_finds_the_clone_as_the_collection_and_installs_nothing_in_home():
    for config in sorted(ROOT.glob("molecule/*/molecule.yml")):
        scenario = yaml.safe_load(config.read_text())
        assert scenario.get("prerun") is False, f"{config}: Molecule would install into ~/.ansible"
        defaults = scenario.get("ansible", {}).get("cfg", {}).get("defaults", {})
        if "roles_path" in defaults:  # a scenario that runs the role
            first = defaults.get("collections_path", "").split(":")[0]
            assert first == "${MOLECULE_PROJECT_DIRECTORY}/.collections", config
