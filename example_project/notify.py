"""Story 1, the mailing: an SMS that fails for good falls back to email, then to push.

One task per channel, chained by ``fallback``; the same arguments travel down the chain.
"""

from __future__ import annotations

from rare_celery import RareTask

from .app import app
from .gateways import EMAIL, PUSH, SMS, GatewayError
from .settings import POLICIES


@app.task(base=RareTask, bind=True, name="notify.sms", queue="notify.sms", retry_on=(GatewayError,),
          fallback="notify.email", **POLICIES["sms"])
def send_sms(self, user: dict, text: str) -> str:
    return SMS.send(user["phone"], text, self.attempt)


@app.task(base=RareTask, bind=True, name="notify.email", queue="notify.email", retry_on=(GatewayError,),
          fallback="notify.push", **POLICIES["email"])
def send_email(self, user: dict, text: str) -> str:
    return EMAIL.send(user["email"], text, self.attempt)


@app.task(base=RareTask, bind=True, name="notify.push", queue="notify.push", retry_on=(GatewayError,),
          **POLICIES["push"])
def send_push(self, user: dict, text: str) -> str:
    return PUSH.send(user["device"], text, self.attempt)   # the last channel: then the bug queue
