"""Story 3, the subscription: charge at growing intervals, up to once every 3 days, for a week;
when the week is over, the SENDER queue tells the user the service is being disconnected.
A card that has expired skips the week: there is no point retrying it."""

from __future__ import annotations

from rare_celery import Hop, RareTask

from .app import app
from .gateways import PSP, Declined
from .settings import POLICIES


class ChargeCard(RareTask):
    name = "billing.charge"
    queue = "billing"
    retry_on = (Declined,)
    fallback = "billing.notify_disconnect"
    max_attempts = POLICIES["charge"]["max_attempts"]
    backoff = POLICIES["charge"]["backoff"]
    expires_in = POLICIES["charge"]["expires_in"]

    def run(self, subscription_id: str) -> str:
        result = PSP.charge(subscription_id, self.attempt)
        if result["card_expired"]:
            raise Hop("billing.notify_disconnect", subscription_id, reason="card expired")
        return f"charged {subscription_id}"


charge = app.register_task(ChargeCard())


@app.task(base=RareTask, name="billing.notify_disconnect", queue="billing.sender", **POLICIES["disconnect"])
def notify_disconnect(subscription_id: str) -> str:
    return f"told {subscription_id}: service disconnected"
