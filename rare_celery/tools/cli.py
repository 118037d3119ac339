"""The ``rare-celery`` command line: read and repair bug queues, look at delay queues, print schedules.

Also reachable as ``celery -A APP rare <command>`` (the ``celery.commands`` entry point).
Exit codes: 0 success, 1 nothing matched where something was asked for, 2 usage or broker errors.
"""

from __future__ import annotations

import contextlib
import getpass
import json
import os
import shutil
import socket
import sys
import time
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Sequence
from functools import cached_property
from typing import IO, Any, cast

import click

from ..inventory import RareTaskInfo, rare_tasks, task_name
from ..topology import (
    DELAY_EXCHANGE,
    NOT_A_BUG_QUEUE,
    RETURN_EXCHANGE,
    UNROUTED_QUEUE,
    bug_queue,
    bug_queue_name,
    delay_queue,
    looks_like_bug_queue,
    own_kind,
    unrouted_queue,
)
from . import breakers as rare_breakers
from . import bugs, durations, moves, records
from . import status as rare_status
from . import timeline as tl
from .display import count, terminal

ENV = "rare_celery.env"
SCHEDULE_ROWS = 50  # attempts shown by `schedule` unless --attempts says otherwise


def say(text: object = "", err: bool = False) -> None:
    """Print ``text`` with every line made safe for a terminal: text from messages (task names, ids,
    errors, queue names) never brings its control characters or escape sequences along."""
    click.echo("\n".join(terminal(line) for line in str(text).split("\n")), err=err)


class Failure(click.ClickException):
    """A usage, broker or connection problem: one line on stderr, exit code 2."""

    exit_code = 2

    def show(self, file: IO[Any] | None = None) -> None:
        say(f"rare-celery: {self.format_message()}", err=True)


