#!/usr/bin/env python3
"""The role README's table of variables, generated from meta/argument_specs.yml.

    scripts/role_readme.py           rewrite the table in roles/stacksense_agent/README.md
    scripts/role_readme.py --check   exit 1 when the README's table is not the generated one

argument_specs.yml is the one place where the role's variables are documented; the README
shows the same words (tests/test_role_docs.py runs the check).
"""

import argparse
import sys
from pathlib import Path

import yaml

ROLE = Path(__file__).resolve().parent.parent / "roles" / "stacksense_agent"
SPECS = ROLE / "meta" / "argument_specs.yml"
README = ROLE / "README.md"
HEADER = "| Variable | Type | Default | Choices | Description |\n| --- | --- | --- | --- | --- |\n"
MARKUP = "VCOIBM"  # ansible-doc's V(value), C(code), O(option), I(italic), B(bold), M(module)


def plain(text):
    """ansible-doc markup as Markdown code: C(x) -> `x`, with balanced parentheses inside."""
    out, i = [], 0
    while i < len(text):
        if text[i] in MARKUP and text[i + 1:i + 2] == "(" and (i == 0 or not text[i - 1].isalnum()):
            depth, j = 1, i + 2
            while j < len(text) and depth:
                depth += {"(": 1, ")": -1}.get(text[j], 0)
                j += 1
            out.append(f"`{text[i + 2:j - 1]}`")
            i = j
        else:
            out.append(text[i])
            i += 1
    return "".join(out)


def shown(value):
    if value == "":
        return '`""`'
    if isinstance(value, bool):
        return f"`{str(value).lower()}`"
    return f"`{value}`"


def table(specs):
    """The Markdown table: one row per variable, in the specification's order."""
    rows = []
    for name, spec in specs.items():
        description = spec["description"]
        if isinstance(description, list):
            description = " ".join(description)
        choices = ", ".join(shown(choice) for choice in spec.get("choices", []))
        default = shown(spec["default"]) if "default" in spec else ""
        rows.append(f"| `{name}` | {spec.get('type', 'str')} | {default} | {choices} | "
                    f"{plain(' '.join(description.split()))} |\n")
    return HEADER + "".join(rows)


def current_table(readme):
    start = readme.index(HEADER)
    end = readme.find("\n\n", start)
    return start, (len(readme) if end < 0 else end + 1)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="only compare")
    args = parser.parse_args(argv)
    specs = yaml.safe_load(SPECS.read_text())["argument_specs"]["main"]["options"]
    readme = README.read_text()
    start, end = current_table(readme)
    wanted = table(specs)
    if readme[start:end] == wanted:
        return 0
    if args.check:
        print(f"{README}: the variable table differs from {SPECS.name}; run {sys.argv[0]}",
              file=sys.stderr)
        return 1
    README.write_text(readme[:start] + wanted + readme[end:])
    return 0


if __name__ == "__main__":
    sys.exit(main())
