"""The console's pages (Flask, server-rendered with Jinja2, autoescaped) and ``/metrics``."""

from __future__ import annotations

import json
import math
import time
from datetime import datetime, timezone
from typing import TYPE_CHECKING, Any
from urllib.parse import urlencode

from amqp.exceptions import AMQPError
from flask import Flask, Response, abort, jsonify, redirect, render_template, request, url_for
from kombu.exceptions import KombuError

from ... import __version__
from ...topology import UNROUTED_QUEUE
from .. import breakers, bugs, durations, moves, records
from .. import timeline as tl
from ..display import terminal
from . import metrics, reading
from .console import Console, Refused
from .security import HEADERS, Guard

if TYPE_CHECKING:
    from collections import Counter
    from collections.abc import Iterable

    from flask.typing import ResponseReturnValue
    from prometheus_client import CollectorRegistry
    from werkzeug.datastructures import MultiDict

PER_PAGE = (50, 100, 200)
GROUPS_SHOWN = 20  # failure groups listed on a queue's page, the largest first
FIRST_WAIT = 1.5  # seconds a page waits for a read to finish before it shows its progress
REFRESH_SECONDS = 5


def create_app(console: Console, guard: Guard, registry: CollectorRegistry | None = None, pages: bool = True) -> Flask:
    """The WSGI app: every page when ``pages``, else only ``/metrics`` (``rare-celery metrics``)."""
    app = Flask(__name__)
    app.config.update(MAX_CONTENT_LENGTH=1 << 20, JSON_SORT_KEYS=False)
    app.jinja_env.autoescape = True
    app.jinja_env.filters.update(shown=shown, utc=utc, ago=ago, pretty=pretty, number=number, plural=plural, rate=moves.rate_text,
                                 breaker_settings=breakers.settings_text, service_usage=breakers.usage_text)
    app.jinja_env.globals.update(version=__version__, where=console.where, csrf=guard.csrf, unrouted=UNROUTED_QUEUE.name,
                                 refresh_seconds=REFRESH_SECONDS, any_queue=console.app is None)
    app.extensions["rare_celery_guard"] = guard

    @app.before_request
    def gatekeeper() -> Any:
        if not guard.host_allowed(request.headers.get("Host")):
            return Response("this console answers only to 127.0.0.1, localhost or [::1]\n", 421,
                            mimetype="text/plain")
        if not guard.authorized(request.headers.get("Authorization")):
            return Response("authentication required\n", 401, {"WWW-Authenticate": 'Basic realm="rare-celery"'},
                            mimetype="text/plain")
        if guard.token is not None and request.path != "/metrics":
            cookie = guard.cookie(request.environ.get("SERVER_PORT", ""))
            if "token" in request.args and guard.token_ok(request.args["token"]):
                rest = urlencode([(k, v) for k, v in request.args.items(multi=True) if k != "token"])
                response = redirect(request.path + ("?" + rest if rest else ""))
                response.set_cookie(cookie, guard.token, httponly=True, samesite="Strict", path="/")
                return response
            if not guard.token_ok(request.cookies.get(cookie)):
                return Response("this console answers only to the address with ?token=... that it printed when it "
                                "started\n", 403, mimetype="text/plain")
        if request.method == "POST" and not guard.post_allowed(request.form.get("csrf"), request.headers.get("Origin"),
                                                               request.headers.get("Sec-Fetch-Site"),
                                                               request.headers.get("Host")):
            return Response("refused: this form did not come from this console's pages (reload the page)\n", 403,
                            mimetype="text/plain")
        return None

    @app.after_request
    def headers(response: Response) -> Response:
        for key, value in HEADERS.items():
            response.headers.setdefault(key, value)
        return response

    @app.errorhandler(Refused)
    def refused(exc: Refused) -> ResponseReturnValue:
        return render_template("error.html", title="Not done", message=str(exc)), 400

    @app.errorhandler(bugs.QueueMissing)
    def missing(exc: bugs.QueueMissing) -> ResponseReturnValue:
        return render_template("error.html", title="No such queue",
                               message=f"queue {exc.args[0]!r} does not exist at {console.where}"), 404

    @app.errorhandler(OSError)
    @app.errorhandler(AMQPError)
    @app.errorhandler(KombuError)
    def broker_down(exc: Exception) -> ResponseReturnValue:
        text = " ".join(str(exc).split())
        return render_template("error.html", title="Broker problem",
                               message=f"broker {console.where}: {type(exc).__name__}: {text}"), 503

    if registry is not None:
        @app.route("/metrics")
        def metrics() -> Response:
            from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

            return Response(generate_latest(registry), mimetype=CONTENT_TYPE_LATEST.split(";")[0],
                            headers={"Content-Type": CONTENT_TYPE_LATEST})

    if not pages:
        @app.route("/")
        def metrics_only() -> Response:
            return Response("rare-celery metrics: see /metrics\n", mimetype="text/plain")

        return app

    # -- overview --------------------------------------------------------------------------------

    @app.route("/")
    def overview_page() -> ResponseReturnValue:
        return render_template("overview.html", title="Overview", report=_overview(console), now=time.time())

    @app.route("/overview/tables")
    def overview_tables() -> ResponseReturnValue:
        return render_template("_overview_tables.html", report=_overview(console), now=time.time())

    @app.route("/api/overview")
    def overview_json() -> ResponseReturnValue:
        return jsonify(_overview(console))

    @app.route("/overview/scan", methods=["POST"])
    def scan_delay_queues() -> ResponseReturnValue:
        console.look_for_delay_queues()
        return redirect(url_for("overview_page"))

    @app.route("/service/pause", methods=["POST"])
    def pause_service() -> ResponseReturnValue:
        try:
            seconds = durations.parse(request.form.get("for", ""))
        except ValueError as exc:
            raise Refused(f"for: {exc}") from None
        console.pause(request.form.get("service", ""), seconds, request.form.get("why", ""), _who())
        return redirect(url_for("overview_page"))

    @app.route("/service/resume", methods=["POST"])
    def resume_service() -> ResponseReturnValue:
        console.resume(request.form.get("service", ""), _who())
        return redirect(url_for("overview_page"))

    # -- a queue ---------------------------------------------------------------------------------

    @app.route("/queue")
    def queue_page() -> ResponseReturnValue:
        queue = request.args.get("q", "")
        console.readable(queue)
        filters = Filters.from_args(request.args)
        snap, job = console.snapshot(queue)
        if job is not None and console.wait(job, FIRST_WAIT if snap is None else 0):
            if job.state == "failed":
                raise Refused(job.error or "the read failed")
            snap, job = console.snapshots.get(queue), None
        partial = False
        if snap is None and job is not None and job.kind == "scan":  # a long queue: its head at once, counted
            snap = job.progress.partial(queue)  # as far as the read has come
            partial = snap is not None
        if snap is None:
            return render_template("job.html", title=f"Reading {queue}", job=job, back=None)
        matching = snap.matching(filters.selector())
        by_reason, by_task = reading.counts(matching)
        failure_groups = reading.groups(matching)
        per = filters.per
        pages = max(1, math.ceil(len(matching) / per))
        page = min(filters.page, pages)
        rows = matching[(page - 1) * per: page * per]
        return render_template("queue.html", title=queue, queue=queue, snap=snap, rows=rows, matching=len(matching),
                               page=page, pages=pages, per=per, filters=filters, by_reason=top(by_reason),
                               by_task=top(by_task), groups=failure_groups[:GROUPS_SHOWN],
                               more_groups=max(0, len(failure_groups) - GROUPS_SHOWN), reading_now=job, now=time.time(),
                               link=lambda **kw: url_for("queue_page", **filters.args(q=queue, **kw)),
                               reasons=REASONS, unrouted_queue=queue == UNROUTED_QUEUE.name,
                               partial=partial)

    @app.route("/queue/rescan", methods=["POST"])
    def rescan() -> ResponseReturnValue:
        queue = request.form.get("q", "")
        console.snapshot(queue, fresh=True)
        return redirect(url_for("queue_page", q=queue) + _query(request.form.get("back", "")))

    # -- a message -------------------------------------------------------------------------------

    @app.route("/message")
    def message_page() -> ResponseReturnValue:
        queue, fp = request.args.get("q", ""), request.args.get("fp", "")
        started = time.monotonic()
        found = console.message(queue, fp, request.args.get("id") or None)
        if found is None:
            return render_template("error.html", title="Message not found", queue=queue,
                                   message=f"no message with this content is in {queue} now (requeued, purged, "
                                           f"or its headers changed)"), 404
        record, held = found
        return render_template("message.html", title=record.task or "message", queue=queue, r=record, fp=fp,
                               headers=sorted(records.shown_headers(held.message.headers).items()),
                               properties=sorted((k, v) for k, v in held.message.properties.items()
                                                 if k != "application_headers"),
                               hops=_hops(record.hops), now=time.time(), seconds=time.monotonic() - started,
                               size=len(held.message.body or b""))

    # -- actions ---------------------------------------------------------------------------------

    @app.route("/plan", methods=["POST"])
    def plan() -> ResponseReturnValue:
        form = request.form
        queue = form.get("q", "")
        action, _, scope = form.get("do", "").partition(":")
        to = (form.get("to") or "").strip() or None
        reset = form.get("attempts", "reset") != "keep"
        if action not in ("requeue", "purge"):
            raise Refused("say what to do: requeue or purge")
        try:
            rate = (form.get("rate") or "").strip() or None
            per_second = moves.Pace.parse(rate) if rate and action == "requeue" else None
        except ValueError as exc:
            raise Refused(str(exc)) from None
        edit = _edit(form) if form.get("edit") == "yes" and action == "requeue" else None
        if scope in ("one", "selected"):
            chosen = set(form.getlist("fp"))
            if not chosen:
                raise Refused("no message chosen: tick the messages first")
            words = "this message" if scope == "one" else f"the {len(chosen)} messages ticked"

            def wanted(held: bugs.Held, chosen: set[str] = chosen) -> bool:
                return held.fingerprint in chosen
        elif scope == "matching":
            filters = Filters.from_args(form)
            select = filters.selector()
            if not select and form.get("everything") != "yes":
                raise Refused("no filter is set: tick 'every message of the queue' to act on all of them")
            words = filters.describe() or "every message of the queue"

            def wanted(held: bugs.Held, select: records.Selector = select) -> bool:  # type: ignore[misc]  # same call
                return select.matches(held.record)
        else:
            raise Refused("say which messages: one, the ones ticked, or every one matching the filter")
        if edit is not None and scope != "one":
            raise Refused("an edit is of one message")
        job = console.plan(action, queue, wanted, words, to, reset, per_second, edit)
        return redirect(url_for("job_page", job_id=job.id))

    @app.route("/confirm", methods=["POST"])
    def confirm() -> ResponseReturnValue:
        job = console.take(request.form.get("token", ""))
        return redirect(url_for("job_page", job_id=job.id))

    @app.route("/jobs/<job_id>")
    def job_page(job_id: str) -> ResponseReturnValue:
        job = console.job(job_id) or abort(404)
        console.wait(job, 0.5)
        back = url_for("queue_page", q=job.queue)
        return render_template("job.html", title=_job_title(job), job=job, back=back, now=time.time())

    @app.route("/jobs/<job_id>.json")
    def job_json(job_id: str) -> ResponseReturnValue:
        job = console.job(job_id) or abort(404)
        return jsonify(job.as_json())

    # -- schedules -------------------------------------------------------------------------------

    @app.route("/schedules")
    def schedules() -> ResponseReturnValue:
        tasks = []
        for info in console.tasks:
            lines = list(tl.describe(info, console.find_task, 50))
            tasks.append({"info": info, "head": lines[0], "lines": lines})
        return render_template("schedules.html", title="Schedules", tasks=tasks, has_app=console.app is not None)

    return app


