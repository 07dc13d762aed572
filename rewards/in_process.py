"""Score a whole batch with one reward function in the calling process, under a time limit.

Used for rewards that must stay in the caller's process (a reward model on a
GPU, an HTTP judge, async functions, closures that cannot be pickled) and for
every reward when the suite has no worker processes. The call runs in a daemon
thread and the caller waits at most `timeout_s`; this works from any thread
(no signals). A Python thread cannot be killed, so a call that runs past its
limit is abandoned, not stopped: its completions are recorded as timed out and
its late result (and whatever it logs) is ignored. Only worker processes give a
hard limit.

When the whole-batch call raises, the completions are scored one at a time (within
what is left of the time limit) so that the error is pinned on the completions
that cause it and the others keep their scores.
"""

from __future__ import annotations

import functools
import threading
import time
import traceback
from collections.abc import Callable
from concurrent.futures import Future
from concurrent.futures import TimeoutError as FutureTimeout
from typing import TypeVar

from r1kit.rewards.protocol import RewardBatch, RewardFn, RewardLog
from r1kit.rewards.worker_pool import Calls, Outcome

T = TypeVar("T")


def run_with_timeout(call: Callable[[], T], timeout_s: float) -> T:
    """`call()` in a daemon thread; raises TimeoutError after `timeout_s`, or what `call` raised."""
    future: Future[T] = Future()

    def target() -> None:
        try:
            future.set_result(call())
        except Exception as error:
            future.set_exception(error)
        except BaseException as error:  # SystemExit from a reward must not end the caller's run
            future.set_exception(RuntimeError(f"reward raised {type(error).__name__}: {error}"))

    threading.Thread(target=target, name="reward-call", daemon=True).start()
    try:
        return future.result(timeout=max(timeout_s, 0.0))
    except FutureTimeout:
        raise TimeoutError(f"reward call exceeded {timeout_s} s") from None


def _describe(error: BaseException) -> str:
    return "".join(traceback.format_exception_only(type(error), error)).strip()


def _call(fn: RewardFn, batch: RewardBatch, timeout_s: float) -> Outcome:
    """One call of `fn` on `batch` within `timeout_s`, with its own log."""
    log = RewardLog()
    try:
        return Outcome(scores=run_with_timeout(functools.partial(batch.score, fn, log), timeout_s), log=log)
    except TimeoutError:
        return Outcome(error=f"the call exceeded {timeout_s} s and was abandoned", timed_out=True)
    except Exception as error:
        return Outcome(error=_describe(error), raised=True)


def score_in_process(fn: RewardFn, batch: RewardBatch, timeout_s: float) -> Calls:
    """The calls that scored `batch` with `fn` (see the module docstring), each with the completions it covered."""
    deadline = time.monotonic() + timeout_s
    everything = tuple(range(len(batch)))
    outcome = _call(fn, batch, timeout_s)
    if not outcome.raised or len(batch) == 1:
        return [(everything, outcome)]
    calls: Calls = []
    for index in everything:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            calls.append(((index,), Outcome(error=f"the batch exceeded {timeout_s} s", timed_out=True)))
        else:
            calls.append(((index,), _call(fn, batch.select([index]), remaining)))
    return calls
