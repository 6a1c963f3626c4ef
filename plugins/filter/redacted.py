"""Values as preflight's messages show them: a URL's user:password@ hidden.

A message must name the value that is wrong, yet never show a password: the server URL is
shown without its user:password@, a proxy URL without what precedes its last @, and a proxy
value that looks like user:password without @ not at all.
"""

import re

DOCUMENTATION = r"""
name: redacted
short_description: A URL as a message may show it, without credentials
description:
  - C(kind=url), the server URL with C(user:password@) as C(***@);
  - C(kind=proxy), a proxy URL with what precedes the last C(@) hidden, and a value that looks
    like C(user:password) without C(@) hidden whole.
positional: _input, kind
options:
  _input:
    description: The value.
    type: raw
    required: true
  kind:
    description: C(url) or C(proxy).
    type: str
    default: url
version_added: 1.2.0
author: StackSense
"""

EXAMPLES = r"""
shown: "{{ stacksense_https_proxy | stacksense.fleet.redacted('proxy') }}"
"""

RETURN = r"""
_value:
  description: The value to show.
  type: str
"""

URL_CREDENTIALS = re.compile(r"\A([^/?#]*//)[^/?#]*@")
PROXY_CREDENTIALS = re.compile(r"(?s)^([A-Za-z][A-Za-z0-9+.-]*://)?.*@")
PASSWORD_WITHOUT_AT = re.compile(r"://[^/]*:[^/]*[^0-9/]")


def redacted(value, kind="url"):
    text = "" if value is None else str(value)
    if kind == "url":
        return URL_CREDENTIALS.sub(r"\1***@", text)
    if "@" in text:
        return PROXY_CREDENTIALS.sub(lambda m: (m.group(1) or "") + "<credentials hidden>@", text)
    return "<hidden: it may hold a password>" if PASSWORD_WITHOUT_AT.search(text) else text


class FilterModule:
    def filters(self):
        return {"redacted": redacted}
