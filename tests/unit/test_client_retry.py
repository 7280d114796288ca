"""Retry policy: backoff bounds, attempt counting, and which errors are retried."""

from __future__ import annotations

import random

import pytest

from kmsctl import NotFoundError, RetryPolicy, UnavailableError
from kmsctl._retry import call_with_retry


def test_backoff_grows_exponentially_with_full_jitter_up_to_the_cap() -> None:
    policy = RetryPolicy(max_attempts=10, initial_backoff=0.5, max_backoff=4.0, multiplier=2.0)
    rng = random.Random(7)
    for retry, ceiling in [(1, 0.5), (2, 1.0), (3, 2.0), (4, 4.0), (5, 4.0), (9, 4.0)]:
        samples = [policy.backoff(retry, rng) for _ in range(200)]
        assert all(0.0 <= sample <= ceiling for sample in samples)
        assert max(samples) > 0.8 * ceiling, "jitter spreads over the whole range"


def test_retries_only_unavailable_and_sleeps_between_attempts() -> None:
    sleeps: list[float] = []
    outcomes: list[Exception | str] = [UnavailableError("down"), UnavailableError("down"), "ok"]

    def attempt() -> str:
        outcome = outcomes.pop(0)
        if isinstance(outcome, Exception):
            raise outcome
        return outcome

    policy = RetryPolicy(max_attempts=3, initial_backoff=1.0, max_backoff=10.0)
    assert call_with_retry(attempt, policy, rng=random.Random(1), sleep=sleeps.append) == "ok"
    assert len(sleeps) == 2
    assert 0 <= sleeps[0] <= 1.0 and 0 <= sleeps[1] <= 2.0


def test_gives_up_after_max_attempts_naming_the_count() -> None:
    attempts: list[int] = []

    def attempt() -> None:
        attempts.append(1)
        raise UnavailableError("HSM unreachable")

    with pytest.raises(UnavailableError, match=r"^HSM unreachable \(after 4 attempts\)$") as raised:
        call_with_retry(attempt, RetryPolicy(), rng=random.Random(), sleep=lambda _: None)
    assert len(attempts) == 4
    assert isinstance(raised.value.__cause__, UnavailableError)


def test_other_errors_are_raised_at_once() -> None:
    attempts: list[int] = []

    def attempt() -> None:
        attempts.append(1)
        raise NotFoundError("no such key")

    with pytest.raises(NotFoundError):
        call_with_retry(attempt, RetryPolicy(), rng=random.Random(), sleep=lambda _: None)
    assert attempts == [1]


@pytest.mark.parametrize(
    "arguments",
    [{"max_attempts": 0}, {"initial_backoff": -1.0}, {"max_backoff": -1.0}, {"multiplier": 0.5}],
)
def test_invalid_policies_are_refused(arguments: dict[str, float]) -> None:
    with pytest.raises(ValueError):
        RetryPolicy(**arguments)  # type: ignore[arg-type]
