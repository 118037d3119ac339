"""Policies for the example app: production values, and compressed profiles for the demo and CI.

The task classes are the same in every profile; only these numbers change. Pick one with
``RARE_PROFILE=production|demo|ci`` (default ``production``).
"""

from __future__ import annotations

import os
from datetime import timedelta

from rare_celery import backoff

BROKER_URL = os.environ.get("RARE_BROKER_URL", "amqp://guest:guest@localhost:5672//")
PROFILE = os.environ.get("RARE_PROFILE", "production")

PRODUCTION = {
    # notify: try each channel a few times, quickly; then the next channel.
    "sms": {"max_attempts": 4, "backoff": backoff.exponential(10, cap=300)},
    "email": {"max_attempts": 5, "backoff": backoff.exponential(30, cap=600)},
    "push": {"max_attempts": 3, "backoff": [60, 300]},
    # translate: often at first, then less and less often, until it works or the text is stale.
    # and when it is plainly down, one probe at a time: after 5 failures in a row within a minute, no
    # request for 30 s, then one; each failed probe doubles the pause, up to 5 minutes.
    "translate": {"max_attempts": None, "expires_in": timedelta(hours=2),
                  "backoff": backoff.jitter(backoff.manual([5, 10, 20, 30, 60, 120, 300, 600]), 0.2),
                  "breaker_failures": 5, "breaker_within": 60, "breaker_open": 30, "breaker_max_open": 300},
    # billing: growing intervals up to once every 3 days, for a week; then the disconnect notice.
    "charge": {"max_attempts": None, "expires_in": timedelta(days=7),
               "backoff": backoff.exponential(timedelta(hours=1), cap=timedelta(days=3))},
    "disconnect": {"max_attempts": 10, "backoff": backoff.exponential(60, cap=3600)},
}

# The same shapes with seconds instead of minutes, hours and days (x 1/60 .. 1/86400).
DEMO = {
    "sms": {"max_attempts": 3, "backoff": backoff.exponential(0.5, cap=2)},
    "email": {"max_attempts": 3, "backoff": backoff.exponential(0.5, cap=2)},
    "push": {"max_attempts": 2, "backoff": [1]},
    "translate": {"max_attempts": None, "expires_in": timedelta(seconds=25),
                  "backoff": backoff.jitter(backoff.manual([0.5, 1, 2, 3, 4, 5]), 0.2),
                  "breaker_failures": 3, "breaker_within": 10, "breaker_open": 1, "breaker_max_open": 2},
    "charge": {"max_attempts": None, "expires_in": timedelta(seconds=12),
               "backoff": backoff.exponential(1, cap=4)},
    "disconnect": {"max_attempts": 3, "backoff": 0.5},
}

CI = {**DEMO,
      "translate": {**DEMO["translate"], "expires_in": timedelta(seconds=12)},
      "charge": {**DEMO["charge"], "expires_in": timedelta(seconds=6)}}

POLICIES = {"production": PRODUCTION, "demo": DEMO, "ci": CI}[PROFILE]

# The fake world the demo runs against (ignored in production, where gateways are real).
TRANSLATE_URL = os.environ.get("TRANSLATE_URL", "http://127.0.0.1:8765/v2/translate")
