"""Publishing a batch of tasks: ``with bulk(app):``, their confirms awaited together.

A RareTask's ``delay()`` returns once the broker has confirmed the message: nothing is lost between
the call and the broker, and each call costs a round trip to the broker and its disk (about 0.5 ms
on an idle broker, several on a busy one). Inside ``with bulk(app):`` a RareTask's ``delay()`` /
``apply_async()`` returns once the message is written, and leaving the block waits for the broker to
confirm every one of them. The block ends normally only if all were confirmed; otherwise it raises
:class:`~rare_celery.exceptions.PublishRefused` whose ``task_ids`` are the ones the broker did not
confirm (nacked, or no answer before ``timeout``): publish those again. A connection lost inside
the block raises at once (no publish inside it is tried again on another connection).

The publishes share one connection of their own, on one channel, in this thread; tasks that are not
RareTasks, and other threads, publish as usual.
"""

from __future__ import annotations

import contextlib
import contextvars
import socket
import time
from collections.abc import Iterator
from typing import Any

from .exceptions import PublishRefused

_current: contextvars.ContextVar[Bulk | None] = contextvars.ContextVar("rare_celery_bulk", default=None)


class Bulk:
    """The publishes of one ``with bulk(app):`` block, by delivery tag, and the broker's answers."""

    def __init__(self, app: Any, channel: Any) -> None:
        self.app, self.channel = app, channel
        self.producer = app.amqp.Producer(channel)
        self.sent: list[str | None] = []  # what delivery tag i + 1 carried: a task id (None: not a task)
        self.answered = 0  # the broker answered (acked or nacked) every tag up to this one
        self.later: set[int] = set()  # tags above it answered already
        self.nacked: set[int] = set()
        publish = channel.basic_publish

        # every publish on the channel takes the next tag
        def basic_publish(message: Any, *args: Any, **kwargs: Any) -> Any:
            result = publish(message, *args, **kwargs)
            headers = (getattr(message, "properties", None) or {}).get("application_headers") or {}
            self.sent.append(headers.get("id") if isinstance(headers.get("id"), str) else None)
            return result
        channel.basic_publish = basic_publish
        channel.events["basic_ack"].add(lambda tag, multiple: self._answer(tag, multiple, nack=False))
        channel.events["basic_nack"].add(lambda tag, multiple: self._answer(tag, multiple, nack=True))

    def _answer(self, tag: int, multiple: bool, nack: bool) -> None:
        tags = range(self.answered + 1, tag + 1) if multiple else (tag,)
        if nack:
            self.nacked.update(tags)
        self.later.update(tags)
        while self.answered + 1 in self.later:
            self.answered += 1
            self.later.discard(self.answered)

    def unconfirmed(self) -> list[str]:
        return [task_id for tag, task_id in enumerate(self.sent, 1) if task_id is not None
                and (tag in self.nacked or (tag > self.answered and tag not in self.later))]

    def wait(self, timeout: float) -> None:
        """Until the broker has answered for every publish; raises PublishRefused for those it did not confirm."""
        deadline = time.monotonic() + timeout
        problem = None
        while self.answered < len(self.sent):
            left = deadline - time.monotonic()
            if left <= 0:
                problem = f"no confirm within {timeout:g} s"
                break
            try:
                self.channel.connection.drain_events(timeout=left)
            except socket.timeout:
                continue
            except Exception as exc:  # noqa: BLE001 - the connection is gone: what was not answered is unknown
                problem = f"the connection was lost ({type(exc).__name__}: {exc})"
                break
        unconfirmed = self.unconfirmed()
        if unconfirmed:
            raise PublishRefused(f"{len(unconfirmed)} of {sum(1 for t in self.sent if t)} tasks published in bulk "
                                 f"were not confirmed: {problem or 'the broker refused (nacked) them'}; publish "
                                 f"them again", transient=True, task_ids=unconfirmed)


@contextlib.contextmanager
def bulk(app: Any, timeout: float = 30.0) -> Iterator[None]:
    """``with bulk(app):`` RareTask publishes inside the block are confirmed together when it ends
    (see the module documentation). If the block raises, its exception goes on and nothing is
    known of the publishes inside it."""
    connection = app.connection_for_write(transport_options={"confirm_publish": False})  # confirms: ours, below
    try:
        channel = connection.channel()
        channel.confirm_select()
        state = Bulk(app, channel)
        token = _current.set(state)
        try:
            yield
        finally:
            _current.reset(token)
        state.wait(timeout)
    finally:
        connection.release()


def current(app: Any) -> Bulk | None:
    """The ``bulk(app)`` block this thread is in, if any."""
    state = _current.get()
    return state if state is not None and state.app is app else None
