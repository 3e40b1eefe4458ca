"""How a training process is stopped without losing work: Ctrl-C (SIGINT), and SIGTERM where the job asks for it.

A stop request becomes a KeyboardInterrupt that leaves the loop only between whole batches (`deferred_interrupt`
holds it during an update, a weight sync or a checkpoint write); the job then writes a checkpoint and exits, and
`--resume` continues.

Two rules keep this predictable:
- A signal the process was started with ignored stays ignored. A non-interactive shell starts a background job
  (`cmd &`, nohup) with SIGINT ignored; an earlier version switched catching on inside every deferred block, so
  such a run stopped on SIGINT only when the signal happened to land in an update and ignored it otherwise (the
  lost Ctrl-C seen in CI). Such a run is stopped with SIGTERM instead.
- SIGTERM (what `kill`, schedulers and container runtimes send) is made graceful only by `graceful_termination`,
  which the single-process job enters; elsewhere it keeps the OS default (the process ends at once).
"""

from __future__ import annotations

import contextlib
import signal
import threading
from collections.abc import Iterator

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)


def _in_main_thread() -> bool:
    return threading.current_thread() is threading.main_thread()


@contextlib.contextmanager
def deferred_interrupt() -> Iterator[None]:
    """Hold stop signals until the block ends, so an update is never cut between optimizer steps (a checkpoint
    written after it is then consistent); the held signal's own handler runs when the block exits (for Ctrl-C:
    KeyboardInterrupt). Only signals with a Python handler are held: an ignored or OS-default one is left as it is.
    Outside the main thread (where Python cannot set handlers) the block runs unguarded."""
    if not _in_main_thread():
        yield
        return
    held = {s: h for s in STOP_SIGNALS if callable(h := signal.getsignal(s))}
    pending: list[signal.Signals] = []
    for s in held:
        signal.signal(s, lambda signum, _frame: pending.append(signal.Signals(signum)))
    try:
        yield
    finally:
        for s, h in held.items():
            signal.signal(s, h)
    if pending:
        handler = held[pending[0]]
        assert callable(handler)
        handler(pending[0], None)


@contextlib.contextmanager
def graceful_termination() -> Iterator[bool]:
    """Inside the block SIGTERM stops the run like Ctrl-C (a KeyboardInterrupt, deferred to the end of the batch),
    if SIGTERM still has the OS default action and this is the main thread; yields whether it did. The previous
    handler is restored on exit. Not for torchrun ranks: the launcher's SIGTERM must end every rank together."""
    if not _in_main_thread() or signal.getsignal(signal.SIGTERM) is not signal.SIG_DFL:
        yield False
        return
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    try:
        yield True
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)


def sigint_ignored() -> bool:
    """Whether Ctrl-C is ignored by this process (inherited SIG_IGN: started in the background by a shell)."""
    return signal.getsignal(signal.SIGINT) is signal.SIG_IGN
