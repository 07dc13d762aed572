"""Worker options: validated, and the command line a trainer builds parses back to the same options."""

import pytest
from transformers import HfArgumentParser

from r1kit.rollout.serve import ServeArguments, WorkerOptions, worker_command


def test_command_line_round_trip() -> None:
    options = WorkerOptions(dtype="float32", num_threads=2, max_batch_rows=64, enforce_eager=True)
    command = worker_command("/ckpt", options, port_file="/tmp/p", parent_pid=42)
    assert command[1:3] == ["-m", "r1kit.rollout.serve"]
    serve, parsed = HfArgumentParser((ServeArguments, WorkerOptions)).parse_args_into_dataclasses(command[3:])
    assert parsed == options
    assert (serve.model, serve.port, serve.port_file, serve.parent_pid, serve.exit_with_client) == (
        "/ckpt",
        0,
        "/tmp/p",
        42,
        True,
    )
    assert serve.host == "127.0.0.1"


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"engine": "tgi"}, "engine"),
        ({"max_batch_rows": 0}, "max_batch_rows"),
        ({"tensor_parallel_size": 2}, "needs engine='vllm'"),
        ({"engine": "vllm", "gpu_memory_utilization": 1.5}, "gpu_memory_utilization"),
        ({"num_threads": 0}, "num_threads"),
    ],
)
def test_bad_options_name_the_field(fields: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        WorkerOptions(**fields)
