#!/usr/bin/env python3
"""One-shot HTTP server for the smoke scenario's verify step.

Runs on the Molecule host, answers GETs until it has seen one from every
container (or a deadline passes), then prints the paths it was asked for.
Usage: host_http_probe.py PORT EXPECTED_REQUESTS [DEADLINE_SECONDS]
"""
import http.server
import sys
import time

port, expected = int(sys.argv[1]), int(sys.argv[2])
deadline = time.monotonic() + (float(sys.argv[3]) if len(sys.argv) > 3 else 90)
seen = []


class Handler(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        seen.append(self.path)
        body = b"stacksense-smoke\n"
        self.send_response(200)
        self.send_header("Content-Type", "text/plain")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


server = http.server.HTTPServer(("0.0.0.0", port), Handler)
server.timeout = 1
while len(seen) < expected and time.monotonic() < deadline:
    server.handle_request()
server.server_close()
print("\n".join(sorted(seen)))
sys.exit(0 if len(seen) >= expected else 1)
