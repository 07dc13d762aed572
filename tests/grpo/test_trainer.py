"""The GRPO loop on a tiny real set-up: it learns, syncs, accumulates, resumes and honours its options."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch

from r1kit.grpo.batch import build_policy_batch
from r1kit.grpo.options import ConfigError
from r1kit.policy import load_policy
from tests.rollout.test_torch_engine import tiny_llama


def read_metrics(output_dir: str) -> list[dict]:
    return [json.loads(line) for line in (Path(output_dir) / "metrics.jsonl").read_text().splitlines()]


def test_training_raises_the_reward_on_fixed_prompts(make_trainer, prompts):
    trainer = make_trainer(max_steps=24, learning_rate=1e-2, beta=0.0, num_generations=8)
    trainer.collector.sampler.dataset = prompts.select(range(4))  # the same 4 prompts every step
    trainer.collector.sampler.load_state_dict({"epoch": 0, "position": 0})
    trainer.train()
    rewards = [m["reward"] for m in read_metrics(trainer.config.output_dir)]
    assert sum(rewards[-4:]) / 4 > sum(rewards[:4]) / 4 + 0.05, rewards


def test_engine_holds_the_trained_weights_and_outputs_are_written(make_trainer):
    trainer = make_trainer(max_steps=2)
    final = trainer.train()
    assert trainer.engine.policy_version == trainer.policy_version == 2
    engine_state = trainer.engine.model.state_dict()
    for name, tensor in trainer.policy.state_dict().items():
        assert torch.equal(engine_state[name], tensor), name
    output = Path(trainer.config.output_dir)
    assert len(read_metrics(output)) == 2 and (output / "report.png").stat().st_size > 10_000
    reloaded = load_policy(final)
    for name, tensor in trainer.policy.state_dict().items():
        assert torch.equal(reloaded.state_dict()[name], tensor), name


def test_gradient_accumulation_equals_one_full_batch(make_trainer):
    trainer = make_trainer(micro_batch_size=16, beta=0.1)
    scored = trainer.collector.collect(0)
    batch = build_policy_batch(scored.rollout, trainer.tokenizer.pad_token_id)
    reference = trainer.update.logprobs(trainer.update.reference, batch)
    grads = []
    for micro_batch_size in (16, 4, 1):
        trainer.update.config.micro_batch_size = micro_batch_size
        stats = trainer.update.accumulate_gradients(batch, scored.advantages, None, reference)
        grads.append(({n: p.grad.clone() for n, p in trainer.policy.named_parameters() if p.grad is not None}, stats))
        trainer.optimizer.zero_grad(set_to_none=True)
    (full, full_stats), *accumulated = grads
    for parts, stats in accumulated:
        assert parts.keys() == full.keys()
        for name in full:
            torch.testing.assert_close(parts[name], full[name], rtol=1e-4, atol=1e-7, msg=name)
        assert stats["loss"] == pytest.approx(full_stats["loss"], rel=1e-5, abs=1e-7)


def test_logprob_micro_batch_size_sets_the_no_grad_forwards_and_changes_no_logprob(make_trainer):
    trainer = make_trainer(micro_batch_size=4, beta=0.1)
    scored = trainer.collector.collect(0)
    batch = build_policy_batch(scored.rollout, trainer.tokenizer.pad_token_id)
    reference, forward = trainer.update.reference, trainer.update.reference.forward
    rows_per_forward: list[int] = []
    reference.forward = lambda input_ids, *args, **kwargs: (
        rows_per_forward.append(len(input_ids)), forward(input_ids, *args, **kwargs))[1]  # fmt: skip
    results = {}
    for size in (0, 3, len(batch)):
        trainer.update.config.logprob_micro_batch_size = size
        rows_per_forward.clear()
        results[size] = trainer.update.logprobs(reference, batch)
        rows = size or trainer.config.micro_batch_size
        assert rows_per_forward == [min(rows, len(batch) - start) for start in range(0, len(batch), rows)], size
    for size in (3, len(batch)):
        torch.testing.assert_close(results[size], results[0], rtol=1e-5, atol=1e-6)
    with pytest.raises(ConfigError, match="logprob_micro_batch_size"):
        make_trainer(logprob_micro_batch_size=-1)


def test_only_the_last_micro_batch_of_a_step_syncs_gradients(make_trainer, monkeypatch):
    """Accelerate's DeepSpeed backward steps the engine whenever `sync_gradients` is True: with 4 micro-batches
    per step it must read False three times, then True once."""
    trainer = make_trainer(micro_batch_size=4, max_steps=1)
    accelerator, seen = trainer.accelerator, []
    backward = accelerator.backward
    monkeypatch.setattr(accelerator, "backward", lambda loss: (seen.append(accelerator.sync_gradients), backward(loss)))
    trainer.train()
    assert seen == [False, False, False, True]
    assert accelerator.sync_gradients


@pytest.mark.parametrize("overlap", [False, True])
def test_resumed_run_matches_the_uninterrupted_run(make_trainer, tmp_path, overlap):
    """Killed after step 1 and resumed, a run's step 3 is the uninterrupted one's: the default KL reference
    is still the initial policy, and with overlap the batch prefetched before the kill is not sampled again."""
    run = dict(max_steps=3, overlap=overlap, learning_rate=1e-2)
    uninterrupted = make_trainer(save_steps=1, save_total_limit=None, output_dir=str(tmp_path / "a"), **run)
    uninterrupted.train()
    expected = read_metrics(tmp_path / "a")

    checkpoint = tmp_path / "a" / "checkpoint-1"  # as if the run had been killed after step 1
    resumed = make_trainer(policy=load_policy(checkpoint), output_dir=str(tmp_path / "b"), **run)
    assert resumed.resume(checkpoint) == 1
    resumed.train()
    actual = read_metrics(tmp_path / "b")
    assert [m["step"] for m in actual] == [2, 3]
    assert actual[0]["kl"] > 0  # measured against the initial policy, not the resumed weights
    for got, want in zip(actual, expected[1:], strict=True):
        for key in ("reward", "loss", "kl", "grad_norm", "entropy", "completion_length/mean", "policy_lag"):
            assert got[key] == pytest.approx(want[key], rel=1e-5, abs=1e-8), (got["step"], key)


def test_beta_zero_builds_no_reference_and_mu_reuses_old_logprobs(make_trainer):
    trainer = make_trainer(beta=0.0, num_iterations=2, max_steps=1, learning_rate=3e-2)
    assert trainer.update.reference is None
    trainer.train()
    (metrics,) = read_metrics(trainer.config.output_dir)
    assert metrics["kl"] == 0.0
    assert metrics["ratio"] != pytest.approx(1.0, abs=1e-6)  # the second pass sees updated weights


def test_each_phase_is_timed_and_unneeded_forwards_are_skipped(make_trainer):
    """At beta = 0 no reference forward runs; at mu = 1 without overlap pi_old is the policy's own forward."""
    for settings, reference, old in (({}, True, False), ({"beta": 0.0, "num_iterations": 2}, False, True)):
        trainer = make_trainer(max_steps=1, **settings)
        calls = {"reference": 0, "old": 0}
        logprobs = trainer.update.logprobs

        def counted(model, batch, logprobs=logprobs, calls=calls, trainer=trainer):
            calls["reference" if model is trainer.update.reference else "old"] += 1
            return logprobs(model, batch)

        trainer.update.logprobs = counted
        metrics = trainer.training_step()
        assert calls == {"reference": int(reference), "old": int(old)}
        assert (metrics["time/reference_s"] > 0) == reference and (metrics["time/old_logprobs_s"] > 0) == old
        for phase in ("generation", "rewards", "forward_backward", "optimizer", "sync", "step"):
            assert metrics[f"time/{phase}_s"] > 0, phase
        phases = ("generation", "rewards", "reference", "old_logprobs", "forward_backward", "optimizer", "sync")
        parts = sum(metrics[f"time/{phase}_s"] for phase in phases)
        assert parts <= metrics["time/step_s"]


