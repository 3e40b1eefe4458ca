"""Stop signals: held until a block ends, never switched on where the process ignores them, SIGTERM graceful only
where asked. Real signals, raised in this (main) thread."""

from __future__ import annotations

import signal
import time

import pytest

from alp_agent.train.signals import deferred_interrupt, graceful_termination, sigint_ignored


@pytest.fixture
def restore_handlers():
    saved = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    yield
    for s, h in saved.items():
        signal.signal(s, h)


def _deliver(sig: signal.Signals) -> None:
    """Raise `sig` in this thread and give Python a few bytecodes to run its handler."""
    signal.raise_signal(sig)
    time.sleep(0.01)


def test_ctrl_c_is_held_to_the_end_of_the_block(restore_handlers):
    signal.signal(signal.SIGINT, signal.default_int_handler)
    reached = []
    with pytest.raises(KeyboardInterrupt), deferred_interrupt():
        _deliver(signal.SIGINT)
        reached.append("after the signal")  # the block was not cut
    assert reached == ["after the signal"]
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


def test_an_ignored_sigint_stays_ignored_inside_the_block(restore_handlers):
    """The lost Ctrl-C: a background job (SIGINT ignored) used to catch SIGINT only inside deferred blocks."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    assert sigint_ignored()
    with deferred_interrupt():
        assert signal.getsignal(signal.SIGINT) is signal.SIG_IGN
        _deliver(signal.SIGINT)
    assert signal.getsignal(signal.SIGINT) is signal.SIG_IGN


def test_a_custom_handler_runs_once_after_the_block(restore_handlers):
    seen = []
    signal.signal(signal.SIGINT, lambda signum, _frame: seen.append(signum))
    with deferred_interrupt():
        _deliver(signal.SIGINT)
        _deliver(signal.SIGINT)
        assert seen == []
    assert seen == [signal.SIGINT]


def test_sigterm_is_graceful_only_inside_graceful_termination(restore_handlers):
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    with graceful_termination() as on:
        assert on is True
        with pytest.raises(KeyboardInterrupt), deferred_interrupt():
            _deliver(signal.SIGTERM)
        with pytest.raises(KeyboardInterrupt):
            _deliver(signal.SIGTERM)  # outside a deferred block: at once
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL


def test_graceful_termination_leaves_a_handler_someone_else_set(restore_handlers):
    mine = lambda *_: None  # noqa: E731
    signal.signal(signal.SIGTERM, mine)
    with graceful_termination() as on:
        assert on is False and signal.getsignal(signal.SIGTERM) is mine
    assert signal.getsignal(signal.SIGTERM) is mine
