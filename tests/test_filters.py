"""The collection's filter plugins (plugins/filter/), called as plain functions."""

from conftest import load_filters

host_probe = load_filters("host_probe")["host_probe"]

PROBE = [
    "pid1=systemd",
    "systemd=252 (252.39-1~deb12u1)",
    "os=debian ",
    "os_name=Debian GNU/Linux 12 (bookworm)",
    "container=podman",
    "propagation=shared",
    "apt_lists=4",
    "exists=/etc/systemd/system/stacksense-heartbeat.service",
    "exists=/etc/stacksense-heartbeat/api_token",
    "dir=/opt/stacksense-heartbeat 755 root:root",
    "dir=/etc/stacksense-heartbeat 700 root:root",
    "kept=/opt/stacksense-heartbeat/heartbeat_agent.py",
    "dpkg=python3 ii ",
    "dpkg=python3-requests un ",
    "dpkg=cron ii ",
]


def test_the_probe_gives_the_facts_with_values_that_hold_spaces_and_equal_signs():
    facts = host_probe([*PROBE, "os_name=Odd = Name"])["facts"]
    assert facts["pid1"] == "systemd"
    assert facts["systemd"] == "252 (252.39-1~deb12u1)"
    assert facts["os"].split() == ["debian"]
    assert facts["os_name"] == "Odd = Name"  # the last line of a name wins
    assert facts["apt_lists"] == "4"
    assert not {"exists", "dir", "kept", "dpkg"} & set(facts)


def test_the_probe_lists_the_files_dirs_and_kept_copies_it_found():
    probe = host_probe(PROBE)
    assert probe["files"] == ["/etc/systemd/system/stacksense-heartbeat.service",
                              "/etc/stacksense-heartbeat/api_token"]
    assert probe["dirs"] == {"/opt/stacksense-heartbeat": "755 root:root",
                             "/etc/stacksense-heartbeat": "700 root:root"}
    assert probe["kept"] == ["/opt/stacksense-heartbeat/heartbeat_agent.py"]


def test_only_packages_dpkg_reports_installed_count_as_installed():
    assert host_probe(PROBE)["packages"] == ["python3", "cron"]


def test_an_empty_or_missing_answer_gives_empty_facts_and_lists():
    for answer in (None, [], ["", "garbage", "Upper=case"]):
        assert host_probe(answer) == {"facts": {}, "files": [], "dirs": {}, "kept": [],
                                      "packages": []}
