"""Offline stand-in for get-pip.py, which ansible-test downloads from ci-files.testing.ansible.com.

ansible-test creates each sanity test's virtualenv without pip, then runs this file (cached
as ~/.ansible/test/cache/get_pip_<version>.py, where scripts/gates.py puts it) as
`python get_pip.py --disable-pip-version-check pip==<version> --no-setuptools --no-wheel`.
pip comes from the interpreter's own ensurepip instead, then pip installs the pinned pip from
PyPI (a package registry, the one network the gates use).
"""

import subprocess
import sys

GET_PIP_ONLY = ("--no-setuptools", "--no-wheel")


def main():
    pip_args = [arg for arg in sys.argv[1:] if arg not in GET_PIP_ONLY]
    python = sys.executable
    subprocess.run([python, "-m", "ensurepip", "--default-pip"], check=True,
                   stdout=subprocess.DEVNULL)
    subprocess.run([python, "-m", "pip", "install", "--quiet", *pip_args], check=True)
    if "--no-setuptools" in sys.argv:
        subprocess.run([python, "-m", "pip", "uninstall", "--quiet", "--yes", "setuptools"],
                       check=True)


if __name__ == "__main__":
    main()