# -- filters -------------------------------------------------------------------------------------

REASONS = metrics.REASONS


class Filters:
    """The filter of a queue page, from its query string (or a form that repeats it)."""

    def __init__(self, tasks: Iterable[str] = (), reasons: Iterable[str] = (), ids: Iterable[str] = (), since: str = "",
                 older: str = "", page: int = 1, per: int = PER_PAGE[0], groups: Iterable[str] = ()) -> None:
        self.tasks, self.reasons, self.ids, self.groups = tuple(tasks), tuple(reasons), tuple(ids), tuple(groups)
        self.since, self.older, self.page, self.per = since, older, page, per
        self.problems: list[str] = []

    @classmethod
    def from_args(cls, args: MultiDict[str, str]) -> Filters:
        def words(name: str) -> list[str]:
            return [w for value in args.getlist(name) for w in value.replace(",", " ").split()]

        f = cls(words("task"), [r for r in args.getlist("reason") if r], words("id"),
                (args.get("since") or "").strip(), (args.get("older") or "").strip(), groups=words("group"))
        try:
            f.page = max(1, int(args.get("page", 1)))
        except ValueError:
            f.page = 1
        try:
            per = int(args.get("per", PER_PAGE[0]))
        except ValueError:
            per = PER_PAGE[0]
        f.per = per if per in PER_PAGE else PER_PAGE[0]
        return f

    def _seconds(self, text: str, what: str) -> float | None:
        if not text:
            return None
        try:
            return durations.parse(text)
        except ValueError as exc:
            self.problems.append(f"{what}: {exc}")
            return None

    def selector(self) -> records.Selector:
        now = time.time()
        since, older = self._seconds(self.since, "failed within"), self._seconds(self.older, "failed before")
        return records.Selector(frozenset(self.ids), self.tasks, frozenset(self.reasons),
                                None if since is None else now - since, None if older is None else now - older,
                                frozenset(self.groups))

    def args(self, **extra: Any) -> dict[str, Any]:
        out = {"task": " ".join(self.tasks) or None, "reason": list(self.reasons) or None,
               "id": " ".join(self.ids) or None, "since": self.since or None, "older": self.older or None,
               "group": " ".join(self.groups) or None,
               "per": self.per if self.per != PER_PAGE[0] else None}
        out.update(extra)
        return {k: v for k, v in out.items() if v not in (None, "", [])}

    def query(self) -> str:
        return urlencode(self.args(), doseq=True)

    def active(self) -> bool:
        return bool(self.tasks or self.reasons or self.ids or self.since or self.older or self.groups)

    def describe(self) -> str:
        parts = []
        if self.tasks:
            parts.append("task " + " or ".join(self.tasks))
        if self.reasons:
            parts.append("reason " + " or ".join(self.reasons))
        if self.ids:
            parts.append("id " + " or ".join(self.ids))
        if self.since:
            parts.append(f"failed within {self.since}")
        if self.older:
            parts.append(f"failed {self.older} ago or earlier")
        if self.groups:
            parts.append("failure group " + " or ".join(self.groups))
        return ", ".join(parts)


