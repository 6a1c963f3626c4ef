"""The local fleet demo's views: scripts/fleet_status.py and the receiver's HTML page.

The fast tests run with the unit tests. test_demo_page_in_chromium needs a running
demo and Debian's chromium: `make demo-check` (scripts/demo.sh check) brings the demo up,
runs it with DEMO_URL and DEMO_EXPECT_HOSTS set, and tears the demo down.
"""

import html.parser
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import pytest
from conftest import load_module

ROOT = Path(__file__).resolve().parent.parent
COLUMNS = ["ID", "Name", "Agent version", "Last heartbeat", "State"]
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu",
                  "--disable-background-networking", "--disable-component-update",
                  "--disable-sync", "--no-first-run"]


receiver = load_module("stacksense_receiver", "receiver/stacksense_receiver.py")
fleet_status = load_module("fleet_status", "scripts/fleet_status.py")


class TableParser(html.parser.HTMLParser):
    """Collects the text of every <th>/<td> cell, row by row."""

    def __init__(self):
        super().__init__()
        self.rows, self._row, self._cell = [], None, None

    def handle_starttag(self, tag, attrs):
        if tag == "tr":
            self._row = []
        elif tag in ("td", "th") and self._row is not None:
            self._cell = []

    def handle_endtag(self, tag):
        if tag in ("td", "th") and self._cell is not None:
            self._row.append("".join(self._cell).strip())
            self._cell = None
        elif tag == "tr" and self._row is not None:
            self.rows.append(self._row)
            self._row = None

    def handle_data(self, data):
        if self._cell is not None:
            self._cell.append(data)


def parse_status_page(text):
    """The page's table as (header, [{column: text}]); fails on a missing column."""
    parser = TableParser()
    parser.feed(text)
    assert parser.rows, "no table rows in the page"
    header = parser.rows[0]
    assert header == COLUMNS, f"status page columns are {header}, expected {COLUMNS}"
    return header, [dict(zip(header, row)) for row in parser.rows[1:]]


class FakeClock:
    def __init__(self):
        self.now = 1_800_000_000.0

    def __call__(self):
        return self.now


@pytest.fixture
def fleet():
    """A receiver on loopback with demo-1..3, a fake clock and a heartbeat helper."""
    clock = FakeClock()
    servers = [{"id": i, "name": f"demo-{i}"} for i in (1, 2, 3)]
    server = receiver.make_server(servers, offline_after=30, clock=clock)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()

    def beat(server_id, version="1.0.0"):
        server.store.add_heartbeat(server_id, version, "127.0.0.1", "legacy")

    yield server, clock, beat
    server.shutdown()
    server.server_close()


def test_status_page_shows_id_name_version_age_and_state(fleet):
    server, clock, beat = fleet
    beat(1)
    beat(2, "0.9.0")
    clock.now += 40
    beat(1)
    clock.now += 3
    _, rows = parse_status_page(receiver.render_status_page(server.store.status()))
    assert rows == [
        {"ID": "1", "Name": "demo-1", "Agent version": "1.0.0",
         "Last heartbeat": "3 s ago", "State": "online"},
        {"ID": "2", "Name": "demo-2", "Agent version": "0.9.0",
         "Last heartbeat": "43 s ago", "State": "offline"},
        {"ID": "3", "Name": "demo-3", "Agent version": "-",
         "Last heartbeat": "never", "State": "offline"},
    ]


def test_fleet_status_table_from_the_receiver(fleet):
    server, clock, beat = fleet
    beat(1)
    clock.now += 75
    beat(2)
    clock.now += 2
    lines = fleet_status.format_table(fleet_status.fetch_status(server.url))
    assert lines[0].split() == ["ID", "NAME", "AGENT", "LAST", "HEARTBEAT", "STATE"]
    assert lines[1].split() == ["1", "demo-1", "1.0.0", "1", "min", "17", "s", "ago", "OFFLINE"]
    assert lines[2].split() == ["2", "demo-2", "1.0.0", "2", "s", "ago", "online"]
    assert lines[3].split() == ["3", "demo-3", "-", "never", "OFFLINE"]
    assert lines[-1].startswith("1/3 online; a server is offline after 30 s")


def test_fleet_status_wait_online_for_one_server(fleet, capsys):
    server, _, beat = fleet
    beat(2)
    assert fleet_status.main([server.url, "--wait-online", "0", "--server", "demo-2"]) == 0
    assert fleet_status.main([server.url, "--wait-online", "0"]) == 1
    assert "not all online after 0 s" in capsys.readouterr().err


def test_fleet_status_once_reports_an_unreachable_receiver(capsys):
    assert fleet_status.main(["http://127.0.0.1:9", "--once"]) == 1
    assert "cannot read http://127.0.0.1:9/api/status/" in capsys.readouterr().err


def test_fleet_status_is_standard_library_only():
    result = subprocess.run([sys.executable, "-I", str(ROOT / "scripts" / "fleet_status.py"),
                             "--help"], capture_output=True, text=True, timeout=30, check=False)
    assert result.returncode == 0, result.stderr
    assert "--wait-online" in result.stdout


def dump_dom(url):
    """The page as headless chromium renders it (--dump-dom), with a fresh profile."""
    chromium = shutil.which("chromium")
    assert chromium, "chromium is not installed: apt-get install chromium"
    with tempfile.TemporaryDirectory(prefix="demo-chromium-") as profile:
        result = subprocess.run(
            [chromium, *CHROMIUM_FLAGS, f"--user-data-dir={profile}", "--dump-dom", url],
            capture_output=True, text=True, timeout=120, check=False)
    assert result.returncode == 0, f"chromium failed ({result.returncode}): {result.stderr}"
    return result.stdout


@pytest.mark.skipif(not os.environ.get("DEMO_URL"),
                    reason="needs a running demo: make demo-check")
def test_demo_page_in_chromium():
    url = os.environ["DEMO_URL"].rstrip("/") + "/"
    expected = os.environ.get("DEMO_EXPECT_HOSTS", "").split()
    assert expected, "DEMO_EXPECT_HOSTS lists no host"
    # Every host should be online right after the deploy (the role waits for each
    # agent's first accepted heartbeat); allow a few page loads for a slow machine.
    for attempt in range(4):
        if attempt:
            time.sleep(5)
        _, rows = parse_status_page(dump_dom(url))
        states = {row["Name"]: row for row in rows}
        missing = [host for host in expected if host not in states]
        offline = [host for host in expected
                   if host in states and states[host]["State"] != "online"]
        if not missing and not offline:
            break
    assert not missing, f"hosts missing from {url}: {missing} (page rows: {rows})"
    assert not offline, f"hosts not online on {url}: {offline} (page rows: {rows})"
    for host in expected:
        row = states[host]
        assert row["ID"] == host.rsplit("-", 1)[1], row
        assert row["Agent version"] not in ("", "-"), row
        assert row["Last heartbeat"].endswith(" s ago"), row
    print(f"chromium sees {len(expected)} host(s) online on {url}:")
    for host in expected:
        print("  " + " | ".join(states[host][column] for column in COLUMNS))
