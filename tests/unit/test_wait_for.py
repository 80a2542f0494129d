"""The polling helper every cluster test leans on: it polls through errors on the way and fails at
once on a predicate's AssertionError, so a wrong outcome is reported as itself, not as a timeout."""
from __future__ import annotations

import time

import pytest

from kubetools import KubectlError, wait_for


def test_polls_through_transient_errors_until_truthy() -> None:
    calls = []

    def flaky() -> str | None:
        calls.append(1)
        if len(calls) < 3:
            raise KubectlError("the connection to the server was refused")
        return "ready"

    assert wait_for(flaky, 5, interval=0.01) == "ready"
    assert len(calls) == 3


def test_an_assertion_in_the_predicate_fails_at_once() -> None:
    def wrong() -> bool:
        raise AssertionError("phase is Failed, not Running")

    started = time.monotonic()
    with pytest.raises(AssertionError, match="phase is Failed"):
        wait_for(wrong, 30, interval=0.01)
    assert time.monotonic() - started < 5


def test_a_timeout_names_what_it_waited_for_and_the_last_error() -> None:
    def never() -> None:
        raise KubectlError("NotReady")

    with pytest.raises(AssertionError, match=r"timed out after 0.2s waiting for the pool \(last error: NotReady\)"):
        wait_for(never, 0.2, interval=0.01, what="the pool")
