"""rare_celery in a Django project (tests/django_project): shared tasks found by autodiscovery, published
on commit, results in django-celery-results, on the real broker with a real ``celery worker``."""

from __future__ import annotations

import os

import pytest

from tests.support import Vhost, Worker, drain, message_count, wait_for


@pytest.fixture(scope="module")
def shop(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("django")
    vhost = Vhost()
    env = {"DJANGO_SETTINGS_MODULE": "tests.django_project.shopsite.settings",
           "RARE_DJANGO_DB": str(workdir / "shop.sqlite3"), "RARE_DJANGO_BROKER": vhost.url}
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    import django
    from django.core.management import call_command

    django.setup()
    call_command("migrate", verbosity=0)
    from tests.django_project.shopsite import celery_app

    worker = Worker("tests.django_project.shopsite", ["shop"], env, workdir, name="django", concurrency=1)
    try:
        worker.wait_ready()
        from tests.django_project.shop import models, tasks

        yield celery_app, models, tasks, vhost
    finally:
        worker.stop()
        vhost.delete()
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def result_of(task_id: str, timeout: float = 20):
    from django_celery_results.models import TaskResult

    return wait_for(lambda: TaskResult.objects.filter(task_id=task_id, status__in=["SUCCESS", "FAILURE"]).first(),
                    timeout, 0.1, f"the result of {task_id} in django-celery-results")


def test_the_shared_task_is_a_rare_task_found_by_autodiscovery(shop):
    celery_app, _, tasks, _ = shop
    from rare_celery import RareTask

    assert isinstance(celery_app.tasks["tests.django_project.shop.tasks.send_receipt"], RareTask)
    assert tasks.send_receipt.max_attempts == 3


def test_an_order_placed_sends_its_receipt_on_commit_retrying_through_the_broker(shop):
    _, models, tasks, _ = shop
    order = tasks.place_order("bo@busy.example")  # the mail server is busy on attempt 1
    wait_for(lambda: models.Order.objects.get(pk=order.pk).receipt_sent, 30, 0.1, "the receipt")
    task_id = tasks.receipt_id(order.pk)
    result = result_of(task_id)
    assert result.status == "SUCCESS" and result.result == '"bo@busy.example"'
    assert result.task_name == "tests.django_project.shop.tasks.send_receipt"


def test_a_rolled_back_order_sends_nothing(shop):
    _, models, tasks, vhost = shop
    from django.db import transaction

    before = models.Order.objects.count()
    with pytest.raises(RuntimeError), transaction.atomic():
        tasks.place_order("never@shop.example")
        raise RuntimeError("the payment failed")
    assert models.Order.objects.count() == before
    assert message_count(vhost.url, "shop") == 0  # on_commit never ran: nothing was published


def test_a_bug_lands_in_the_bug_queue_and_its_failure_in_django_celery_results(shop):
    _, models, tasks, vhost = shop
    order = tasks.place_order("no address")
    task_id = tasks.receipt_id(order.pk)
    result = result_of(task_id)
    assert result.status == "FAILURE" and "has no e-mail address" in result.result
    [bug] = wait_for(lambda: drain(vhost.url, "shop.bugs"), 10, 0.1, "the bug-queue copy")
    assert bug.headers["id"] == task_id and bug.headers["x-rare-reason"] == "bug"
    assert not models.Order.objects.get(pk=order.pk).receipt_sent
