"""The decisions of playbooks/enroll.yml, run on the controller with the playbook's Python.

    stacksense_enroll.py plan   < {"dumpdata": TEXT, "hosts": [...], "rotate": [...],
                                   "vars_dir": DIR}
    stacksense_enroll.py save   < {"output": TEXT, "host": H, "server_id": N, "path": FILE,
                                   "vault_id": ID}
    stacksense_enroll.py check-vault < {"vault_id": ID}

`plan` reads what the StackSense server's `manage.py dumpdata core.Server
core.AgentCredential` printed (read-only; the server stores only a hash of each token) and the
inventory's hosts without a token, and decides per host (see decide()). `save` reads what
`manage.py create_agent_token <id>` printed, checks it names the expected server, and writes
the id and the token to a Vault-encrypted vars file (mode 0600, in a 0700 directory) with
`ansible-vault` and the operator's vault id. `check-vault` proves that encryption works before
anything is minted. Each prints one JSON object on standard output and exits 0 unless its
input is unusable (exit 2, one line on standard error); no token is ever printed.
"""

import json
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

VARS_FILE_NAME = "stacksense_vault.yml"
# upstream core/management/commands/create_agent_token.py prints these two lines (no colour
# when its output is not a terminal), then the token alone on an indented line.
MINTED_LINE = re.compile(
    r"(?P<verb>Created|Rotated) agent token for '(?P<name>.*)' \(id=(?P<id>[0-9]+)\)\.")
TOKEN_LINE = re.compile(r"[ ]{4}(?P<token>[A-Za-z0-9_-]{20,})")
EXIT_BAD_INPUT = 2

ROTATE_HINT = ("add it to stacksense_enroll_rotate_hosts to replace that token (the old one "
               "stops at once: only if no other agent, e.g. StackSense's own push agent, uses it)")


class EnrollError(ValueError):
    """Input that cannot be used: one line for the operator."""


def parse_dumpdata(text):
    """Servers from dumpdata's JSON: {id: {"id", "name", "credential": None or {...}}}."""
    try:
        records = json.loads(text)
    except ValueError:
        raise EnrollError("manage.py dumpdata did not print JSON: "
                          + (text.strip().splitlines() or ["(nothing)"])[-1][:200]) from None
    if not isinstance(records, list):
        raise EnrollError("manage.py dumpdata printed JSON that is not a list of records")
    servers, credentials = {}, {}
    for record in records:
        model, fields = record.get("model"), record.get("fields") or {}
        if model == "core.server":
            servers[record["pk"]] = {"id": record["pk"], "name": fields.get("name")}
        elif model == "core.agentcredential":
            credentials[fields.get("server")] = {
                "enabled": fields.get("enabled", True),
                "last_used_at": fields.get("last_used_at"),
                "last_used_ip": fields.get("last_used_ip")}
    for server_id, server in servers.items():
        server["credential"] = credentials.get(server_id)
    return servers


def _credential_phrase(credential):
    if credential["last_used_at"]:
        used = f"last used {credential['last_used_at']}"
        if credential["last_used_ip"]:
            used += f" from {credential['last_used_ip']}"
    else:
        used = "never used"
    return ("an agent token" if credential["enabled"] else "a disabled agent token") \
        + f" ({used})"


def decide(host, servers, rotate, vars_dir):
    """What to do for one inventory host without a token.

    host: {"host", "name" (its server's name in StackSense), "server_id" (the inventory's
    stacksense_server_id as text, "" when not set)}.
    Returns {"host", "action", "server_id", "name", "message"}, action one of:
      mint     its server exists and has no token: create one
      rotate   its server has a token and the host is in `rotate`: replace it
      leave    its server has a token (maybe StackSense's push agent's): left alone
      missing  no server of that name: the operator adds it in the dashboard
      conflict several servers of that name, an id that does not match, or a vars file
               that already exists
    """
    name, given_id = host["name"], str(host.get("server_id") or "")
    result = {"host": host["host"], "name": name, "server_id": None}
    if given_id and not re.fullmatch(r"[0-9]+", given_id):
        return dict(result, action="conflict", message=f"{host['host']}: stacksense_server_id "
                    f"{json.dumps(given_id)} is not a number: fix it or remove it")
    wanted_id = int(given_id) if given_id else None
    named = sorted(s["id"] for s in servers.values() if s["name"] == name)
    path = Path(vars_dir) / host["host"] / VARS_FILE_NAME

    def outcome(action, message, server_id=None):
        return dict(result, action=action, server_id=server_id,
                    message=f"{host['host']}: {message}")

    if wanted_id is not None and wanted_id not in named:
        if not named:
            return outcome("conflict", f"stacksense_server_id is {wanted_id}, but the server "
                           f"has no server named '{name}': fix stacksense_server_id or "
                           f"stacksense_enroll_name")
        return outcome("conflict", f"stacksense_server_id is {wanted_id}, but the server named "
                       f"'{name}' has id {', '.join(map(str, named))}: fix one of them")
    if not named:
        return outcome("missing", f"the StackSense server has no server named '{name}': add it "
                       "in the dashboard (Add server (agent): it checks your licence's server "
                       "cap) with that name, then run enroll again with it in "
                       "stacksense_enroll_rotate_hosts (the form already made it a token)")
    if wanted_id is None and len(named) > 1:
        return outcome("conflict", f"{len(named)} servers are named '{name}' (ids "
                       f"{', '.join(map(str, named))}): set this host's stacksense_server_id")
    server = servers[wanted_id if wanted_id is not None else named[0]]
    if path.exists():
        return outcome("conflict", f"{path} exists but gives this host no stacksense_api_token: "
                       "move it away or put the token in it", server["id"])
    if server["credential"] is None:
        return outcome("mint", f"server '{name}' (id {server['id']}) has no agent token: "
                       "creating one", server["id"])
    phrase = _credential_phrase(server["credential"])
    if host["host"] in rotate:
        return outcome("rotate", f"server '{name}' (id {server['id']}) has {phrase}: "
                       "replacing it (stacksense_enroll_rotate_hosts)", server["id"])
    return outcome("leave", f"server '{name}' (id {server['id']}) already has {phrase}: left "
                   f"alone; {ROTATE_HINT}", server["id"])


