"""Control messages: a batch survives the trip through a pickled Generated exactly."""

import pickle

import torch

from r1kit.rollout.engine import RolloutBatch
from r1kit.rollout.messages import Generated


def test_generated_round_trip_is_exact() -> None:
    prompts = [[5, 6], [7]]
    logprobs = [torch.randn(3), torch.randn(1), torch.zeros(0), torch.randn(2)]
    batch = RolloutBatch(
        prompt_ids=[[5, 6], [5, 6], [7], [7]],
        completion_ids=[[1, 2, 3], [4], [], [8, 9]],
        completion_text=["a", "b", "", "c"],
        sampler_logprobs=logprobs,
        finish_reason=["length", "stop", "length", "stop"],
        policy_version=7,
    )
    back = pickle.loads(pickle.dumps(Generated.from_batch(batch))).to_batch(prompts, n=2)
    assert back.prompt_ids == batch.prompt_ids and back.completion_ids == batch.completion_ids
    assert back.finish_reason == batch.finish_reason and back.completion_text == batch.completion_text
    assert back.policy_version == 7
    for received, sent in zip(back.sampler_logprobs, logprobs, strict=True):
        assert received.dtype == torch.float32 and torch.equal(received, sent)
