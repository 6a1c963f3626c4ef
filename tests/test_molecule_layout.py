"""Molecule scenarios may run side by side (make molecule, MOLECULE_JOBS lanes): nothing shared."""

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

