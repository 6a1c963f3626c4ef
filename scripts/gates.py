#!/usr/bin/env python3
"""The Ansible ecosystem's own gates, run by `make gates` (part of `make test`).

    scripts/gates.py shellcheck   every shell script of the repository
    scripts/gates.py sanity       ansible-test sanity on the built collection
    scripts/gates.py importer     galaxy-importer on the built collection, clean HOME

Each prints what it ran and how long it took, and exits non-zero on any finding. None of
them needs a network other than the package registries (PyPI for ansible-test's pinned
sanity requirements), nor a container, nor anything in the user's home: ansible-test gets a
HOME of its own under .cache/ (kept between runs for its virtualenvs), the importer a fresh
empty one.
"""

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
# ansible-test runs the sanity tests with this Python (Debian 12's python3).
SANITY_PYTHON = "3.11"
SANITY_HOME = ROOT / ".cache" / "ansible-test-home"
SANITY_IGNORES = ROOT / "tests" / "sanity"
GET_PIP_SHIM = ROOT / "tests" / "sanity" / "get_pip.py"
IMPORTER_CONFIG = ROOT / "tests" / "galaxy-importer.cfg"
# What a shell script is: *.sh, or a first line naming sh or bash.
SHELL_SHEBANG = re.compile(rb"\A#!\s*(/usr)?/bin/(env\s+)?(ba)?sh\b")
# Lines of galaxy-importer's log that are findings ("WARNING: ...", "ERROR: ...").
IMPORTER_FINDING = re.compile(r"\A(WARNING|ERROR|CRITICAL):")


def fail(message):
    print(f"gates: {message}", file=sys.stderr)
    sys.exit(1)


def run(argv, **kwargs):
    print("gates: $ " + " ".join(str(arg) for arg in argv), flush=True)
    return subprocess.run([str(arg) for arg in argv], check=False, **kwargs)


def repository_files():
    """The repository's files: git's list in a checkout, else every file under ROOT."""
    listed = subprocess.run(["git", "-C", str(ROOT), "ls-files", "-z"], capture_output=True,
                            check=False)
    if listed.returncode == 0:
        return [ROOT / name for name in listed.stdout.decode().split("\0") if name]
    skip = {".git", ".venv", ".cache", "build", "__pycache__"}
    return [path for path in ROOT.rglob("*")
            if path.is_file() and not skip & set(path.relative_to(ROOT).parts)]


def shell_scripts(paths):
    """The files among paths that are shell scripts (by name or by shebang)."""
    scripts = []
    for path in paths:
        if not path.is_file() or path.is_symlink():
            continue
        with path.open("rb") as handle:
            first_line = handle.readline()
        if path.suffix == ".sh" or SHELL_SHEBANG.match(first_line):
            scripts.append(path)
    return sorted(scripts)


def gate_shellcheck(_args):
    if not shutil.which("shellcheck"):
        fail("shellcheck not found: `make prereqs` installs it (apt-get install shellcheck)")
    scripts = shell_scripts(repository_files())
    if not scripts:
        fail("found no shell script, which cannot be right")
    result = run(["shellcheck", "--external-sources",
                  *(path.relative_to(ROOT) for path in scripts)], cwd=ROOT)
    return result.returncode


def build_artifact(directory):
    """ansible-galaxy collection build into directory; returns the artifact's path."""
    galaxy = yaml.safe_load((ROOT / "galaxy.yml").read_text())
    result = run([BIN / "ansible-galaxy", "collection", "build", "--force", "--output-path",
                  directory, ROOT], cwd=directory, capture_output=True, text=True)
    if result.returncode:
        fail(f"ansible-galaxy collection build failed:\n{result.stdout}{result.stderr}")
    name = f"{galaxy['namespace']}-{galaxy['name']}-{galaxy['version']}.tar.gz"
    artifact = Path(directory) / name
    if not artifact.is_file():
        fail(f"ansible-galaxy collection build wrote no {artifact.name}")
    return galaxy, artifact


