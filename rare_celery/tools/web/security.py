"""What keeps the console safe to run: who may use it, which requests it takes, what a page may load.

* **Bind.** The default is 127.0.0.1. Any other address needs ``--auth user:password`` (or
  ``RARE_CELERY_WEB_AUTH``): :func:`check_bind` refuses to start without it.
* **Auth.** HTTP basic auth on every path (pages, static files, ``/metrics``) when set, compared in
  constant time. Basic auth sends the password with each request: put TLS in front of anything that
  is not loopback.
* **Token.** Without ``--auth``, every request (but ``/metrics``, read only) needs the random token
  of this process that the command prints in its address (``http://127.0.0.1:5580/?token=...``, as
  Jupyter does): the first visit with it gets it as a cookie (HttpOnly, SameSite=Strict) and is sent
  on to the address without it. Any other process on the host, or a user on it, has neither; without
  it a local process could fetch a page, read its CSRF token and purge. With ``--auth``, basic auth
  is the credential.
* **Host.** Bound to loopback, only requests for a loopback host name are served (``127.0.0.1``,
  ``localhost``, ``[::1]``): a web page elsewhere cannot reach the console through DNS rebinding.
* **CSRF.** Every POST carries a token that only the console's own pages contain (a random secret
  of this process); a cross-site POST (``Sec-Fetch-Site: cross-site`` or a foreign ``Origin``) is
  refused too.
* **Pages.** Jinja2 escapes everything (task names, errors, tracebacks, args, headers: all come from
  messages any producer may send); ``Content-Security-Policy`` allows scripts, styles and images
  only from the console itself, no inline script, no frames; nothing is fetched from anywhere else.
"""

from __future__ import annotations

import base64
import binascii
import hmac
import ipaddress
import os
import secrets

AUTH_ENV = "RARE_CELERY_WEB_AUTH"
LOOPBACK_NAMES = {"127.0.0.1", "localhost", "::1", "[::1]"}
CSP = ("default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; connect-src 'self'; "
       "form-action 'self'; frame-ancestors 'none'; base-uri 'none'")
HEADERS = {
    "Content-Security-Policy": CSP,
    "X-Content-Type-Options": "nosniff",
    "X-Frame-Options": "DENY",
    "Referrer-Policy": "same-origin",
    "Cache-Control": "no-store",
    "Cross-Origin-Opener-Policy": "same-origin",
    "Cross-Origin-Resource-Policy": "same-origin",
}


class BadSetting(ValueError):
    """A setting the console will not start with; the text says what to do."""


def is_loopback(host: str) -> bool:
    if host in LOOPBACK_NAMES:
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def parse_auth(value: str | None) -> tuple[str, str] | None:
    """``user:password`` (the option, else the environment variable) as a pair, or ``None``."""
    value = value if value is not None else os.environ.get(AUTH_ENV)
    if value is None or value == "":
        return None
    user, sep, password = value.partition(":")
    if not sep or not user or not password:
        raise BadSetting(f"--auth (or {AUTH_ENV}) must be user:password, both non-empty")
    return user, password


def check_bind(host: str, auth: tuple[str, str] | None) -> None:
    if not is_loopback(host) and auth is None:
        raise BadSetting(f"binding {host} makes the console reachable from other machines: pass --auth "
                         f"user:password (or set {AUTH_ENV}), or bind 127.0.0.1")


class Guard:
    """The per-process secrets and the checks every request goes through."""

    def __init__(self, auth: tuple[str, str] | None, loopback_only: bool, pages: bool = True) -> None:
        self.auth = auth
        self.loopback_only = loopback_only
        self.csrf = secrets.token_urlsafe(32)
        self.token = secrets.token_urlsafe(24) if pages and auth is None else None

    @staticmethod
    def cookie(port: str) -> str:
        """The token's cookie name: one per port (cookies do not tell ports apart; two consoles may run)."""
        return f"rare_celery_token_{port}"

    def token_ok(self, given: str | None) -> bool:
        return self.token is None or (given is not None and hmac.compare_digest(given.encode(), self.token.encode()))

    def authorized(self, header: str | None) -> bool:
        if self.auth is None:
            return True
        if not header or not header.startswith("Basic "):
            return False
        try:
            user, _, password = base64.b64decode(header[6:], validate=True).decode("utf-8").partition(":")
        except (binascii.Error, UnicodeDecodeError):
            return False
        ok_user = hmac.compare_digest(user.encode(), self.auth[0].encode())
        ok_password = hmac.compare_digest(password.encode(), self.auth[1].encode())
        return ok_user and ok_password

    def host_allowed(self, host_header: str | None) -> bool:
        if not self.loopback_only:
            return True
        host = (host_header or "").strip()
        if host.startswith("["):
            name = host[: host.find("]") + 1] if "]" in host else host
        else:
            name = host.rsplit(":", 1)[0] if host.count(":") == 1 else host
        return is_loopback(name.lower())

    def post_allowed(self, token: str | None, origin: str | None, fetch_site: str | None, host: str | None) -> bool:
        if not token or not hmac.compare_digest(token.encode(), self.csrf.encode()):
            return False
        if fetch_site is not None:  # browsers since 2020-2023 say where a request comes from
            return fetch_site in ("same-origin", "none")
        if origin and origin != "null":
            return origin.split("://", 1)[-1] == (host or "")
        return True
