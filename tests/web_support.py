"""Test support for the web console: ``rare-celery ... web`` in a subprocess, and HTTP without a browser."""

from __future__ import annotations

import base64
import contextlib
import html
import os
import re
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass

from tests.support import ROOT, wait_for


@dataclass
class Page:
    status: int
    text: str
    headers: dict
    url: str

    def csrf(self) -> str:
        return html.unescape(re.search(r'name="csrf" value="([^"]+)"', self.text).group(1))

    def links(self, css_class: str) -> list[str]:
        return [html.unescape(h) for h in re.findall(rf'class="{css_class}" href="([^"]+)"', self.text)]


class WebServer:
    """``rare-celery <args> web --port 0`` (or ``metrics``), its address read from what it prints."""

    def __init__(self, *args: str, command: str = "web", env: dict | None = None, celery: bool = False,
                 auth: tuple[str, str] | None = None) -> None:
        cmd = ([sys.executable, "-m", "celery", *args, "rare", command] if celery
               else [sys.executable, "-m", "rare_celery.tools.cli", *args, command])
        self.auth = auth
        self.proc = subprocess.Popen([*cmd, "--port", "0"], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                     text=True, env={**os.environ, "PYTHONPATH": str(ROOT), **(env or {})},
                                     start_new_session=True)
        self.first_line = self.proc.stdout.readline()
        found = re.search(r"(http://[^/\s]+)(/\S*) ", self.first_line)
        if not found:
            self.proc.kill()
            raise AssertionError(f"no address printed: {self.first_line!r} {self.proc.stderr.read()[-2000:]}")
        self.url = found.group(1)  # without the token
        self.start_url = found.group(1) + found.group(2)  # as printed: a browser opens this first
        token = re.search(r"[?&]token=([^&\s]+)", found.group(2))
        self.token = token.group(1) if token else None
        self.cookie = f"rare_celery_token_{self.url.rsplit(':', 1)[1]}={self.token}" if self.token else None

    def _request(self, path: str, data: dict | list | None = None, headers: dict | None = None) -> Page:
        body = None if data is None else urllib.parse.urlencode(data, doseq=True).encode()
        request = urllib.request.Request(self.url + path, data=body, headers=dict(headers or {}))
        if self.cookie and "Cookie" not in request.headers:  # what a browser that opened start_url sends
            request.add_header("Cookie", self.cookie)
        if self.auth and "Authorization" not in request.headers:
            token = base64.b64encode(f"{self.auth[0]}:{self.auth[1]}".encode()).decode()
            request.add_header("Authorization", f"Basic {token}")

        class NoRedirect(urllib.request.HTTPRedirectHandler):
            def redirect_request(self, *a, **k):
                return None

        opener = urllib.request.build_opener(NoRedirect)
        try:
            with opener.open(request, timeout=120) as r:
                return Page(r.status, r.read().decode(), dict(r.headers), r.url)
        except urllib.error.HTTPError as e:
            return Page(e.code, e.read().decode(errors="replace"), dict(e.headers), self.url + path)

    def get(self, path: str, **headers) -> Page:
        return self._request(path, headers=headers)

    def post(self, path: str, data, **headers) -> Page:
        return self._request(path, data, headers)

    def page(self, path: str, timeout: float = 60) -> Page:
        """GET ``path``, following a read in progress (a page that says "Reading") until it is done."""
        def ready():
            p = self.get(path)
            return p if 'id="job" ' not in p.text or "data-state=\"running\"" not in p.text else None
        return wait_for(ready, timeout, 0.2, f"{path} to be read")

    def job(self, location: str, timeout: float = 120) -> Page:
        """Follow a job page (after a POST's redirect) until it is no longer running."""
        path = urllib.parse.urlsplit(location).path
        def done():
            p = self.get(path)
            return p if 'data-state="running"' not in p.text else None
        return wait_for(done, timeout, 0.1, f"job {path}")

    def stop(self) -> str:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        return self.proc.stdout.read() + self.proc.stderr.read()


def text_of(page_html: str) -> str:
    """The page as text, roughly: tags removed, entities decoded, whitespace collapsed."""
    return " ".join(html.unescape(re.sub(r"<[^>]+>", " ", page_html)).split())


def until(predicate, timeout: float = 30, what: str = "condition"):
    return wait_for(predicate, timeout, 0.1, what)


def now() -> float:
    return time.time()


@contextlib.contextmanager
def console_client(broker_url: str):
    """The console of ``rare-celery --broker URL web`` in this process (no event receiver), as a Flask
    test client that sends what a browser that opened the printed address would."""
    from rare_celery.tools.cli import Env
    from rare_celery.tools.web.server import build

    wsgi, _, _ = build(Env(None, broker_url), None, True, events=False)
    client = wsgi.test_client()
    client.get("/?token=" + wsgi.extensions["rare_celery_guard"].token)  # its cookie, as a browser gets it
    yield client