def plan(request):
    """decide() for each host of the request; hosts in the order given."""
    servers = parse_dumpdata(request["dumpdata"])
    rotate = set(request.get("rotate") or [])
    unknown = sorted(rotate - set(request.get("all_hosts") or []))
    if unknown:
        raise EnrollError("stacksense_enroll_rotate_hosts names hosts that are not in the "
                          f"group stacksense_agents: {', '.join(unknown)}")
    decisions = [decide(host, servers, rotate, request["vars_dir"]) for host in request["hosts"]]
    return {"hosts": decisions,
            "to_mint": [d for d in decisions if d["action"] in ("mint", "rotate")],
            "attention": [d["message"] for d in decisions
                          if d["action"] in ("leave", "missing", "conflict")]}


def parse_minted(output, server_id):
    """(token, rotated) from create_agent_token's output, which must name server_id."""
    minted = MINTED_LINE.search(output)
    if minted is None:
        raise EnrollError("manage.py create_agent_token printed no 'Created/Rotated agent "
                          "token for ...' line: is this the StackSense server's checkout?")
    if int(minted.group("id")) != server_id:
        raise EnrollError(f"manage.py create_agent_token minted a token for id "
                          f"{minted.group('id')}, not for id {server_id}")
    tokens = [m.group("token") for m in map(TOKEN_LINE.fullmatch, output.splitlines()) if m]
    if len(tokens) != 1:
        raise EnrollError("manage.py create_agent_token's output holds no single token line")
    return tokens[0], minted.group("verb") == "Rotated"


def vars_file_text(host, server_id, token):
    return (f"# Written by playbooks/enroll.yml: {host}'s StackSense server id and agent "
            "token.\n"
            f"stacksense_server_id: {server_id}\n"
            f"stacksense_api_token: {json.dumps(token)}\n")


def vault_command(vault_id, *args):
    """ansible-vault next to this Python (the controller's Ansible), with the vault id."""
    sibling = Path(sys.executable).parent / "ansible-vault"
    command = [str(sibling) if sibling.exists() else "ansible-vault", *args]
    if vault_id:
        command += ["--vault-id", vault_id, "--encrypt-vault-id", vault_id.split("@")[0]]
    return command


def encrypt(text, vault_id, run=subprocess.run):
    """Vault-encrypted text, or EnrollError with ansible-vault's own last line."""
    result = run(vault_command(vault_id, "encrypt", "--output", "-", "-"), input=text,
                 capture_output=True, text=True, check=False)
    if result.returncode != 0 or not result.stdout.startswith("$ANSIBLE_VAULT;"):
        last = (result.stderr.strip().splitlines() or ["no output"])[-1]
        raise EnrollError(f"ansible-vault cannot encrypt ({last}): give your vault password "
                          "as usual (vault_password_file / vault_identity_list in ansible.cfg, "
                          "ANSIBLE_VAULT_PASSWORD_FILE) or set stacksense_enroll_vault_id")
    return result.stdout


def write_private(path, text):
    """Write text to path, mode 0600, its directory 0700 if it makes it; atomically."""
    path = Path(path)
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(dir=str(path.parent), prefix=".enroll-")
    try:
        with os.fdopen(handle, "w") as stream:
            stream.write(text)
        os.chmod(temporary, 0o600)
        os.replace(temporary, path)
    except BaseException:
        if os.path.exists(temporary):
            os.unlink(temporary)
        raise


def save(request, run=subprocess.run):
    """Parse a minted token and write the host's vault file; never returns the token."""
    token, rotated = parse_minted(request["output"], request["server_id"])
    text = encrypt(vars_file_text(request["host"], request["server_id"], token),
                   request.get("vault_id") or "", run=run)
    write_private(request["path"], text)
    return {"host": request["host"], "server_id": request["server_id"], "rotated": rotated,
            "path": request["path"],
            "message": f"{request['host']}: server id {request['server_id']} and its "
                       f"{'replaced' if rotated else 'new'} token written to {request['path']} "
                       "(Vault-encrypted)"}


def check_vault(request, run=subprocess.run):
    encrypt("check: true\n", request.get("vault_id") or "", run=run)
    return {"vault": "ok"}


COMMANDS = {"plan": plan, "save": save, "check-vault": check_vault}


def main(argv=None, stdin=sys.stdin, stdout=sys.stdout, stderr=sys.stderr):
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1 or argv[0] not in COMMANDS:
        print(f"usage: stacksense_enroll.py {{{','.join(COMMANDS)}}} < request.json",
              file=stderr)
        return EXIT_BAD_INPUT
    try:
        request = json.loads(stdin.read())
        answer = COMMANDS[argv[0]](request)
    except EnrollError as exc:
        print(f"enroll: {exc}", file=stderr)
        return EXIT_BAD_INPUT
    except (ValueError, KeyError, TypeError) as exc:
        print(f"enroll: unusable request for {argv[0]}: {exc!r}", file=stderr)
        return EXIT_BAD_INPUT
    json.dump(answer, stdout)
    stdout.write("\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
