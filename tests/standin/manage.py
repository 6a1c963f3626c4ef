"""Stand-in for the StackSense server's `manage.py`, for tests of playbooks/enroll.yml.

THIS IS NOT THE STACKSENSE SERVER. It answers the two commands enroll.yml runs with the
arguments, output and exit codes of the real ones (upstream Praveenamin/stacksense at
996e90c), backed by the reference receiver's servers and tokens
(receiver/stacksense_receiver.py, its /_receiver/servers endpoints), so that a token it mints
really works for heartbeats and a rotated one stops at once:

  manage.py dumpdata core.Server core.AgentCredential
      Django's dumpdata JSON: one core.server record per server (pk, name, ...) and one
      core.agentcredential per server holding a token (its SHA-256, never the token).
  manage.py create_agent_token <id|exact name>
      upstream core/management/commands/create_agent_token.py: "Created agent token for
      'NAME' (id=N)." (or "Rotated ... The previous token no longer works."), the token once
      on its own indented line; "CommandError: No server found matching ..." and exit 1.

The receiver's URL comes from the environment: STACKSENSE_STANDIN_RECEIVER.
"""

import json
import os
import sys
import urllib.error
import urllib.request


def receiver(path, method="GET"):
    url = os.environ["STACKSENSE_STANDIN_RECEIVER"].rstrip("/") + path
    request = urllib.request.Request(url, method=method)
    with urllib.request.urlopen(request, timeout=10) as response:
        return json.load(response)


def dumpdata(models):
    servers = receiver("/_receiver/servers")
    records = []
    if "core.Server" in models:
        records += [{"model": "core.server", "pk": s["id"], "fields": {
            "name": s["name"], "ip_address": "127.0.0.1", "username": "agent",
            "suppress_alerts": False, "suspend_monitoring": False, "os_type": "linux",
            "os_version": ""}} for s in servers]
    if "core.AgentCredential" in models:
        records += [{"model": "core.agentcredential", "pk": s["id"], "fields": {
            "server": s["id"], "token_hash": s["credential"]["token_hash"],
            "token_prefix": s["credential"]["token_prefix"], "enabled": True,
            "created_at": "2026-01-01T00:00:00Z", "last_used_at": None, "last_used_ip": None}}
            for s in servers if s["credential"]]
    print(json.dumps(records))
    return 0


def create_agent_token(ident):
    ident = ident.strip()
    servers = receiver("/_receiver/servers")
    server = next((s for s in servers if ident.isdigit() and s["id"] == int(ident)), None) \
        or next((s for s in servers if s["name"] == ident), None)
    if server is None:
        print(f"CommandError: No server found matching '{ident}' (tried id and exact name).",
              file=sys.stderr)
        return 1
    minted = receiver(f"/_receiver/servers/{server['id']}/token", method="POST")
    if minted["rotated"]:
        headline = (f"Rotated agent token for '{minted['name']}' (id={minted['id']}). "
                    "The previous token no longer works.")
    else:
        headline = f"Created agent token for '{minted['name']}' (id={minted['id']})."
    print(f"\n{headline}\n\n  Save this token now -- it will not be shown again:\n\n"
          f"    {minted['token']}\n\n  (token prefix on record: {minted['token'][:8]}...)\n")
    return 0


def main(argv):
    if len(argv) >= 2 and argv[0] == "dumpdata":
        return dumpdata(argv[1:])
    if len(argv) == 2 and argv[0] == "create_agent_token":
        return create_agent_token(argv[1])
    print(f"stand-in manage.py: unsupported command {argv!r}", file=sys.stderr)
    return 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
