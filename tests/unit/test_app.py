"""What rare_celery refuses in an app's configuration, and how it folds Celery's expires (no broker)."""

from __future__ import annotations

import pytest
from celery import Celery
from kombu import Queue

from rare_celery.app import check, fold_expires, pickles
from rare_celery.exceptions import ConfigurationError
from rare_celery.topology import CLASSIC, QUORUM, bug_queue, delay_kind, for_broker, own_kind


@pytest.mark.parametrize("setting", [["json", "pickle"], ["application/x-python-serialize"], "pickle",
                                     ("json", "Pickle"), ["json", "application/x-python-serialize"]])
def test_every_name_of_pickle_is_found(setting):
    assert pickles(setting)


@pytest.mark.parametrize("setting", [["json"], ["application/json", "msgpack"], "json", None, ()])
def test_json_and_others_pass(setting):
    assert pickles(setting) == []


def test_expires_becomes_the_earlier_deadline_and_the_expiration_goes():
    headers = {"expires": "2030-01-01T00:00:00+00:00", "x-rare-deadline": 1_900_000_000.0}
    properties = {"expiration": "1000", "priority": 0}
    fold_expires(headers, properties)
    assert headers["expires"] is None and "expiration" not in properties and properties["priority"] == 0
    assert headers["x-rare-deadline"] == 1_893_456_000.0  # 2030-01-01, earlier than 1.9e9
    later = {"expires": "2040-01-01T00:00:00", "x-rare-deadline": 1_900_000_000.0}
    fold_expires(later)
    assert later["x-rare-deadline"] == 1_900_000_000.0


def test_an_expires_that_is_not_a_time_is_ignored_not_raised():
    headers = {"expires": "soon"}
    fold_expires(headers)
    assert headers == {"expires": None}


def test_delay_queue_type_setting_is_checked_and_makes_every_delay_quorum():
    app = Celery("t", broker="amqp://nowhere//", set_as_current=False)
    app.conf.task_queues = []
    assert delay_kind(app, "sms") == CLASSIC
    app.conf.rare_queue_type = "quorum"
    check(app)
    assert delay_kind(app, "sms") == QUORUM and own_kind(app) == QUORUM
    app.conf.rare_queue_type = "fast"
    with pytest.raises(ConfigurationError, match="rare_queue_type is 'fast'; set it to 'quorum'"):
        check(app)


def test_quorum_bug_queues_have_no_delivery_limit_on_rabbitmq_4_only():
    """4.x drops a quorum queue's message after 20 deliveries (measured: read 21 times, gone); on
    3.10, x-delivery-limit -1 drops it at the first redelivery (measured), and there is no default."""
    queue = bug_queue("sms.bugs", QUORUM)
    assert for_broker(queue, "4.0.5").queue_arguments == {"x-queue-type": "quorum", "x-delivery-limit": -1}
    assert for_broker(queue, "3.10.8") is queue and for_broker(queue, "") is queue
    assert for_broker(bug_queue("sms.bugs"), "4.0.5").queue_arguments == {"x-queue-type": "classic"}
    work = Queue("sms", queue_arguments={"x-queue-type": "quorum"})  # the app's own: declared as it says
    assert for_broker(work, "4.0.5") is work


def _app(name: str, rare: bool, exchange_type: str = "direct") -> Celery:
    from kombu import Exchange

    from rare_celery import RareTask

    app = Celery(name, broker="amqp://guest:guest@127.0.0.1:1//", set_as_current=False)
    app.conf.task_queues = [Queue("q", Exchange("ex", type=exchange_type), routing_key="q",
                                  queue_arguments={"x-queue-type": "quorum"})]

    def t():
        return None

    if rare:  # a plain app is not finalized: shared RareTasks of other tests would join it
        app.task(name=f"{name}.t", shared=False, base=RareTask)(t)
        app.finalize()
    return app


def test_celerys_native_delayed_delivery_is_left_out_of_rare_apps_whose_exchanges_are_direct():
    """Celery 5.5+'s DelayedDelivery step, included for any worker with a quorum queue: a rare app with
    direct exchanges only (which Celery never routes through it) leaves it out; other apps keep it."""
    delayed = pytest.importorskip("celery.worker.consumer.delayed_delivery")
    step = delayed.DelayedDelivery.__new__(delayed.DelayedDelivery)
    include = lambda app: step.include_if(type("C", (), {"app": app})())
    assert include(_app("rare", rare=True)) is False
    assert include(_app("plain", rare=False)) is True
    assert include(_app("rare_topic", rare=True, exchange_type="topic")) is True
