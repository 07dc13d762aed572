"""Score a whole batch with one reward function in the calling process, under a time limit.

Used for rewards that must stay in the caller's process (a reward model on a
GPU, an HTTP judge, async functions, closures that cannot be pickled) and for
every reward when the suite has no worker processes. The call runs in a daemon
thread and the caller waits at most `timeout_s`; this works from any thread
(no signals). A Python thread cannot be killed, so a call that runs past its
limit is abandoned, not stopped: its completions are recorded as timed out and
its late result is ignored. Only worker processes give a hard limit.

When the batched call raises, the completions are scored one at a time (within
what is left of the time limit) so that the error is pinned on the completions
that cause it and the others keep their scores.
"""

from __future__ import annotations

import threading
import time
import traceback
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import Future
from concurrent.futures import TimeoutError as FutureTimeout
from typing import Any, TypeVar

from r1kit.rewards.protocol import RewardFn, call_reward
from r1kit.rewards.worker_pool import Outcome

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


def score_in_process(
    fn: RewardFn,
    completions: list[str],
    prompts: list[str],
    columns: Mapping[str, Sequence[Any]],
    timeout_s: float,
) -> list[Outcome]:
    """One Outcome per completion for `fn` on the whole batch (see the module docstring)."""
    deadline = time.monotonic() + timeout_s
    try:
        scores = run_with_timeout(lambda: call_reward(fn, completions, prompts, columns), timeout_s)
        return [Outcome(score=score) for score in scores]
    except TimeoutError:
        return [Outcome(timed_out=True) for _ in completions]
    except Exception as batch_error:
        if len(completions) == 1:
            return [Outcome(error=_describe(batch_error))]
    outcomes = []
    for index in range(len(completions)):
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            outcomes.append(Outcome(timed_out=True))
            continue
        row = {key: [values[index]] for key, values in columns.items()}
        try:
            (score,) = run_with_timeout(
                lambda i=index, r=row: call_reward(fn, [completions[i]], [prompts[i]], r), remaining
            )
            outcomes.append(Outcome(score=score))
        except TimeoutError:
            outcomes.append(Outcome(timed_out=True))
        except Exception as error:
            outcomes.append(Outcome(error=_describe(error)))
    return outcomes
