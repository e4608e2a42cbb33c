"""``linechatd publish``: a message from the operator's shell, through the server API.

Reads the HTTP url and the server key from an instance's TOML file (or takes
them as flags), POSTs ``/api/publish`` and prints the answer. Exit codes: 0
published (every record durable), 1 not published in time (503: run it again
with the same ``--id``; recipients drop copies), 2 refused (bad input, key).
"""

from __future__ import annotations

import json
import secrets
import sys
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any, TextIO

from .admin import AdminError
from .serverapi import ServerKeyError, load_server_key

HTTP_TIMEOUT_S = 15.0


def publish_command(
    *,
    url: str,
    key_file: Path,
    to: list[str],
    body: str,
    msg_id: str | None,
    from_name: str | None,
    as_json: bool,
    out: TextIO = sys.stdout,
) -> int:
    try:
        key = load_server_key(key_file)
    except (OSError, ServerKeyError) as exc:
        raise AdminError(f"server_api.key_file: {exc}") from None
    try:
        parsed_body: Any = json.loads(body)
    except ValueError as exc:
        raise AdminError(f"--body must be JSON: {exc}") from None
    request_doc: dict[str, Any] = {
        "to": to,
        "id": msg_id or f"cli-{secrets.token_hex(8)}",
        "body": parsed_body,
    }
    if from_name:
        request_doc["from"] = from_name
    request = urllib.request.Request(
        url.rstrip("/") + "/api/publish",
        data=json.dumps(request_doc).encode(),
        method="POST",
        headers={"Authorization": f"Bearer {key.decode()}", "Content-Type": "application/json"},
    )
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    try:
        with opener.open(request, timeout=HTTP_TIMEOUT_S) as response:
            status, answer = response.status, json.loads(response.read() or b"null")
    except urllib.error.HTTPError as exc:
        status = exc.code
        try:
            answer = json.loads(exc.read() or b"null")
        except ValueError:
            answer = None
    except OSError as exc:
        raise AdminError(f"{url}: {exc}") from None
    if as_json:
        json.dump({"status": status, "response": answer}, out)
        print(file=out)
    elif status == 200:
        partitions = ", ".join(f"{a['partition']}/{a['offset']}" for a in answer["acks"])
        print(f"published {answer['id']} to {len(to)} (partition/offset {partitions})", file=out)
    else:
        print(f"not published: HTTP {status}: {answer}", file=sys.stderr)
    if status == 200:
        return 0
    return 1 if status >= 500 else 2