def constant_for_mia(completions, prompts, **_):
    """1 for every completion of prompts about Mia (no signal), the digit share otherwise."""
    return [
        1.0 if "Mia" in p else sum(c.isdigit() for c in t) / max(len(t), 1)
        for p, t in zip(prompts, completions, strict=True)
    ]


@pytest.mark.parametrize("mode", ["drop", "refill"])
def test_dynamic_sampling(make_trainer, mode, prompts):
    mia = [i for i, p in enumerate(prompts["prompt"]) if "Mia" in p]
    others = [i for i, p in enumerate(prompts["prompt"]) if "Mia" not in p]
    trainer = make_trainer(dynamic_sampling=mode, prompts_per_step=4, max_steps=1)
    trainer.collector.rewards.functions[0] = constant_for_mia
    trainer.collector.sampler.dataset = prompts.select(mia[:2] + others)
    trainer.collector.sampler._order = list(range(len(trainer.collector.sampler.dataset)))
    trainer.train()
    (metrics,) = read_metrics(trainer.config.output_dir)
    assert metrics["dynamic_sampling/groups"] == (2 if mode == "drop" else 4)
    assert metrics["dynamic_sampling/rounds"] == (1 if mode == "drop" else 2)


def test_truncated_completions_can_be_masked_out(make_trainer):
    trainer = make_trainer(max_completion_length=2, mask_truncated_completions=True, beta=0.0, max_steps=1)
    trainer.train()
    (metrics,) = read_metrics(trainer.config.output_dir)
    assert metrics["truncated_fraction"] == 1.0 and metrics["completion_length/mean"] == 0.0
    assert metrics["loss"] == pytest.approx(metrics["aux_loss"])  # only the MoE balance loss is left


