#!/usr/bin/env python3
"""Prove that `make test` leaves the user's ~/.ansible as it found it.

    scripts/home_check.py snapshot FILE    record what ~/.ansible holds
    scripts/home_check.py compare FILE     fail, naming them, if entries appeared or vanished

The Makefile gives every tool it runs an ANSIBLE_HOME of the clone's own (.cache/ansible-home):
Molecule's install of stacksense.fleet and its scenario state, ansible's temporary files and
ansible-galaxy's cache go there. ansible-test and galaxy-importer get a HOME of their own
(scripts/gates.py). Files are compared by path; ansible's own per-process temporary
directories (tmp/ansible-local-*), which a concurrent ansible run elsewhere may create or
remove at any moment, are left out.
"""

import argparse
import fnmatch
import os
import sys
from pathlib import Path

TRANSIENT = ("tmp/ansible-local-*",)


def ansible_dir(environ):
    """The user's ~/.ansible, whatever ANSIBLE_HOME make exported."""
    return Path(environ.get("HOME") or Path.home()) / ".ansible"


def entries(root):
    """Every path under root, relative, minus the transient ones."""
    if not root.is_dir():
        return set()
    found = set()
    for directory, subdirs, files in os.walk(root):
        for name in subdirs + files:
            relative = (Path(directory) / name).relative_to(root).as_posix()
            if not any(fnmatch.fnmatch(relative, pattern) or
                       fnmatch.fnmatch(relative, pattern + "/*") for pattern in TRANSIENT):
                found.add(relative)
    return found


def differences(before, after):
    """Lines naming what appeared and what vanished, empty when nothing did."""
    return ([f"new: ~/.ansible/{path}" for path in sorted(after - before)] +
            [f"gone: ~/.ansible/{path}" for path in sorted(before - after)])


def main(argv=None, environ=os.environ):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("action", choices=["snapshot", "compare"])
    parser.add_argument("file", type=Path)
    args = parser.parse_args(argv)
    now = entries(ansible_dir(environ))
    if args.action == "snapshot":
        args.file.parent.mkdir(parents=True, exist_ok=True)
        args.file.write_text("".join(f"{path}\n" for path in sorted(now)))
        return 0
    before = set(args.file.read_text().splitlines())
    changed = differences(before, now)
    for line in changed:
        print(f"home_check: {line}", file=sys.stderr)
    if changed:
        print(f"home_check: make test changed ~/.ansible ({len(changed)} entries, above); "
              "a tool ran without the Makefile's ANSIBLE_HOME", file=sys.stderr)
        return 1
    print(f"home_check: ~/.ansible as before ({len(now)} entries)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
