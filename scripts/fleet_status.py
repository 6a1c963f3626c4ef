#!/usr/bin/env python3
"""Show the fleet as the StackSense reference receiver sees it.

Reads GET <URL>/api/status/ and prints one line per server: id, name, agent
version, age of the last heartbeat and online/offline. By default the view
refreshes every 2 s until Ctrl-C.

Usage:
  scripts/fleet_status.py http://127.0.0.1:8480                 # watch
  scripts/fleet_status.py http://127.0.0.1:8480 --once          # print once
  scripts/fleet_status.py http://127.0.0.1:8480 --wait-online 60 [--server demo-2]
      wait until every (or the named) server is online; exit 1 after 60 s

Exit status: 0 ok, 1 not online in time / receiver unreachable with --once,
2 usage error. Standard library only.
"""

import argparse
import datetime
import json
import os
import sys
import time
import urllib.request

CLEAR_SCREEN = "\033[H\033[2J"
COLUMNS = (("ID", 4), ("NAME", 14), ("AGENT", 8), ("LAST HEARTBEAT", 16), ("STATE", 7))


def fetch_status(base_url, timeout=5.0):
    """GET /api/status/ of the receiver at base_url; return the decoded JSON."""
    url = base_url.rstrip("/") + "/api/status/"
    with urllib.request.urlopen(url, timeout=timeout) as response:
        return json.loads(response.read().decode("utf-8"))


def describe_age(seconds):
    """'never', '3 s ago', '2 min 5 s ago' for a heartbeat age in seconds."""
    if seconds is None:
        return "never"
    seconds = round(seconds)
    if seconds < 60:
        return f"{seconds} s ago"
    return f"{seconds // 60} min {seconds % 60} s ago"


def format_table(status):
    """The status as an aligned text table (list of lines), with a summary line."""
    servers = status.get("servers", [])
    lines = ["  ".join(title.ljust(width) for title, width in COLUMNS).rstrip()]
    for server in servers:
        cells = (str(server["id"]), server["name"], server.get("agent_version") or "-",
                 describe_age(server.get("seconds_since_heartbeat")),
                 "online" if server.get("online") else "OFFLINE")
        lines.append("  ".join(cell.ljust(width) for cell, (_, width) in zip(cells, COLUMNS))
                     .rstrip())
    online = sum(1 for server in servers if server.get("online"))
    lines.append("")
    lines.append(f"{online}/{len(servers)} online; a server is offline after "
                 f"{status.get('offline_after_s', '?')} s without a heartbeat")
    return lines


def select(servers, names):
    """The servers whose name or id is in names (all servers if names is empty)."""
    if not names:
        return servers
    return [s for s in servers if s["name"] in names or str(s["id"]) in names]


def watch(url, interval):
    """Redraw the table every `interval` seconds until Ctrl-C."""
    clear = CLEAR_SCREEN if sys.stdout.isatty() else ""
    while True:
        stamp = datetime.datetime.now().strftime("%H:%M:%S")
        try:
            body = format_table(fetch_status(url))
        except (OSError, ValueError) as exc:
            body = [f"cannot read {url}/api/status/: {exc}", "(is the demo up? make demo)"]
        header = f"StackSense fleet at {url}  {stamp}  (every {interval:g} s, Ctrl-C to stop)"
        sys.stdout.write(clear + "\n".join([header, "", *body]) + "\n\n")
        sys.stdout.flush()
        time.sleep(interval)


def wait_online(url, timeout, names):
    """Poll until the selected servers are all online; return the exit status."""
    deadline = time.monotonic() + timeout
    status, error = None, None
    while True:
        try:
            status, error = fetch_status(url), None
            servers = select(status["servers"], names)
            if servers and all(s["online"] for s in servers):
                print("\n".join(format_table(status)))
                return 0
        except (OSError, ValueError) as exc:
            error = exc
        if time.monotonic() >= deadline:
            break
        time.sleep(1)
    if error is not None:
        print(f"fleet_status: cannot read {url}/api/status/: {error}", file=sys.stderr)
    else:
        print("\n".join(format_table(status)))
        if not select(status["servers"], names):
            print(f"fleet_status: no server named {', '.join(names)}", file=sys.stderr)
        print(f"fleet_status: not all online after {timeout:g} s", file=sys.stderr)
    return 1


def main(argv=None):
    parser = argparse.ArgumentParser(
        description="Show the servers of a StackSense reference receiver (GET /api/status/).")
    parser.add_argument("url", nargs="?", default=os.environ.get("DEMO_URL",
                                                                 "http://127.0.0.1:8480"),
                        help="base URL of the receiver (default: $DEMO_URL or %(default)s)")
    parser.add_argument("--interval", type=float, default=2.0,
                        help="seconds between refreshes (default %(default)g)")
    parser.add_argument("--once", action="store_true", help="print the table once and exit")
    parser.add_argument("--wait-online", type=float, metavar="SECONDS",
                        help="wait until the servers are online; exit 1 if not in time")
    parser.add_argument("--server", action="append", default=[], metavar="NAME_OR_ID",
                        help="with --wait-online: only these servers (repeatable)")
    args = parser.parse_args(argv)
    url = args.url.rstrip("/")
    if args.interval <= 0:
        parser.error("--interval must be positive")
    try:
        if args.wait_online is not None:
            return wait_online(url, args.wait_online, args.server)
        if args.once:
            try:
                print("\n".join(format_table(fetch_status(url))))
            except (OSError, ValueError) as exc:
                print(f"fleet_status: cannot read {url}/api/status/: {exc}", file=sys.stderr)
                return 1
            return 0
        watch(url, args.interval)
    except KeyboardInterrupt:
        print()
    return 0


if __name__ == "__main__":
    sys.exit(main())
