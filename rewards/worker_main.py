"""The reward worker process: `python -m r1kit.rewards.worker_main`, started by `r1kit.rewards.worker_pool`.

It reads framed messages (`r1kit.rewards.channel`) on stdin and writes framed replies
on stdout:

    parent -> worker   ("load", functions_pickle, build)   once, first
                       ("score", [(task_id, fn_index, completion, prompt, row), ...])
                       ("batch", fn_index, completions, prompts, columns)
    worker -> parent   ("ready", None) | ("load_error", message)
                       ("result", task_id, score_or_None, error_or_None)   one per task, in order
                       ("batch_result", scores_or_None, error_or_None)

With `build` true the pickled objects are factories, called once in the worker
to build the reward functions (a reward model is loaded there, not pickled).
A "score" task scores one completion with one function, so the parent knows
exactly which completion a worker is on and can kill it when that completion
runs past its time limit; a "batch" scores a whole batch in one call. The real
stdin/stdout are moved aside before any reward code runs: a reward that prints
writes to stderr and cannot corrupt the channel.
"""

from __future__ import annotations

import os
import pickle
import resource
import sys
import traceback
from typing import Any, BinaryIO

from r1kit.rewards.channel import encode_frame, read_frame
from r1kit.rewards.protocol import call_reward


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


def _score(functions: list[Any], task: tuple[Any, ...]) -> tuple[str, int, float | None, str | None]:
    task_id, fn_index, completion, prompt, row = task
    try:
        columns = {key: [value] for key, value in row.items()}
        (score,) = call_reward(functions[fn_index], [completion], [prompt], columns)
        return ("result", task_id, score, None)
    except BaseException as error:  # SystemExit from a reward is an error too; the parent decides
        if isinstance(error, KeyboardInterrupt):
            raise
        detail = "".join(traceback.format_exception_only(type(error), error)).strip()
        return ("result", task_id, None, detail)


def _score_batch(functions: list[Any], message: tuple[Any, ...]) -> tuple[str, Any, str | None]:
    _, fn_index, completions, prompts, columns = message
    try:
        return ("batch_result", call_reward(functions[fn_index], completions, prompts, columns), None)
    except Exception:
        return ("batch_result", None, traceback.format_exc())


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
        if message[0] == "batch":
            _send(channel_out, _score_batch(functions, message))
            continue
        for task in message[1]:  # answer task by task: the parent times each one
            _send(channel_out, _score(functions, task))


def _send(channel: BinaryIO, message: Any) -> None:
    channel.write(encode_frame(message))
    channel.flush()


if __name__ == "__main__":
    main(sys.argv[1:])
