"""Fake outside services that fail the ways real ones do, so the demo shows every path.

Each fake decides by the recipient and the attempt number (``task.attempt``), never by how often
it was called, so the demo tells the same story in every run and every worker process.
"""

from __future__ import annotations


class GatewayError(Exception):
    """A channel could not deliver (retryable)."""


class FakeGateway:
    """Delivers, except to ``unreachable`` recipients, and not on the first ``busy_attempts`` tries."""

    def __init__(self, channel: str, unreachable: set[str], busy_attempts: int = 0) -> None:
        self.channel, self.unreachable, self.busy_attempts = channel, unreachable, busy_attempts

    def send(self, to: str, text: str, attempt: int) -> str:
        if to in self.unreachable:
            raise GatewayError(f"{self.channel}: {to} is unreachable")
        if attempt <= self.busy_attempts:
            raise GatewayError(f"{self.channel}: gateway busy, try later")
        return f"{self.channel} to {to}: {text!r}"


SMS = FakeGateway("sms", {"+15550002", "+15550003", "+15550004"}, busy_attempts=1)
EMAIL = FakeGateway("email", {"carol@example.com", "dave@example.com"})
PUSH = FakeGateway("push", {"device-dave"})


class Declined(Exception):
    """The payment provider declined the charge (retryable: funds may arrive)."""


class FakePsp:
    """Accounts: ``sub-ok`` has funds from the third try on, ``sub-broke`` never, ``sub-expired``
    has an expired card."""

    def charge(self, subscription_id: str, attempt: int) -> dict:
        if subscription_id == "sub-expired":
            return {"ok": False, "card_expired": True}
        if subscription_id == "sub-ok" and attempt >= 3:
            return {"ok": True, "card_expired": False}
        raise Declined(f"{subscription_id}: insufficient funds")


PSP = FakePsp()
