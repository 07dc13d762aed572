"""The reward worker process: `python -m r1kit.rewards.worker_main`, started by `r1kit.rewards.worker_pool`.

It reads framed messages (`r1kit.rewards.channel`) on stdin and writes framed replies
on stdout:

    parent -> worker   ("load", functions_pickle, build)   once, first
                       ("score", [(task_id, fn_index, reward_batch), ...])   reward_batch: a RewardBatch
    worker -> parent   ("ready", None) | ("load_error", message)
                       ("result", task_id, scores_or_None, error_or_None, log)   one per task, in order

With `build` true the pickled objects are factories, called once in the worker
to build the reward functions (a reward model is loaded there, not pickled).
Each task is one call of one function on some completions (the whole batch, or
one completion of an element-wise function), answered before the next starts,
so the parent knows exactly which task a worker is on and can kill it when it
runs past its time limit. The function's `log_extra` and `log_metric` record
into a `RewardLog` that goes back with the scores, for the parent to replay. The
real stdin/stdout are moved aside before any reward code runs: a reward that
prints writes to stderr and cannot corrupt the channel.
"""

from __future__ import annotations

import os
import pickle
import resource
import sys
import traceback
from typing import Any, BinaryIO

from r1kit.rewards.channel import encode_frame, read_frame
from r1kit.rewards.protocol import RewardLog


def _private_channel() -> tuple[BinaryIO, BinaryIO]:
    """Move the protocol pipes off fds 0/1; point fd 0 at /dev/null and fd 1 at stderr."""
    channel_in = os.fdopen(os.dup(0), "rb")
    channel_out = os.fdopen(os.dup(1), "wb")
    devnull = os.open(os.devnull, os.O_RDONLY)
    os.dup2(devnull, 0)
    os.close(devnull)
    os.dup2(2, 1)
    return channel_in, channel_out


def _limit_memory(limit_mb: int) -> None:
    """Cap the worker's address space, so a runaway reward raises MemoryError instead of exhausting RAM."""
    if limit_mb > 0:
        limit = limit_mb * 1024 * 1024
        resource.setrlimit(resource.RLIMIT_AS, (limit, limit))


def _describe(error: BaseException) -> str:
    return "".join(traceback.format_exception_only(type(error), error)).strip()


def _call(functions: list[Any], task: tuple[Any, ...]) -> bytes:
    """Run one task; the framed reply carries the scores and the call's log, or the exception."""
    task_id, fn_index, batch = task
    log = RewardLog()
    try:
        scores = batch.score(functions[fn_index], log)
    except BaseException as error:  # SystemExit from a reward is an error too; the parent decides
        if isinstance(error, KeyboardInterrupt):
            raise
        return encode_frame(("result", task_id, None, _describe(error), RewardLog()))
    try:
        return encode_frame(("result", task_id, scores, None, log))
    except Exception as error:  # something it logged cannot travel back
        return encode_frame(("result", task_id, None, f"its log cannot be pickled: {_describe(error)}", RewardLog()))


def main(argv: list[str]) -> None:
    """Serve the parent until it closes the channel. argv: [memory limit in MiB, 0 for none]."""
    channel_in, channel_out = _private_channel()
    _limit_memory(int(argv[0]))
    _, functions_pickle, build = read_frame(channel_in)
    try:
        functions = pickle.loads(functions_pickle)
        functions = [factory() for factory in functions] if build else functions
    except Exception:  # reported to the parent, which raises naming the reward
        _send(channel_out, ("load_error", traceback.format_exc()))
        return
    _send(channel_out, ("ready", None))
    while (message := read_frame(channel_in)) is not None:
        for task in message[1]:  # answer task by task: the parent times each one
            channel_out.write(_call(functions, task))
            channel_out.flush()


def _send(channel: BinaryIO, message: Any) -> None:
    channel.write(encode_frame(message))
    channel.flush()


if __name__ == "__main__":
    main(sys.argv[1:])