class Group(click.Group):
    """A click group whose usage errors are one line too (what is wrong and where to look)."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except click.UsageError as exc:
            where = exc.ctx.command_path if exc.ctx else ctx.command_path
            raise Failure(f"{exc.format_message()} (see '{where} -h')") from None


class Duration(click.ParamType):  # type: ignore[type-arg]  # generic in click >= 8.3 only, not at run time before
    name = "duration"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> float:
        if isinstance(value, (int, float)):
            return float(value)
        try:
            return durations.parse(value)
        except ValueError as exc:
            self.fail(str(exc), param, ctx)


class Env:
    """What a command works on: a Celery app (``-A``), a broker URL (``--broker``), or both."""

    def __init__(self, app_name: str | None = None, broker: str | None = None, app: Any = None) -> None:
        self.app_name, self.broker, self._app = app_name, broker, app

    @cached_property
    def app(self) -> Any:
        if self._app is not None:
            return _prepare(self._app, self.app_name or self._app.main or "app")
        return load_app(self.app_name) if self.app_name else None

    def need_app(self, what: str) -> Any:
        if self.app is None:
            raise Failure(f"{what} needs the app: pass -A/--app APP (what you give celery -A)")
        return self.app

    @cached_property
    def tasks(self) -> list[RareTaskInfo]:
        return rare_tasks(self.app) if self.app is not None else []

    def bug_queues(self) -> list[str]:
        """The app's bug queues, and ``rare.unrouted`` (due messages whose work queue was gone)."""
        names = {t.bug_queue for t in self.tasks} | {bug_queue_name(t.queue) for t in self.tasks}
        return sorted(names) + ([UNROUTED_QUEUE.name] if names else [])

    def task(self, name: str | None) -> RareTaskInfo | None:
        return next((t for t in self.tasks if t.name == name), None)

    def breakers(self, queues: Iterable[str] = ()) -> rare_breakers.Uses:
        """The circuit breakers the app's rare tasks (those on ``queues``, if given) name."""
        if self.app is None:
            return {}
        from ..exceptions import ConfigurationError

        try:
            return rare_breakers.uses(self.app, self.tasks, queues)
        except ConfigurationError as exc:
            raise Failure(str(exc)) from None

    def check_bug_queue(self, queue: str) -> None:
        """With an app, requeue and purge act only on its bug queues."""
        if self.app is not None and queue not in self.bug_queues():
            known = ", ".join(self.bug_queues()) or "none"
            raise Failure(f"{queue!r} is not a bug queue of the app (its bug queues: {known}); "
                          f"to act on another bug queue, pass --broker URL without -A")
        self.check_readable(queue)

    def check_readable(self, queue: str) -> None:
        """The tools read bug queues only: never a work queue, whose messages a read makes redelivered."""
        if not looks_like_bug_queue(queue) and queue not in self.bug_queues():
            raise Failure(f"{queue!r} {NOT_A_BUG_QUEUE}")

    def _connection(self) -> Any:
        """A kombu Connection (not connected yet) to the broker; a URL that cannot be read is a :class:`Failure`
        that shows none of it (what cannot be parsed may be a piece of the password)."""
        try:
            if self.app is not None:
                _check_url(self.broker or self.app.conf.broker_url)
                conn = self.app.connection_for_write(self.broker, **bugs.connection_options())
            elif self.broker:
                from kombu import Connection

                _check_url(self.broker)
                conn = Connection(self.broker, **bugs.connection_options())
            else:
                raise Failure("say where the broker is: pass -A/--app APP (a Celery app) or --broker URL")
            conn.as_uri()
        except ValueError:
            raise Failure(BAD_URL) from None
        return conn

    @contextlib.contextmanager
    def connection(self) -> Iterator[Any]:
        """A connected kombu Connection; broker problems become one-line :class:`Failure` s."""
        from amqp.exceptions import AMQPError
        from kombu.exceptions import KombuError

        conn = self._connection()
        where = conn.as_uri()  # password masked
        dead = False
        try:
            try:
                bugs.connect(conn)
            except Exception as exc:  # noqa: BLE001 - every way of not connecting is reported the same way
                raise Failure(f"cannot connect to {where}: {_why(exc)} (check the URL and that RabbitMQ runs)") from None
            yield conn
        except BrokenPipeError:  # `inspect-bugs | head`: the reader left; the messages go back anyway
            sys.stdout = open(os.devnull, "w")  # noqa: SIM115 - nothing more to write at exit
            sys.exit(0)
        except bugs.QueueMissing as exc:
            raise Failure(f"queue {exc.args[0]!r} does not exist at {where}") from None
        except bugs.MoveFailed as exc:
            raise Failure(f"{exc}; stopped after moving {exc.done}, the rest stays in the bug queue ({where})") from None
        except bugs.Interrupted as exc:
            dead = True
            raise Failure(f"broker {where}: {exc.describe()}") from None
        except socket.timeout:
            dead = True
            raise Failure(f"broker {where}: the broker stopped answering (nothing for {bugs.READ_TIMEOUT:g} s)") from None
        except RecursionError:  # py-amqp decodes header tables recursively (see records.allow_deep_headers)
            dead = True
            raise Failure(f"broker {where}: a message's headers nest deeper than Python "
                          f"{sys.version_info[0]}.{sys.version_info[1]} can read (3.11 and later read them)") from None
        except (OSError, AMQPError, KombuError) as exc:
            raise Failure(f"broker {where}: {_why(exc)}") from None
        finally:
            with contextlib.suppress(Exception):
                conn.collect() if dead else conn.release()  # no closing handshake with a broker that is silent


BAD_URL = ("the broker URL cannot be read: a '/', '?', '#' or '@' in its user name or password must be "
           "percent-encoded (%2F, %3F, %23, %40), and its port must be a number")


def _check_url(url: object) -> None:
    """``ValueError`` when ``url`` (or one of a ``;``-separated list) has an ``@`` after its host part:
    a user name or password with an unescaped ``/``, ``?`` or ``#`` (the rest would be read as a host)."""
    if not isinstance(url, str):
        return
    from urllib.parse import urlsplit

    for one in url.split(";"):
        rest = one.split("://", 1)[1] if "://" in one else ""
        if "@" in rest and "@" not in urlsplit(one).netloc:
            raise ValueError("unescaped user information")


