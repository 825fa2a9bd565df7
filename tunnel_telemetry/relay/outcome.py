"""What happened to one report at one destination, as the relay queue records it."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

DELIVERED, PENDING, FAILED, SKIPPED, EXPIRED = (
    "delivered", "pending", "failed", "skipped", "expired",
)
_UNPRINTABLE = re.compile(r"[^\x20-\x7e]+")


@dataclass(frozen=True)
class Outcome:
    """What happened to one report at one destination.

    ``state`` is the relay-queue state to record (delivered, pending = retry later, failed =
    permanent, skipped = never sent); ``reason`` is a short code for logs and responses;
    ``detail`` the secondary's own one-line explanation, if any. ``maybe``: the report was
    sent and the destination may have kept it (no answer in time, or OONI's ``{}``): it is
    confirmed, or sent again, only after relay-confirm-delay.
    """

    state: str
    reason: str
    detail: str = ""
    result: dict[str, Any] = field(default_factory=dict)
    retry_after: float | None = None
    maybe: bool = False

    @property
    def retryable(self) -> bool:
        """True when the report should be tried again later."""
        return self.state == PENDING

    @classmethod
    def delivered(cls, **result: Any) -> Outcome:  # noqa: ANN401
        """A success, with what the secondary returned (e.g. ``measurement_uid``)."""
        return cls(DELIVERED, "ok", result=result)

    @classmethod
    def retry(cls, reason: str, detail: str = "", retry_after: float | None = None) -> Outcome:
        """A failure worth retrying."""
        return cls(PENDING, reason, detail, retry_after=retry_after)

    @classmethod
    def maybe_delivered(cls, reason: str, detail: str = "", **result: Any) -> Outcome:  # noqa: ANN401
        """Sent, and perhaps kept: wait, then confirm (OONI) or send again."""
        return cls(PENDING, reason, detail, result={**result, "maybe": True}, maybe=True)

    @classmethod
    def failed(cls, reason: str, detail: str = "") -> Outcome:
        """A permanent failure: the report is kept but never sent there again."""
        return cls(FAILED, reason, detail)

    @classmethod
    def skipped(cls, reason: str) -> Outcome:
        """Not sent on purpose (the secondary would drop it, or already has it)."""
        return cls(SKIPPED, reason)

    def describe(self) -> str:
        """One line for logs and the store's error column: reason, then detail."""
        return f"{self.reason}: {self.detail}" if self.detail else self.reason


def one_line(text: object, limit: int = 200) -> str:
    """Make ``text`` safe for a log line or a response: printable ASCII, bounded length."""
    return _UNPRINTABLE.sub(" ", str(text)).strip()[:limit]


# Retryable failures that say the destination, not the report, is in trouble.
DESTINATION_REASONS = frozenset({
    "timeout", "connection-error", "rate-limited", "request-error", "bad-answer", "unauthorized",
})


def is_destination_failure(outcome: Outcome) -> bool:
    """True when further reports to the same destination would fail the same way now."""
    return outcome.retryable and (outcome.reason in DESTINATION_REASONS
                                  or outcome.reason.startswith("http-5"))
