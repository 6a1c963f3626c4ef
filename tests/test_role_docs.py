"""The role documents each variable once, in meta/argument_specs.yml, and nothing else."""

import subprocess
import sys
from pathlib import Path

import yaml

ROLE = Path(__file__).resolve().parent.parent / "roles" / "stacksense_agent"


def load(relative):
    return yaml.safe_load((ROLE / relative).read_text())


def test_argument_specs_and_defaults_name_the_same_variables():
    specs = load("meta/argument_specs.yml")["argument_specs"]["main"]["options"]
    defaults = load("defaults/main.yml")
    assert sorted(specs) == sorted(defaults)


def test_every_variable_is_described_typed_and_prefixed():
    specs = load("meta/argument_specs.yml")["argument_specs"]["main"]["options"]
    for name, spec in specs.items():
        assert name.startswith("stacksense_"), name
        assert spec.get("description"), f"{name} has no description"
        assert spec.get("type"), f"{name} has no type"


def test_spec_defaults_match_the_defaults_file():
    specs = load("meta/argument_specs.yml")["argument_specs"]["main"]["options"]
    defaults = load("defaults/main.yml")
    for name, spec in specs.items():
        if "default" in spec and "{{" not in str(defaults[name]):
            assert spec["default"] == defaults[name], name


def test_the_role_readme_lists_every_variable():
    specs = load("meta/argument_specs.yml")["argument_specs"]["main"]["options"]
    readme = (ROLE / "README.md").read_text()
    missing = [name for name in specs if f"`{name}`" not in readme]
    assert missing == []


def test_the_role_readmes_table_is_the_one_generated_from_the_specification():
    script = ROLE.parent.parent / "scripts" / "role_readme.py"
    done = subprocess.run([sys.executable, str(script), "--check"], capture_output=True,
                          text=True, check=False)
    assert done.returncode == 0, done.stderr