def test_overlap_samples_one_step_behind_and_corrects(make_trainer):
    trainer = make_trainer(overlap=True, max_steps=3, learning_rate=1e-2)
    trainer.train()
    metrics = read_metrics(trainer.config.output_dir)
    assert [m["policy_lag"] for m in metrics] == [0, 1, 1]
    assert metrics[0]["mismatch/abs_logp_diff"] < 1e-5 < metrics[2]["mismatch/abs_logp_diff"]


@pytest.mark.parametrize("mtp_on_completions", [True, False])
def test_mtp_modules_train_only_with_the_mtp_loss(make_trainer, debug_policy, mtp_on_completions):
    trainer = make_trainer(mtp_on_completions=mtp_on_completions, max_steps=1)
    trainer.train()
    (metrics,) = read_metrics(trainer.config.output_dir)
    assert ("mtp_loss" in metrics) == mtp_on_completions
    moved = not torch.equal(trainer.policy.mtp[0].eh_proj.weight, debug_policy.mtp[0].eh_proj.weight)
    assert moved == mtp_on_completions


def test_lora_uses_the_adapter_free_base_as_reference_and_syncs_merged_weights(make_trainer, debug_policy):
    from peft import LoraConfig, get_peft_model

    from r1kit.grpo.adapters import DEEPSEEK_V3_LORA_TARGETS, AdapterDisabledReference
    from r1kit.grpo.logprobs import TokenLogprobModel

    base = copy.deepcopy(debug_policy)
    lora = get_peft_model(
        copy.deepcopy(debug_policy), LoraConfig(r=4, lora_alpha=8, target_modules=DEEPSEEK_V3_LORA_TARGETS)
    )
    trainer = make_trainer(policy=lora, beta=0.1, max_steps=2, learning_rate=1e-2)
    assert isinstance(trainer.update.reference, AdapterDisabledReference)
    scored = trainer.collector.collect(0)
    batch = build_policy_batch(scored.rollout, trainer.tokenizer.pad_token_id)
    trainer.collector.sampler.load_state_dict({"epoch": 0, "position": 0})

    for step in range(2):
        trainer.step = step
        trainer.training_step()
    reference = trainer.update.logprobs(trainer.update.reference, batch)
    with torch.no_grad():
        base_logp = TokenLogprobModel(base)(batch.input_ids, batch.attention_mask, batch.position_ids,
                                            batch.prompt_length).logp  # fmt: skip
    mask = batch.completion_mask.bool()
    torch.testing.assert_close(reference[mask], base_logp[mask])  # the base never moved
    engine_state = {k: v.clone() for k, v in trainer.engine.model.state_dict().items()}
    merged = load_policy(trainer.save_final())  # final/ is the merged full model; the adapter is kept beside it
    assert (Path(trainer.config.output_dir) / "final" / "adapter" / "adapter_config.json").exists()
    changed = [n for n, t in merged.state_dict().items() if not torch.equal(t, base.state_dict()[n])]
    assert changed and all("proj" in n for n in changed)
    for name, tensor in merged.state_dict().items():
        torch.testing.assert_close(engine_state[name], tensor, msg=name)


