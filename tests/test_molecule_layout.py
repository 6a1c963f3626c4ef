"""Molecule scenarios may run side by side (make molecule, MOLECULE_JOBS lanes): nothing shared."""

import re
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent


def ports_of(node, found):
    """Every value of a key ending in _port anywhere in node."""
    if isinstance(node, dict):
        for key, value in node.items():
            if str(key).endswith("_port") and isinstance(value, int):
                found.add(value)
            else:
                ports_of(value, found)
    elif isinstance(node, list):
        for item in node:
            ports_of(item, found)
    return found


def test_no_two_scenarios_use_the_same_port_on_this_machine():
    owners = {}
    for config in sorted(ROOT.glob("molecule/*/molecule.yml")):
        scenario = config.parent.name
        for port in ports_of(yaml.safe_load(config.read_text()), set()):
            owners.setdefault(port, []).append(scenario)
    shared = {port: names for port, names in owners.items() if len(names) > 1}
    assert owners, "found no scenario port at all"
    assert not shared, f"scenarios sharing a port cannot run side by side: {shared}"



# Scenarios that check the test harness itself, run by hand (molecule/README.md).
NOT_IN_MAKE_TEST = {"smoke", "coll-harness"}


def test_make_test_runs_every_scenario_and_the_readme_describes_each():
    """A scenario folded into another, or added, leaves or joins all three lists."""
    scenarios = {config.parent.name for config in ROOT.glob("molecule/*/molecule.yml")}
    makefile = (ROOT / "Makefile").read_text()
    listed = re.search(r"(?m)^SCENARIOS \?= (.*)$", makefile).group(1).split()
    readme = (ROOT / "README.md").read_text()
    table = readme[readme.index("| Scenario | Proves |"):].split("\n\n", 1)[0]
    described = re.findall(r"(?m)^\| `([\w-]+)` \| ", table)
    assert len(listed) == len(set(listed)), f"Makefile's SCENARIOS names one twice: {listed}"
    assert set(listed) == scenarios - NOT_IN_MAKE_TEST, (
        f"Makefile's SCENARIOS {sorted(listed)}, molecule/ {sorted(scenarios)}")
    assert set(listed) <= set(described) <= scenarios, (
        f"README's scenario table {sorted(described)}, molecule/ {sorted(scenarios)}")
