"""Story 2, the flaky translation API (down for minutes at a time): ask often at first, then less
and less often, until it answers or the text is too old to be worth translating.

Each attempt is one HTTP request; nothing waits in the worker between attempts, so there are
never more requests in flight than tasks. All translations share one circuit breaker, ``deepl``:
once the service has failed several times in a row, no task sends it a request until one probe
finds it answering again (the others wait in the broker meanwhile, without spending attempts).
"""

from __future__ import annotations

import json
import urllib.error
import urllib.request

from rare_celery import Bug, RareTask

from .app import app
from .settings import POLICIES, TRANSLATE_URL


class Unavailable(Exception):
    """The translation service is down (HTTP 5xx, refused or timed out): retry later."""


@app.task(base=RareTask, name="translate.text", queue="translate", retry_on=(Unavailable,), breaker="deepl",
          **POLICIES["translate"])
def translate(text: str, target_lang: str) -> str:
    request = urllib.request.Request(
        TRANSLATE_URL, data=json.dumps({"text": [text], "target_lang": target_lang}).encode(),
        headers={"Content-Type": "application/json"}, method="POST")
    try:
        with urllib.request.urlopen(request, timeout=5) as response:
            return json.load(response)["translations"][0]["text"]
    except urllib.error.HTTPError as exc:
        if exc.code >= 500 or exc.code == 429:
            raise Unavailable(f"translation service answered {exc.code}") from None
        raise Bug(f"translation service refused the request: {exc.code} {exc.reason}") from None
    except (urllib.error.URLError, TimeoutError) as exc:
        raise Unavailable(f"translation service unreachable: {exc}") from None