def _who() -> str:
    """Who acts, as a pause or resume records it: the name the form gives, else the signed-in user."""
    by = request.form.get("by", "").strip()
    user = request.authorization.username if request.authorization else None
    return by or (f"{user} (console)" if user else "the console")


def _query(text: str) -> str:
    return ("?" + text) if text and not text.startswith("?") else text


# -- helpers for the templates -------------------------------------------------------------------

def _overview(console: Console) -> dict[str, Any]:
    return console.overview()


def top(counter: Counter[str | None], most: int = 12) -> list[tuple[str | None, int]]:
    return sorted(counter.items(), key=lambda kv: (-kv[1], kv[0] or ""))[:most]


def shown(value: object) -> str:
    """Text from a message as a person should see it: control and bidi characters as escapes, per line
    (Jinja escapes the HTML)."""
    if value is None:
        return ""
    text = value if isinstance(value, str) else str(value)
    return "\n".join(terminal(line) for line in text.split("\n"))


def utc(epoch: float | None) -> str:
    if epoch is None:
        return "-"
    return datetime.fromtimestamp(epoch, timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")


def ago(epoch: float | None, now: float | None = None) -> str:
    if epoch is None:
        return ""
    delta = (now or time.time()) - epoch
    if abs(delta) < 1:
        return "just now"
    text = durations.short(round(abs(delta)))
    return f"{text} ago" if delta > 0 else f"in {text}"


def pretty(value: object) -> str:
    try:
        return json.dumps(value, indent=2, ensure_ascii=False, default=repr, sort_keys=False)
    except (TypeError, ValueError):
        return repr(value)


def _edit(form: MultiDict[str, str]) -> moves.Edit:
    """The edit of the message page's form; the arguments must be a JSON list and a JSON object."""
    def read(name: str) -> object:
        try:
            return json.loads(form.get(name) or "")
        except ValueError as exc:
            raise Refused(f"{name}: not JSON ({exc})") from None

    args, kwargs = read("args"), read("kwargs")
    if not isinstance(args, list):
        raise Refused("args: must be a JSON list")
    if not isinstance(kwargs, dict):
        raise Refused("kwargs: must be a JSON object")
    by = " ".join((form.get("by") or "").split())[:100] or "the console"
    return moves.Edit(args, kwargs, by)


def _job_title(job: Any) -> str:
    """A plan that has counted asks for a confirmation: its page says that, not "counting ..." any more."""
    plan = job.result.get("plan") if job.kind == "plan" and job.state == "done" and isinstance(job.result, dict) else None
    if plan is None or not plan.plan.count or job.result.get("missing"):
        return str(job.title)
    return f"{'Requeue from' if plan.action == 'requeue' else 'Delete from'} {job.queue}: confirm"


def number(value: object) -> str:
    return f"{value:,}" if isinstance(value, int) and not isinstance(value, bool) else ("-" if value is None else str(value))


def plural(count: object, word: str) -> str:
    """``word`` as it goes after ``count``: 1 message, 2 messages."""
    return word if count == 1 else word + "s"


def _hops(hops: list[Any]) -> list[dict[str, Any]]:
    """``x-rare-hops`` entries as rows; anything that is not an entry is shown as text."""
    out = []
    for h in hops:
        if isinstance(h, dict):
            out.append({k: h.get(k) for k in ("task", "queue", "reason", "attempts", "started", "left")} |
                       {"bad": None})
        else:
            out.append({"bad": h})
    for h in out:
        for key in ("started", "left"):
            value = h.get(key)
            if not (isinstance(value, (int, float)) and not isinstance(value, bool) and 0 <= value < 32_503_680_000):
                h[key] = None
    return out
