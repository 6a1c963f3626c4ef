#!/usr/bin/env python3
"""Set the receiver's injected fault and print, as JSON, the UTC times just before and after.

    set_fault.py http://127.0.0.1:18187 500    # heartbeat endpoints answer 500
    set_fault.py http://127.0.0.1:18187 null   # back to normal

The times have the receiver's format (ISO 8601, milliseconds, +00:00), so they compare with
its records as strings and parse with the same format.
"""

import json
import sys
import urllib.request
from datetime import datetime, timezone


def utc_now():
    return datetime.now(timezone.utc).isoformat(timespec="milliseconds")


def main(base_url, status):
    body = json.dumps({"status": None if status == "null" else int(status)}).encode()
    request = urllib.request.Request(base_url + "/_receiver/fault", data=body, method="PUT",
                                     headers={"Content-Type": "application/json"})
    before = utc_now()
    with urllib.request.urlopen(request, timeout=5) as response:
        answer = json.load(response)
    after = utc_now()
    print(json.dumps({"before": before, "after": after, "answer": answer}))


if __name__ == "__main__":
    main(*sys.argv[1:])
