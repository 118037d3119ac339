"""The app for the chain/hop/delayed-start/handler tests: the seed's two stories, compressed.

Every run and every rare signal is appended to ``$RARE_TEST_DIR/events.jsonl``.
"""

from __future__ import annotations

import os

from celery import Celery
from kombu import Queue

from rare_celery import Bug, Hop, RareTask, backoff, signals
from tests.apps.core import EVENTS, record

QUEUES = ["chains.sms", "chains.email", "chains.push", "chains.billing", "chains.sender", "chains.loop",
          "chains.notify", "chains.later"]

app = Celery("chains", broker=os.environ["RARE_TEST_BROKER"],
             backend=f"tests.support:AtomicFS+file://{os.environ['RARE_TEST_DIR']}/results")
app.conf.update(task_queues=[Queue(q) for q in QUEUES], task_default_queue="chains.later",
                worker_hijack_root_logger=False, broker_connection_retry_on_startup=True)


def run(task, *args, **kwargs):
    headers = task.request.headers or {}
    record("run", task.request.id, task=task.name, attempt=headers.get("x-rare-attempt", 1),
           args=list(args), kwargs=kwargs, queue=(task.request.delivery_info or {}).get("routing_key"))


# -- the mailing: sms -> email -> push -> bug queue -----------------------------------------------

def channel(name: str, queue: str, fallback: str | None):
    @app.task(base=RareTask, bind=True, name=f"chains.{name}", queue=queue, max_attempts=2, backoff=0.2,
              fallback=fallback)
    def send(self, to: str, text: str, broken: list):
        run(self, to, text, broken)
        if name in broken:
            raise ConnectionError(f"{name} gateway down")
        return f"{name} sent to {to}"
    return send


send_sms = channel("sms", "chains.sms", "chains.email")
send_email = channel("email", "chains.email", "chains.push")
send_push = channel("push", "chains.push", None)


# -- the subscription: charge at growing intervals for a "week", then the SENDER queue -------------

@app.task(base=RareTask, bind=True, name="chains.notify_disconnect", queue="chains.sender", max_attempts=3,
          backoff=0.2)
def notify_disconnect(self, subscription_id, **kw):
    run(self, subscription_id, **kw)
    return f"disconnect notice for {subscription_id}"


class ChargeCard(RareTask):
    name = "chains.charge"
    queue = "chains.billing"
    backoff = backoff.exponential(0.1, cap=0.4)   # 0.1, 0.2, 0.4, 0.4, ... (production: 60 s .. 3 days)
    max_attempts = None
    expires_in = 1.45                             # production: timedelta(days=7)
    fallback = "chains.notify_disconnect"

    def run(self, subscription_id, card_expired=False):
        run(self, subscription_id, card_expired)
        if card_expired:
            raise Hop("chains.notify_disconnect", subscription_id, reason="card expired")
        raise ConnectionError("insufficient funds")


charge = app.register_task(ChargeCard())


# -- a loop: a -> b -> a ----------------------------------------------------------------------------

@app.task(base=RareTask, bind=True, name="chains.loop_a", queue="chains.loop")
def loop_a(self, n):
    run(self, n)
    self.hop("chains.loop_b", n + 1, reason="ping")


@app.task(base=RareTask, bind=True, name="chains.loop_b", queue="chains.loop")
def loop_b(self, n):
    run(self, n)
    raise Hop("chains.loop_a", n + 1, reason="pong")


# -- payload handlers ------------------------------------------------------------------------------

class Notify(RareTask):
    name = "chains.notify"
    queue = "chains.notify"
    dispatch_on = "kind"
    max_attempts = 4
    backoff = 0.2


@Notify.handler("sms", max_attempts=2, backoff=[0.3])
def notify_sms(payload):
    record("handler", payload["id"], channel="sms")
    if payload.get("fail"):
        raise ConnectionError("sms down")
    return f"sms to {payload['to']}"


@Notify.handler("email")
def notify_email(payload):
    record("handler", payload["id"], channel="email")
    if payload.get("bug"):
        raise Bug("no such mailbox")
    return f"email to {payload['to']}"


notify = app.register_task(Notify())


# -- delayed start ---------------------------------------------------------------------------------

@app.task(base=RareTask, bind=True, name="chains.later", queue="chains.later", max_attempts=2, backoff=0.2)
def later(self, label):
    run(self, label)
    return label


# -- rare signals, recorded; one receiver that raises must not matter ----------------------------

def _on(signal, **fields):
    def receiver(sender=None, request=None, **kw):
        record(f"signal.{signal.name}", request.id, task=sender.name,
               **{k: (repr(v) if k == "exception" else v) for k, v in kw.items() if k != "signal"})
    signal.connect(receiver, weak=False)


for _signal in (signals.retry_scheduled, signals.routed_to_bugs, signals.expired, signals.hopped):
    _on(_signal)


@signals.hopped.connect
def _broken_receiver(**kw):
    raise RuntimeError("a receiver that raises")


assert EVENTS