def _why(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def load_app(name: str) -> Any:
    """The Celery app ``name`` names, found as ``celery -A`` finds it, with its task modules imported."""
    from celery.app.utils import find_app

    try:
        app = find_app(name)
    except Exception as exc:  # noqa: BLE001 - import errors of all kinds
        raise Failure(f"cannot load the app {name!r}: {_why(exc)} (give what you give celery -A)") from None
    return _prepare(app, name)


def _prepare(app: Any, name: str) -> Any:
    from celery import Celery

    if not isinstance(app, Celery):
        raise Failure(f"{name!r} is not a Celery app but a {type(app).__name__}")
    try:
        app.loader.import_default_modules()
        app.finalize(auto=True)
    except Exception as exc:  # noqa: BLE001
        raise Failure(f"cannot load the tasks of the app {name!r}: {_why(exc)}") from None
    return app


def env() -> Env:
    return cast(Env, click.get_current_context().meta[ENV])


# -- the groups ------------------------------------------------------------------------------------

SETTINGS = {"help_option_names": ["-h", "--help"], "max_content_width": 110}


@click.group(cls=Group, context_settings=SETTINGS)
@click.option("-A", "--app", "app_name", metavar="APP", help="The Celery app, as celery -A takes it.")
@click.option("--broker", metavar="URL", help="Broker URL (without -A: commands take explicit queue names).")
@click.version_option(package_name="rare-celery")
@click.pass_context
def main(ctx: click.Context, app_name: str | None, broker: str | None) -> None:
    """Operate rare_celery queues: bug queues, delay queues and the topology."""
    ctx.meta[ENV] = Env(app_name, broker)


@click.group("rare", cls=Group, context_settings=SETTINGS)
@click.pass_context
def celery_command(ctx: click.Context) -> None:
    """rare_celery: bug queues, delay queues and the topology of this app."""
    ctx.meta[ENV] = Env(app=ctx.obj.app)


def command(fn: Callable[..., Any]) -> click.Command:
    """Register ``fn`` in both groups."""
    cmd = click.command(context_settings=SETTINGS)(fn)
    main.add_command(cmd)
    celery_command.add_command(cmd)
    return cmd


def select_options(*names: str) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    options = {
        "id": click.option("--id", "ids", multiple=True, metavar="ID", help="A task id (repeatable)."),
        "task": click.option("--task", "tasks", multiple=True, metavar="NAME",
                             help="Task name or pattern like 'billing.*' (repeatable)."),
        "reason": click.option("--reason", "reasons", multiple=True, metavar="R",
                               help="exhausted, expired, bug, rejected, unregistered (repeatable)."),
        "since": click.option("--since", type=Duration(), help="Failed within this long (90s, 15m, 1h, 7d, 1d12h)."),
        "older": click.option("--older-than", "older_than", type=Duration(), help="Failed at least this long ago."),
        "group": click.option("--group", "group_ids", multiple=True, metavar="GROUP",
                              help="A failure group, as inspect-bugs --groups lists them (repeatable)."),
    }

    def decorate(fn: Callable[..., Any]) -> Callable[..., Any]:
        for name in reversed(names):
            fn = options[name](fn)
        return fn

    return decorate


def selector(ids: Iterable[str] = (), tasks: Iterable[str] = (), reasons: Iterable[str] = (),
             since: float | None = None, older_than: float | None = None, now: float | None = None,
             group_ids: Iterable[str] = ()) -> records.Selector:
    now = time.time() if now is None else now
    return records.Selector(frozenset(ids), tuple(tasks), frozenset(reasons),
                            None if since is None else now - since, None if older_than is None else now - older_than,
                            frozenset(group_ids))


# -- inspect-bugs ----------------------------------------------------------------------------------

ROW = "{failed:<19}  {task:<28}  {id:<36}  {reason:<12}  {attempts:>4}  {error}"


def row(r: records.Record) -> str:
    failed = records.iso(r.failed_at)
    return ROW.format(failed=failed[:19].replace("T", " ") if failed else "-", task=_clip(r.task or "-", 28),
                      id=_clip(r.id or "-", 36), reason=r.reason or "-",
                      attempts="-" if r.attempts is None else r.attempts, error=r.one_line_error())


def _clip(text: str, width: int) -> str:
    return text if len(text) <= width else text[: width - 1] + "…"


def summary(reasons: Counter[Any], tasks: Counter[Any]) -> str:
    def top(counter: Counter[Any], most: int = 8) -> str:
        items = sorted(((k or "-", v) for k, v in counter.items()), key=lambda kv: (-kv[1], kv[0]))
        text = ", ".join(f"{k} {v}" for k, v in items[:most])
        return text + (f", {len(items) - most} more" if len(items) > most else "")

    return f"by reason: {top(reasons) or '-'}; by task: {top(tasks) or '-'}"


@command
@click.argument("queues", nargs=-1, metavar="[QUEUE]...")
@click.option("--limit", type=click.IntRange(min=1), help="Show at most N matching messages.")
@select_options("id", "task", "reason", "since", "group")
@click.option("--groups", "by_group", is_flag=True,
              help="Failure groups instead of messages: same task, exception and message but for ids and numbers.")
@click.option("--json", "as_json", is_flag=True, help="JSON Lines, one object per message (or group).")
def inspect_bugs(queues: Sequence[str], limit: int | None, ids: tuple[str, ...], tasks: tuple[str, ...],
                 reasons: tuple[str, ...], since: float | None, group_ids: tuple[str, ...], by_group: bool,
                 as_json: bool) -> None:
    """List bug-queue messages without taking them: they stay, in order.

    Without QUEUE, every bug queue of the app's rare tasks, and rare.unrouted.
    """
    e = env()
    explicit = bool(queues)
    queues = list(queues) or e.bug_queues()
    if not queues:
        raise Failure("name a QUEUE, or pass -A/--app APP to read every bug queue of its rare tasks")
    select = selector(ids=ids, tasks=tasks, reasons=reasons, since=since, group_ids=group_ids)
    by_reason: Counter[str | None]
    by_task: Counter[str | None]
    shown, total, by_reason, by_task = 0, 0, Counter(), Counter()
    failures: list[tuple[str, str | None, str, float | None]] = []  # --groups: what each matching one was
    with e.connection() as conn:
        for queue in queues if explicit else ():
            e.check_readable(queue)
        if not as_json and not by_group:
            say(ROW.format(failed="FAILED (UTC)", task="TASK", id="ID", reason="REASON", attempts="ATT",
                                  error="ERROR"))
        for queue in queues:
            if not explicit and bugs.depth(conn, queue) is None:
                say(f"({queue} does not exist yet)", err=True)
                continue
            with bugs.browse(conn, queue) as messages:
                for held in messages:
                    total += 1
                    r = held.record
                    if not select.matches(r):
                        continue
                    shown += 1
                    by_reason[r.reason] += 1
                    by_task[r.task] += 1
                    if by_group:
                        failures.append((r.group, r.task, r.one_line_error(records.GROUP_WIDTH), r.failed_at))
                        continue
                    say(json.dumps(r.as_json(), default=str) if as_json else row(r))
                    if limit is not None and shown >= limit:
                        break
            if limit is not None and shown >= limit:
                break
    if by_group:
        show_groups(records.groups(failures)[:limit], as_json)
    where = ", ".join(queues)
    line = f"{shown} shown of {total} read in {where}; {summary(by_reason, by_task)}"
    say(line, err=as_json)
    if select and not shown:
        say("nothing matched", err=True)
        sys.exit(1)


GROUP_ROW = "{group:<10}  {count:>7}  {first:<19}  {last:<19}  {task:<28}  {error}"


def show_groups(found: list[records.Group], as_json: bool) -> None:
    """Failure groups, the largest first: a table, or JSON Lines."""
    if as_json:
        for g in found:
            say(json.dumps(g.as_json()))
        return
    say(GROUP_ROW.format(group="GROUP", count="COUNT", first="FIRST FAILED (UTC)", last="LAST FAILED (UTC)",
                         task="TASK", error="ERROR (ids and numbers masked)"))
    for g in found:
        first, last = records.iso(g.first_failed), records.iso(g.last_failed)
        say(GROUP_ROW.format(group=g.id, count=f"{g.count:,}", first=first[:19].replace("T", " ") if first else "-",
                             last=last[:19].replace("T", " ") if last else "-", task=_clip(g.task or "-", 28),
                             error=_clip(g.error, 80)))


# -- requeue-bugs and purge-bugs -------------------------------------------------------------------

Plan = moves.Plan  # the plan-then-take logic is shared with the web console


def plan(conn: Any, queue: str, select: records.Selector, to: str | None = None, rows: bool = False,
         moving: bool = True) -> Plan:
    """First read of ``queue``: which messages match, and (``moving``) where each would go."""
    return moves.plan(conn, queue, lambda held: select.matches(held.record), to, moving,
                      (lambda r: say(row(r))) if rows else None)


@contextlib.contextmanager
def progress(count: int, label: str) -> Iterator[Any]:
    """A progress bar on stderr when the messages would not fit on one screen."""
    if count <= shutil.get_terminal_size().lines:
        yield lambda held: None
        return
    with click.progressbar(length=count, label=label, file=sys.stderr) as bar:
        yield lambda held: bar.update(1)


def _need_selection(select: records.Selector, everything: bool, what: str) -> None:
    if not select and not everything:
        raise Failure(f"say which messages to {what}: --id, --task, --reason" +
                      (", --older-than" if what == "purge" else "") + ", --group, or --all for every message")


def _targets(targets: Counter[Any]) -> str:
    return ", ".join(f"{q} ({n})" for q, n in sorted(targets.items()))


@command
@click.argument("queue")
@select_options("id", "task", "reason", "group")
@click.option("--all", "everything", is_flag=True, help="Every message of the queue.")
@click.option("--to", metavar="QUEUE", help="Send them here instead of their origin queue (x-rare-queue).")
@click.option("--reset-attempts/--keep-attempts", "reset", default=True, show_default=True,
              help="Start over at attempt 1 with a fresh shelf life, or keep count and deadline.")
@click.option("--rate", metavar="N/s|N/m|N/h", help="Move at most this many a second, minute or hour (evened out).")
@click.option("--dry-run", is_flag=True, help="Show what would be moved; move nothing.")
@click.option("--yes", "-y", is_flag=True, help="Do not ask for confirmation.")
def requeue_bugs(queue: str, ids: tuple[str, ...], tasks: tuple[str, ...], reasons: tuple[str, ...],
                 group_ids: tuple[str, ...], everything: bool, to: str | None, reset: bool, rate: str | None,
                 dry_run: bool, yes: bool) -> None:
    """Move matching messages from bug queue QUEUE back to their work queue.

    Each is republished with publisher confirms before it is removed from QUEUE; the others stay,
    in order. Safe while workers run and add new bugs.
    """
    try:
        per_second = None if rate is None else moves.Pace.parse(rate)
    except ValueError as exc:
        raise click.BadParameter(str(exc), param_hint="--rate") from None
    e = env()
    select = selector(ids, tasks, reasons, group_ids=group_ids)
    _need_selection(select, everything, "requeue")
    e.check_bug_queue(queue)
    with e.connection() as conn:
        found = plan(conn, queue, select, to, rows=dry_run)
        if found.without_target:
            say(f"{found.without_target} matching messages have no origin queue (x-rare-queue): "
                       f"they stay; send them with --to QUEUE", err=True)
        if not found.count:
            say(f"nothing to requeue in {queue}", err=True)
            sys.exit(1)
        for target in found.targets:
            if bugs.depth(conn, target) is None:
                raise Failure(f"queue {target!r} ({found.targets[target]} messages go there) does not exist: "
                              f"declare it (rare-celery declare) or choose another with --to")
    if dry_run:
        say(f"would requeue {count(found.count, 'message')} from {queue} to {_targets(found.targets)}")
        return
    if not yes:  # no connection is held while a person thinks
        click.confirm(terminal(f"Requeue {count(found.count, 'message')} from {queue} to {_targets(found.targets)}?"), abort=True)
    send = moves.requeue_sender(to, reset, time.time(), lines=moves.lines_of(e.app))
    planned = found.count
    with e.connection() as conn, progress(planned, "requeueing") as step:
        pace = moves.Pace(per_second, conn) if per_second else None

        def moved_one(held: bugs.Held) -> None:
            step(held)
            if pace is not None:
                pace()

        moved = bugs.take(conn, queue, found.take, send, moved_one)
    gone = planned - moved
    say(f"requeued {count(moved, 'message')} from {queue} to {_targets(found.targets)}"
               + (f"; {gone} of those counted were no longer there" if gone else ""))


@command
@click.argument("queue")
@select_options("task", "reason", "older", "group")
@click.option("--all", "everything", is_flag=True, help="Every message of the queue.")
@click.option("--yes", "-y", is_flag=True, help="Do not ask for confirmation.")
def purge_bugs(queue: str, tasks: tuple[str, ...], reasons: tuple[str, ...], older_than: float | None,
               group_ids: tuple[str, ...], everything: bool, yes: bool) -> None:
    """Delete the matching messages from bug queue QUEUE; the others stay, in order."""
    e = env()
    select = selector(tasks=tasks, reasons=reasons, older_than=older_than, group_ids=group_ids)
    _need_selection(select, everything, "purge")
    e.check_bug_queue(queue)
    with e.connection() as conn:
        found = plan(conn, queue, select, moving=False)
        if not found.count:
            say(f"nothing to purge in {queue}", err=True)
            sys.exit(1)
    if not yes:  # no connection is held while a person thinks
        click.confirm(terminal(f"Delete {count(found.count, 'message')} from {queue} for good?"), abort=True)
    with e.connection() as conn, progress(found.count, "purging") as step:
        deleted = bugs.take(conn, queue, found.take, None, step)
    say(f"deleted {count(deleted, 'message')} from {queue}")


# -- edit-bug ---------------------------------------------------------------------------------------

def _user() -> str:
    try:
        return getpass.getuser()
    except Exception:  # noqa: BLE001 - no user name in this environment (a container): say so
        return "unknown"


def _json_option(text: str | None, kind: type, name: str) -> Any:
    if text is None:
        return None
    try:
        value = json.loads(text)
    except ValueError as exc:
        raise click.BadParameter(f"not JSON: {exc}", param_hint=name) from None
    if not isinstance(value, kind):
        raise click.BadParameter(f"must be a JSON {'list' if kind is list else 'object'}", param_hint=name)
    return value


@command
@click.argument("queue")
@click.argument("task_id", metavar="ID")
@click.option("--args", "args_text", metavar="JSON", help="The new positional arguments, a JSON list.")
@click.option("--kwargs", "kwargs_text", metavar="JSON", help="The new keyword arguments, a JSON object.")
@click.option("--by", default=None, help="Who edits it (recorded in x-rare-edits; default: your user name).")
@click.option("--to", metavar="QUEUE", help="Send it here instead of its origin queue (x-rare-queue).")
@click.option("--reset-attempts/--keep-attempts", "reset", default=True, show_default=True,
              help="Start over at attempt 1 with a fresh shelf life, or keep count and deadline.")
@click.option("--yes", "-y", is_flag=True, help="Do not ask for confirmation.")
def edit_bug(queue: str, task_id: str, args_text: str | None, kwargs_text: str | None, by: str | None,
             to: str | None, reset: bool, yes: bool) -> None:
    """Change the arguments of the message ID in bug queue QUEUE and requeue it.

    The edit is recorded in the message (x-rare-edits: who, when, the arguments before); the new copy
    is confirmed by the broker before the old one leaves QUEUE.
    """
    new_args = _json_option(args_text, list, "--args")
    new_kwargs = _json_option(kwargs_text, dict, "--kwargs")
    if new_args is None and new_kwargs is None:
        raise Failure("say what to change: --args JSON, --kwargs JSON, or both")
    e = env()
    e.check_bug_queue(queue)
    seen: list[records.Record] = []
    with e.connection() as conn:
        found = moves.plan(conn, queue, lambda held: held.record.id == task_id, to, True, seen.append)
        if not found.count and not found.without_target:
            say(f"no message with id {task_id} in {queue}", err=True)
            sys.exit(1)
        if found.without_target:
            raise Failure(f"{task_id} has no origin queue (x-rare-queue): send it with --to QUEUE")
        if found.count > 1:
            raise Failure(f"{found.count} messages in {queue} have id {task_id}: requeue or purge them instead")
        record = seen[0]
        if record.body_error:
            raise Failure(f"{task_id} cannot be edited: {record.body_error}")
        for target in found.targets:
            if bugs.depth(conn, target) is None:
                raise Failure(f"queue {target!r} does not exist: declare it (rare-celery declare) or choose another "
                              f"with --to")
    edit = moves.Edit(new_args, new_kwargs, by or _user())
    say(f"args:   {json.dumps(record.args, ensure_ascii=False)}" + (
        f"\n     -> {json.dumps(new_args, ensure_ascii=False)}" if new_args is not None else " (unchanged)"))
    say(f"kwargs: {json.dumps(record.kwargs, ensure_ascii=False)}" + (
        f"\n     -> {json.dumps(new_kwargs, ensure_ascii=False)}" if new_kwargs is not None else " (unchanged)"))
    if not yes:
        click.confirm(terminal(f"Requeue {task_id} edited from {queue} to {_targets(found.targets)}?"), abort=True)
    send = moves.requeue_sender(to, reset, time.time(), edit, lines=moves.lines_of(e.app))
    with e.connection() as conn:
        moved = bugs.take(conn, queue, found.take, send)
    if not moved:
        say(f"{task_id} was no longer in {queue}: nothing requeued", err=True)
        sys.exit(1)
    say(f"requeued {task_id} edited from {queue} to {_targets(found.targets)}, recorded as edited by {edit.by}")


# -- status ----------------------------------------------------------------------------------------

@command
@click.argument("queues", nargs=-1, metavar="[QUEUE]...")
@click.option("--scan", is_flag=True, help="Look for every possible delay queue, not only those of the schedules.")
@click.option("--json", "as_json", is_flag=True, help="One JSON object.")
def status(queues: tuple[str, ...], scan: bool, as_json: bool) -> None:
    """Ready messages and consumers of rare work queues, their bug queues, and the delay queues;
    with -A, the state of the app's circuit breakers.

    Without QUEUE, the work queues of the app's rare tasks. Delay queues are shared by every work
    queue of a vhost; they are found from the tasks' schedules (or all of them with --scan).
    """
    e = env()
    works = rare_status.work_queues(e.tasks, queues)
    if not works:
        raise Failure("name the work QUEUEs, or pass -A/--app APP with rare tasks")
    with e.connection() as conn:
        report = rare_status.probe(conn, works, rare_status.delay_users(e.tasks, queues), scan,
                                   breaker_uses=e.breakers(queues))
    if as_json:
        say(json.dumps(report, indent=2))
        return
    say(f"{'WORK QUEUE':<32} {'READY':>8} {'CONSUMERS':>9}  {'BUG QUEUE':<32} {'BUGS':>8}")
    for w in report["work_queues"]:
        for i, b in enumerate(w["bug_queues"]):
            left = (f"{w['queue']:<32} {_n(w['ready'], w['exists']):>8} {_n(w['consumers'], w['exists']):>9}"
                    if i == 0 else " " * 51)
            say(f"{left}  {b['queue']:<32} {_n(b['messages'], b['exists']):>8}")
    unrouted = report["unrouted"]
    if unrouted["messages"]:
        say(f"{'':<51}  {unrouted['queue']:<32} {unrouted['messages']:>8}  (their work queue was gone: "
            f"requeue-bugs {unrouted['queue']} --to QUEUE)")
    say("")
    if not report["delay_queues"]:
        say("no delay queues known" + ("" if scan else " (--scan looks for every possible one)"))
    else:
        say(f"{'DELAY QUEUE':<32} {'DELAY':>10} {'WAITING':>8}  FOR WORK QUEUES (from their schedules)")
        for d in report["delay_queues"]:
            say(f"{d['queue']:<32} {d['delay']:>10} {_n(d['messages'], d['exists']):>8}  "
                f"{', '.join(d['work_queues']) or '-'}")
    if report.get("breakers"):
        say("")
        for line in rare_breakers.lines(report["breakers"], time.time()):
            say(line)  # the worker names and task ids came from a message: say escapes them


def _n(value: object, exists: bool) -> str:
    return str(value) if exists else "missing"


# -- schedule --------------------------------------------------------------------------------------

@command
@click.argument("name", metavar="TASK")
@click.option("--attempts", type=click.IntRange(min=1), help=f"Show at most N attempts (default {SCHEDULE_ROWS}).")
def schedule(name: str, attempts: int | None) -> None:
    """When each attempt of TASK runs, where its shelf life ends, and what happens then. No broker needed."""
    e = env()
    e.need_app("schedule")
    info = e.task(name)
    if info is None:
        names = ", ".join(t.name for t in e.tasks) or "none"
        raise Failure(f"{name!r} is not a RareTask of the app (its rare tasks: {names})")
    app = e.app

    def find(fallback: object) -> tuple[str, RareTaskInfo | None]:
        target = task_name(app, fallback)
        return target, e.task(target)

    for line in tl.describe(info, find, attempts or SCHEDULE_ROWS):
        say(line)


# -- pause / resume --------------------------------------------------------------------------------

def operator() -> str:
    """Who acts, when ``--by`` does not say: ``user@host``."""
    import getpass
    import socket

    try:
        user = getpass.getuser()
    except Exception:  # noqa: BLE001 - no user name: the host alone
        user = "someone"
    return f"{user}@{socket.gethostname()}"


def _service(e: Env, name: str, what: str) -> None:
    e.need_app(what)
    known = e.breakers()
    if name not in known:
        raise Failure(f"no rare task of the app names the service {name!r} (breaker = ...); "
                      f"its services: {', '.join(known) or 'none'}")


@command
@click.argument("service")
@click.option("--for", "seconds", type=Duration(), required=True, help="How long: 90s, 10m, 2h (at most 30 days).")
@click.option("--why", default="", help="Why, recorded with the pause and shown in status and the console.")
@click.option("--by", default=None, help="Who pauses (default: user@host).")
def pause(service: str, seconds: float, why: str, by: str | None) -> None:
    """Hold every attempt of SERVICE (the breaker the tasks name) on every worker, for a while.

    The attempts wait in delay queues, counting nothing, their shelf lives running; when the pause
    ends one attempt probes the service, then the others run (or `resume` ends it sooner).
    """
    e = env()
    _service(e, service, "pause")
    if not 0 < seconds <= 30 * 86_400:
        raise Failure("--for must be above 0 and at most 30 days")
    with e.connection() as conn:
        try:
            held = rare_breakers.pause(e.app, conn, service, seconds, why[:200], (by or operator())[:100])
        except RuntimeError as exc:
            raise Failure(str(exc)) from None
    say(f"paused {service} until {rare_breakers.when(held.until or 0, time.time())}"
        + (f": {why[:200]}" if why else ""))


@command
@click.argument("service")
@click.option("--by", default=None, help="Who resumes (default: user@host).")
def resume(service: str, by: str | None) -> None:
    """Let SERVICE's attempts run again now, on every worker: ends a pause, a Retry-After's hold or an
    open breaker."""
    e = env()
    _service(e, service, "resume")
    with e.connection() as conn:
        try:
            closed = rare_breakers.resume(e.app, conn, service, (by or operator())[:100])
        except RuntimeError as exc:
            raise Failure(str(exc)) from None
    say(f"resumed {service}" if closed is not None else f"{service} was not held: nothing to resume")


# -- declare ---------------------------------------------------------------------------------------

@command
@click.option("--dry-run", is_flag=True, help="Print what would be declared.")
def declare(dry_run: bool) -> None:
    """Declare the app's rare topology: the delay exchange, work, bug and delay queues.

    Delay queues are those of the tasks' schedules; others (explicit countdowns, jitter) are
    declared by the first publish that needs one.
    """
    from ..declare import bind_return, declare_queue

    e = env()
    app = e.need_app("declare")
    wanted: dict[str, tuple[object, str]] = {}
    for t in e.tasks:
        wanted.setdefault(t.queue, (app.amqp.queues[t.queue], f"work queue ({t.kind})"))
        for name in (bug_queue_name(t.queue), t.bug_queue):
            wanted.setdefault(name, (bug_queue(name, own_kind(app)), "bug queue"))
    for kind, ms in sorted({(t.kind, ms) for t in e.tasks for _, p in t.policies() for ms in tl.delay_values(p)}):
        q = delay_queue(ms, kind)
        wanted[q.name] = (q, f"delay queue ({kind}, {durations.short(ms / 1000)})")
    if not e.tasks:
        raise Failure("the app has no RareTask: nothing to declare")
    verb = "would declare" if dry_run else "declared"
    works = sorted({t.queue for t in e.tasks})
    lines = [f"exchange {DELAY_EXCHANGE.name:<32} direct, durable",
             f"queue    {UNROUTED_QUEUE.name:<32} where due messages go whose work queue is gone",
             f"exchange {RETURN_EXCHANGE.name:<32} direct, durable, alternate exchange {UNROUTED_QUEUE.name}"]
    lines += [f"queue    {name:<32} {what}" for name, (_, what) in wanted.items()]
    lines += [f"binding  {RETURN_EXCHANGE.name} -> {name}" for name in works]
    if dry_run:
        for line in lines:
            say(f"{verb} {line}")
        return
    from ..exceptions import TopologyError

    with e.connection() as conn:
        channel = conn.channel()
        try:
            steps: list[Callable[..., None]] = [lambda: DELAY_EXCHANGE.declare(channel=channel),
                                                lambda: declare_queue(channel, unrouted_queue(own_kind(app))),
                                                lambda: RETURN_EXCHANGE.declare(channel=channel)]
            steps += [lambda q=queue: declare_queue(channel, q) for queue, _ in wanted.values()]
            steps += [lambda n=name: bind_return(channel, n) for name in works]
            for line, step in zip(lines, steps):
                step()
                say(f"{verb} {line}")
        except TopologyError as exc:
            raise Failure(str(exc)) from None
        finally:
            with contextlib.suppress(Exception):
                channel.close()


# -- web and metrics (pip install "rare-celery[web]") ---------------------------------------------

def _serving(port: int, auth_help: str) -> Callable[[Callable[..., Any]], click.Command]:
    """The options of a command that serves HTTP: where, and who may read it."""
    def options(fn: Callable[..., Any]) -> click.Command:
        fn = click.option("--auth", metavar="USER:PASSWORD", help=auth_help)(fn)
        fn = click.option("--port", default=port, show_default=True, type=click.IntRange(0, 65535),
                          help="0: any free port.")(fn)
        fn = click.option("--bind", default="127.0.0.1", show_default=True, metavar="ADDRESS",
                          help="Address to listen on; anything but loopback needs --auth.")(fn)
        return command(fn)
    return options


@_serving(5580, "HTTP basic auth for every page (or RARE_CELERY_WEB_AUTH).")
def web(bind: str, port: int, auth: str | None) -> None:
    """The web console: overview, bug queues and their messages, requeue and purge, schedules, /metrics."""
    from .web.server import serve

    serve(env(), bind, port, auth, True, Failure)


@_serving(5581, "HTTP basic auth (or RARE_CELERY_WEB_AUTH).")
def metrics(bind: str, port: int, auth: str | None) -> None:
    """Prometheus metrics only, at /metrics: queue depths and counters of rare_celery's events."""
    from .web.server import serve

    serve(env(), bind, port, auth, False, Failure)


if __name__ == "__main__":
    main()