def test_completions_are_written_with_their_rewards(make_trainer):
    trainer = make_trainer(max_steps=4, log_completions_steps=2)
    trainer.train()
    lines = (Path(trainer.config.output_dir) / "samples.jsonl").read_text().splitlines()
    records = [json.loads(line) for line in lines]
    assert [r["step"] for r in records] == [2] * 16 + [4] * 16  # B * G completions at steps 2 and 4
    assert {"prompt", "completion", "reward", "advantage", "rewards/digit_share"} <= records[0].keys()
    assert sum(r["advantage"] for r in records[:4]) == pytest.approx(0.0, abs=1e-5)  # one group


def test_processes_that_did_not_join_one_group_are_refused(make_trainer, monkeypatch):
    from r1kit.grpo.options import ConfigError

    monkeypatch.setenv("WORLD_SIZE", "2")  # e.g. accelerate launch --cpu --num_processes 2
    with pytest.raises(ConfigError, match="did not join one process group"):
        make_trainer()


def test_rollouts_stop_at_the_end_of_turn_ids_of_the_policys_generation_config(make_trainer, debug_policy):
    policy = copy.deepcopy(debug_policy)
    eos = policy.config.eos_token_id
    policy.generation_config.eos_token_id = [eos, 7]  # e.g. <|im_end|> beside <|endoftext|>
    trainer = make_trainer(policy=policy)
    assert trainer.tokenizer.eos_token_id == eos and trainer.collector.stop_ids == (eos, 7)


@pytest.mark.parametrize("keep", [True, False])
def test_keep_routing_and_sampling_mask_make_the_trainer_score_what_the_sampler_sampled(make_trainer, keep):
    trainer = make_trainer(keep_routing=keep, keep_sampling_mask=keep, top_k=12, top_p=0.9, max_steps=1)
    generator = torch.Generator().manual_seed(0)
    for router in trainer.collector.engine.model.routers():  # the sampler would route elsewhere
        router.e_score_correction_bias.add_(5 * torch.randn(router.num_experts, generator=generator))
    trainer.train()
    (metrics,) = read_metrics(trainer.config.output_dir)
    if keep:
        assert metrics["mismatch/abs_logp_diff"] < 1e-5
    else:
        assert metrics["mismatch/abs_logp_diff"] > 1e-2


def test_keep_routing_needs_a_moe_policy(make_trainer):
    with pytest.raises(ConfigError, match="DeepSeekMoE"):
        make_trainer(policy=tiny_llama(), keep_routing=True)


def test_speculative_rollouts_train_like_plain_ones(make_trainer):
    """With MTP speculation the sampler's log-probs are still the policy's (keep routing makes them exact) and
    the acceptance metrics are logged."""
    trainer = make_trainer(num_speculative_tokens=2, keep_routing=True, max_steps=2)
    trainer.train()
    for metrics in read_metrics(trainer.config.output_dir):
        assert 0 <= metrics["speculation/acceptance_rate"] <= 1
        assert 1 <= metrics["speculation/tokens_per_forward"] <= 3
        assert metrics["mismatch/abs_logp_diff"] < 1e-5