def pip_version_ansible_test_bootstraps():
    """The pip version that ansible-test's sanity virtualenvs are bootstrapped with."""
    import ansible_test  # the copy that ships with ansible-core, in this virtualenv

    source = Path(ansible_test.__file__).parent / "_internal" / "python_requirements.py"
    found = re.search(r"default_packages = dict\(\s*pip='([0-9.]+)'", source.read_text())
    if not found:
        fail(f"cannot find the pip version ansible-test bootstraps in {source}")
    return found.group(1)


def prepare_sanity_home():
    """A HOME for ansible-test whose cache has our offline stand-in for get-pip.py.

    ansible-test would download get-pip.py from ci-files.testing.ansible.com, which is not a
    package registry; the stand-in (tests/sanity/get_pip.py) uses ensurepip and PyPI.
    """
    version = pip_version_ansible_test_bootstraps()
    cache = SANITY_HOME / ".ansible" / "test" / "cache"
    cache.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(GET_PIP_SHIM, cache / f"get_pip_{version.replace('.', '_')}.py")
    return SANITY_HOME


def gate_sanity(_args):
    with tempfile.TemporaryDirectory(prefix="stacksense-sanity-") as work:
        galaxy, artifact = build_artifact(work)
        collections = Path(work) / "collections"
        installed = collections / "ansible_collections" / galaxy["namespace"] / galaxy["name"]
        home = prepare_sanity_home()
        env = dict(os.environ, HOME=str(home), PATH=f"{BIN}{os.pathsep}{os.environ['PATH']}")
        result = run([BIN / "ansible-galaxy", "collection", "install", "--force", "-p",
                      collections, artifact], cwd=work, env=env, capture_output=True, text=True)
        if result.returncode or not (installed / "MANIFEST.json").is_file():
            fail(f"installing {artifact.name} failed:\n{result.stdout}{result.stderr}")
        # The artifact leaves tests/ out; ansible-test reads its ignore files from there.
        shutil.copytree(SANITY_IGNORES, installed / "tests" / "sanity",
                        ignore=shutil.ignore_patterns("*.py", "__pycache__"))
        result = run([BIN / "ansible-test", "sanity", "--venv", "--python", SANITY_PYTHON,
                      "--color", "no"], cwd=installed, env=env)
        return result.returncode


def gate_importer(_args):
    with tempfile.TemporaryDirectory(prefix="stacksense-importer-") as work:
        _galaxy, artifact = build_artifact(work)
        home = Path(work) / "home"
        home.mkdir()
        # A clean HOME: nothing of ours installed, no ansible.cfg of ours (cwd is the
        # scratch directory), the importer's config from the repository.
        env = dict(os.environ, HOME=str(home), GALAXY_IMPORTER_CONFIG=str(IMPORTER_CONFIG),
                   PATH=f"{BIN}{os.pathsep}{os.environ['PATH']}")
        env.pop("ANSIBLE_CONFIG", None)
        env.pop("ANSIBLE_COLLECTIONS_PATH", None)
        env.pop("ANSIBLE_ROLES_PATH", None)
        result = run([BIN / "python", "-m", "galaxy_importer.main", artifact], cwd=work,
                     env=env, capture_output=True, text=True)
        print(result.stdout + result.stderr, end="")
        findings = [line for line in result.stdout.splitlines()
                    if IMPORTER_FINDING.match(line)]
        if result.returncode or "Importer processing completed successfully" not in result.stdout:
            fail(f"galaxy-importer failed on {artifact.name} (exit {result.returncode})")
        if findings:
            fail(f"galaxy-importer reported {len(findings)} finding(s) on {artifact.name}")
        return 0


GATES = {"shellcheck": gate_shellcheck, "sanity": gate_sanity, "importer": gate_importer}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("gate", choices=sorted(GATES))
    args = parser.parse_args(argv)
    started = time.monotonic()
    status = GATES[args.gate](args)
    took = time.monotonic() - started
    print(f"gates: {args.gate} {'passed' if status == 0 else 'FAILED'} in {took:.0f} s",
          flush=True)
    return status


if __name__ == "__main__":
    sys.exit(main())
