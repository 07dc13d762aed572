"""Our GRPO loss and advantages equal those of TRL's GRPOTrainer on the same inputs.

One tiny DeepSeek-V3 policy (our "tiny-debug" preset) is scored twice on the
same hand-built batch laid out as [left-padded prompt | right-padded completion]:
by TRL 1.16's `GRPOTrainer._compute_loss` (its own fused log-prob head) and by
our `TokenLogprobModel` + `grpo_loss`. Old log-probs differ from the current
ones, so both clip ranges (epsilon = 0.2, epsilon_high = 0.28) are active.
Both losses are computed micro-batch by micro-batch (two micro-batches, TRL's
gradient_accumulation_steps = 2) and compared, with the accumulated gradients.
TRL passes no position ids (left padding shifts every position of a row by the
same amount) while ours count real tokens only; rotary embeddings depend on
position differences alone, so the log-probs agree.

How TRL's settings map onto ours:

    TRL loss_type  TRL normaliser of one micro-batch               ours
    grpo           sum_i mean_t(loss_it) / n_micro / GA            aggregation="sequence_mean", num_sequences = N
    dr_grpo        sum_it loss_it / (n_micro * max_compl_len) / GA aggregation="constant", num_sequences = N,
                                                                   max_length = max_completion_length
    dapo           sum_it loss_it / num_items_in_batch             aggregation="token_mean", num_tokens = tokens
                   (tokens of the whole generation batch, when     of the whole batch (what PolicyUpdate passes)
                   steps_per_generation == GA, one process)
    bnpo           sum_it loss_it / tokens of the micro-batch / GA aggregation="token_mean", num_tokens =
                                                                   tokens of the micro-batch * GA

(N = n_micro * GA rows in the optimizer batch.) bnpo is therefore a mean of
per-micro-batch token means: it equals our full-batch token mean (and TRL's
dapo) only when every micro-batch holds the same number of tokens; our
`token_mean` always divides by the whole batch's tokens, i.e. it is TRL's dapo.

importance_sampling_level="sequence" against our "gspo" objective: both use
s_i = exp(mean_t(logp - old_logp)) over the completion's tokens, clip it to
[1 - epsilon, 1 + epsilon_high], and add the per-token k3 KL when beta > 0, so
the losses match for every aggregation above; TRL's sequence-level "grpo" is the
GSPO paper's 1/G sum_i objective. The only difference is in the logged clip
fractions (TRL counts clipped sequences, we count clipped tokens), not tested here.

The KL term: TRL 1.16 defaults to use_bias_correction_kl=True, which multiplies
the per-token k3 by the (differentiable) importance ratio, DeepSeek-V3.2's
unbiased reverse-KL estimator; our default is DeepSeekMath's plain k3, which TRL
computes with use_bias_correction_kl=False. The parity tests set it to False;
one test checks TRL's default against our kl_estimator="k3_unbiased".

Advantages: TRL computes them inline in `_generate_and_score_completions`; the
tests run that method itself (generation by the policy, a recorded reward
function) and compare its advantages with ours on the recorded rewards:
scale_rewards="group" against our "grpo" estimator, "none" against "dr_grpo".
"""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch
from datasets import Dataset
from torch import Tensor
from trl import GRPOConfig as TRLConfig
from trl import GRPOTrainer as TRLTrainer

from r1kit.grpo.advantages import compute_advantages
from r1kit.grpo.logprobs import TokenLogprobModel
from r1kit.grpo.loss import grpo_loss, k3_kl
from r1kit.policy import DeepseekV3ForCausalLM, load_policy, preset_config
from r1kit.policy.transformers_compat import ACTIVATION_CHECKPOINTING
from r1kit.recipes.tasks.arithmetic import arithmetic_dataset

NUM_ROWS, MICRO_BATCH = 8, 4  # TRL: gradient_accumulation_steps = NUM_ROWS // MICRO_BATCH
PROMPT_WIDTH, COMPLETION_WIDTH = 7, 6
MAX_COMPLETION_LENGTH = 10  # > COMPLETION_WIDTH, so dr_grpo's normaliser is not the padded width
EPSILON, EPSILON_HIGH = 0.2, 0.28


@pytest.fixture(scope="module")
def policy_dir(arithmetic_tokenizer, tmp_path_factory):
    """A saved random tiny-debug policy: TRL builds its reference model (beta > 0) from this path."""
    tok = arithmetic_tokenizer
    config = preset_config(
        "tiny-debug", vocab_size=len(tok), pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id
    )
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("policy")
    DeepseekV3ForCausalLM(config).save_pretrained(path)
    tok.save_pretrained(path)
    return path


def trl_trainer(policy_dir, tokenizer, tmp_path, reward=None, **settings) -> TRLTrainer:
    """TRL's GRPOTrainer on a fresh copy of the saved policy, fp32 on CPU, in training mode."""
    settings = {"max_completion_length": MAX_COMPLETION_LENGTH, **settings}
    args = TRLConfig(
        output_dir=str(tmp_path / "trl"),
        per_device_train_batch_size=MICRO_BATCH,
        gradient_accumulation_steps=NUM_ROWS // MICRO_BATCH,
        num_generations=4,
        epsilon=EPSILON,
        epsilon_high=EPSILON_HIGH,
        use_bias_correction_kl=False,  # TRL's default weights the KL by the ratio; see the module docstring
        bf16=False,
        **{ACTIVATION_CHECKPOINTING: False},
        use_cpu=True,
        use_vllm=False,
        report_to="none",
        save_strategy="no",
        **settings,
    )
    prompts = Dataset.from_dict({"prompt": ["Question: 1 + 1?\n"] * NUM_ROWS})
    trainer = TRLTrainer(
        model=load_policy(policy_dir),
        reward_funcs=reward or (lambda completions, **_: [0.0] * len(completions)),
        args=args,
        train_dataset=prompts,
        processing_class=tokenizer,
    )
    trainer.model.train()
    # Set by transformers' training loop for every accumulation window; _compute_loss divides by it.
    trainer.current_gradient_accumulation_steps = args.gradient_accumulation_steps
    return trainer


@dataclass
class Batch:
    """NUM_ROWS sequences in both layouts, with the loss inputs.

    TRL's: prompt_ids / prompt_mask (N, P) left-padded, completion_ids / completion_mask (N, T) right-padded.
    Ours: input_ids / attention_mask / position_ids (N, P + T), positions counting real tokens.
    """

    prompt_ids: Tensor
    prompt_mask: Tensor
    completion_ids: Tensor
    completion_mask: Tensor
    advantages: Tensor
    old_logp: Tensor | None = None
    ref_logp: Tensor | None = None

    @property
    def input_ids(self) -> Tensor:
        return torch.cat([self.prompt_ids, self.completion_ids], dim=1)

    @property
    def attention_mask(self) -> Tensor:
        return torch.cat([self.prompt_mask, self.completion_mask], dim=1)

    @property
    def position_ids(self) -> Tensor:
        return (self.attention_mask.cumsum(dim=1) - 1).clamp(min=0)


def hand_built_batch(tokenizer, seed: int = 0) -> Batch:
    """Random prompts (3..P tokens) and completions (1..T tokens, one of each length extreme), mixed-sign advantages."""
    g = torch.Generator().manual_seed(seed)
    prompt_lengths = torch.randint(3, PROMPT_WIDTH + 1, (NUM_ROWS,), generator=g)
    completion_lengths = torch.randint(1, COMPLETION_WIDTH + 1, (NUM_ROWS,), generator=g)
    completion_lengths[0], completion_lengths[-1] = COMPLETION_WIDTH, 1
    columns = torch.arange(PROMPT_WIDTH)
    prompt_mask = (columns[None] >= PROMPT_WIDTH - prompt_lengths[:, None]).long()
    completion_mask = (torch.arange(COMPLETION_WIDTH)[None] < completion_lengths[:, None]).long()
    low, high = max(tokenizer.pad_token_id, tokenizer.eos_token_id) + 1, len(tokenizer)  # never pad or eos
    prompt_ids = torch.randint(low, high, (NUM_ROWS, PROMPT_WIDTH), generator=g)
    completion_ids = torch.randint(low, high, (NUM_ROWS, COMPLETION_WIDTH), generator=g)
    pad = tokenizer.pad_token_id
    advantages = torch.randn(NUM_ROWS, generator=g)
    advantages[:2] = torch.tensor([1.0, -1.0])  # both signs, whatever the seed
    return Batch(
        prompt_ids.masked_fill(prompt_mask == 0, pad),
        prompt_mask,
        completion_ids.masked_fill(completion_mask == 0, pad),
        completion_mask,
        advantages,
    )


def add_old_and_ref_logprobs(batch: Batch, logp: Tensor, seed: int = 1) -> None:
    """Old and reference log-probs off the current ones by per-sequence and per-token noise (0 on padding)."""
    g = torch.Generator().manual_seed(seed)
    mask = batch.completion_mask.float()
    sequence_shift = 0.5 * torch.randn(NUM_ROWS, 1, generator=g)
    sequence_shift[:2, 0] = torch.tensor([-0.6, 0.6])  # rows 0 (A > 0) and 1 (A < 0): clipped above and below
    batch.old_logp = (logp + sequence_shift + 0.4 * torch.randn(logp.shape, generator=g)) * mask
    batch.ref_logp = (logp + 0.3 * torch.randn(logp.shape, generator=g)) * mask


@dataclass(frozen=True)
class Case:
    """TRL's loss settings and the matching objective / aggregation / normalisers of ours."""

    loss_type: str
    level: str  # TRL's importance_sampling_level
    objective: str
    aggregation: str
    micro_batch_tokens: bool = False  # bnpo: num_tokens = tokens of the micro-batch * GA


CASES = [
    Case("grpo", "token", "grpo", "sequence_mean"),
    Case("dr_grpo", "token", "grpo", "constant"),
    Case("dapo", "token", "grpo", "token_mean"),
    Case("bnpo", "token", "grpo", "token_mean", micro_batch_tokens=True),
    Case("grpo", "sequence", "gspo", "sequence_mean"),
    Case("dr_grpo", "sequence", "gspo", "constant"),
    Case("dapo", "sequence", "gspo", "token_mean"),
]


def our_normalizers(case: Case, batch: Batch, rows: slice) -> dict[str, float]:
    """The aggregation normalisers our update passes for this micro-batch (see the module docstring)."""
    accumulation_steps = NUM_ROWS // MICRO_BATCH
    if case.micro_batch_tokens:
        num_tokens = float(batch.completion_mask[rows].sum()) * accumulation_steps
    else:
        num_tokens = float(batch.completion_mask.sum())
    return {"num_sequences": float(NUM_ROWS), "num_tokens": num_tokens, "max_length": MAX_COMPLETION_LENGTH}


def trl_inputs(batch: Batch, rows: slice, beta: float) -> dict[str, Tensor]:
    """One micro-batch as TRL's `_compute_loss` reads it (`_generate_and_score_completions`' output, sliced)."""
    inputs = {
        "prompt_ids": batch.prompt_ids[rows],
        "prompt_mask": batch.prompt_mask[rows],
        "completion_ids": batch.completion_ids[rows],
        "completion_mask": batch.completion_mask[rows],
        "advantages": batch.advantages[rows],
        "old_per_token_logps": batch.old_logp[rows],
        "num_items_in_batch": batch.completion_mask.sum(),
    }
    if beta > 0:
        inputs["ref_per_token_logps"] = batch.ref_logp[rows]
    return inputs


def gradients(model: torch.nn.Module) -> dict[str, Tensor]:
    grads = {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    return grads


@pytest.mark.parametrize("beta", [0.0, 0.04])
@pytest.mark.parametrize("case", CASES, ids=lambda c: f"{c.loss_type}-{c.level}")
def test_loss_and_gradients_equal_trl(case, beta, policy_dir, arithmetic_tokenizer, tmp_path):
    trainer = trl_trainer(policy_dir, arithmetic_tokenizer, tmp_path, loss_type=case.loss_type,
                          importance_sampling_level=case.level, beta=beta)  # fmt: skip
    policy = trainer.model
    ours = TokenLogprobModel(policy)
    batch = hand_built_batch(arithmetic_tokenizer)
    with torch.no_grad():
        logp = ours(batch.input_ids, batch.attention_mask, batch.position_ids, PROMPT_WIDTH).logp
    add_old_and_ref_logprobs(batch, logp)

    micro_batches = [slice(i, i + MICRO_BATCH) for i in range(0, NUM_ROWS, MICRO_BATCH)]
    trl_losses, our_outputs = [], []
    for rows in micro_batches:
        loss = trainer._compute_loss(policy, trl_inputs(batch, rows, beta))
        loss.backward()
        trl_losses.append(loss.detach())
    trl_grads = gradients(policy)
    for rows in micro_batches:
        out = ours(batch.input_ids[rows], batch.attention_mask[rows], batch.position_ids[rows], PROMPT_WIDTH)
        loss_out = grpo_loss(
            out.logp, batch.old_logp[rows], batch.advantages[rows], batch.completion_mask[rows],
            ref_logp=batch.ref_logp[rows], beta=beta, epsilon_low=EPSILON, epsilon_high=EPSILON_HIGH,
            objective=case.objective, aggregation=case.aggregation, **our_normalizers(case, batch, rows),
        )  # fmt: skip
        loss_out.loss.backward()
        our_outputs.append(loss_out)
    our_grads = gradients(policy)

    assert any(o.clip_low > 0 for o in our_outputs) and any(o.clip_high > 0 for o in our_outputs)
    for trl_loss, out in zip(trl_losses, our_outputs, strict=True):
        torch.testing.assert_close(out.loss.detach(), trl_loss, rtol=1e-6, atol=1e-8)
    assert our_grads.keys() == trl_grads.keys() and our_grads
    for name, grad in trl_grads.items():
        torch.testing.assert_close(our_grads[name], grad, rtol=1e-5, atol=1e-8, msg=name)


def test_our_token_mean_is_trl_dapo_not_bnpo_when_micro_batches_differ(policy_dir, arithmetic_tokenizer, tmp_path):
    """With unequal token counts per micro-batch, bnpo's mean of means differs from the batch token mean."""
    batch = hand_built_batch(arithmetic_tokenizer)
    halves = [batch.completion_mask[i : i + MICRO_BATCH].sum() for i in (0, MICRO_BATCH)]
    assert halves[0] != halves[1]
    totals = {}
    for loss_type in ("dapo", "bnpo"):
        trainer = trl_trainer(policy_dir, arithmetic_tokenizer, tmp_path, loss_type=loss_type, beta=0.0)
        with torch.no_grad():
            logp = TokenLogprobModel(trainer.model)(
                batch.input_ids, batch.attention_mask, batch.position_ids, PROMPT_WIDTH
            ).logp
            add_old_and_ref_logprobs(batch, logp)
            totals[loss_type] = sum(
                trainer._compute_loss(trainer.model, trl_inputs(batch, slice(i, i + MICRO_BATCH), 0.0))
                for i in (0, MICRO_BATCH)
            )
    ours = grpo_loss(logp, batch.old_logp, batch.advantages, batch.completion_mask, beta=0.0,
                     epsilon_low=EPSILON, epsilon_high=EPSILON_HIGH, aggregation="token_mean").loss  # fmt: skip
    torch.testing.assert_close(ours, totals["dapo"], rtol=1e-6, atol=1e-8)
    assert not torch.isclose(ours, totals["bnpo"], rtol=1e-3)


def test_trl_default_kl_is_our_k3_unbiased(policy_dir, arithmetic_tokenizer, tmp_path):
    """use_bias_correction_kl=True (TRL's default): k3 * rho, rho = pi_theta / pi_old per token, our k3_unbiased."""
    beta = 0.04
    trainer = trl_trainer(policy_dir, arithmetic_tokenizer, tmp_path, loss_type="dapo", beta=beta)
    trainer.args.use_bias_correction_kl = True
    batch = hand_built_batch(arithmetic_tokenizer)
    with torch.no_grad():
        logp = TokenLogprobModel(trainer.model)(
            batch.input_ids, batch.attention_mask, batch.position_ids, PROMPT_WIDTH
        ).logp
        add_old_and_ref_logprobs(batch, logp)
        theirs = trainer._compute_loss(trainer.model, trl_inputs(batch, slice(0, NUM_ROWS), beta))
    mask = batch.completion_mask.float()
    ours = grpo_loss(logp, batch.old_logp, batch.advantages, mask, ref_logp=batch.ref_logp, beta=beta,
                     epsilon_low=EPSILON, epsilon_high=EPSILON_HIGH, aggregation="token_mean")  # fmt: skip
    unbiased = grpo_loss(logp, batch.old_logp, batch.advantages, mask, ref_logp=batch.ref_logp, beta=beta,
                         epsilon_low=EPSILON, epsilon_high=EPSILON_HIGH, aggregation="token_mean",
                         kl_estimator="k3_unbiased")  # fmt: skip
    weighted_kl = k3_kl(logp, batch.ref_logp) * torch.exp(logp - batch.old_logp)
    expected = ours.policy_loss + beta * (weighted_kl * mask).sum() / mask.sum()
    torch.testing.assert_close(theirs, expected, rtol=1e-6, atol=1e-8)
    torch.testing.assert_close(unbiased.loss, theirs, rtol=1e-6, atol=1e-8)
    assert not torch.isclose(theirs, ours.loss, rtol=1e-4)


def test_log_probs_at_a_temperature_equal_trl(policy_dir, arithmetic_tokenizer, tmp_path):
    """Both divide the logits by the sampling temperature before the log-softmax."""
    trainer = trl_trainer(policy_dir, arithmetic_tokenizer, tmp_path, temperature=0.7)
    batch = hand_built_batch(arithmetic_tokenizer)
    with torch.no_grad():
        theirs, _, _ = trainer._get_per_token_logps_and_entropies(
            trainer.model, batch.input_ids, batch.attention_mask, COMPLETION_WIDTH
        )
        ours = TokenLogprobModel(trainer.model, temperature=0.7)(
            batch.input_ids, batch.attention_mask, batch.position_ids, PROMPT_WIDTH
        ).logp
    mask = batch.completion_mask.bool()
    torch.testing.assert_close(ours[mask], theirs[mask], rtol=1e-6, atol=1e-6)


class RecordedReward:
    """A reward with ties and a zero-variance group: 1 for the first prompt, else the completion's length mod 4."""

    def __init__(self, constant_prompt: str) -> None:
        self.constant_prompt = constant_prompt
        self.calls: list[list[float]] = []
        self.__name__ = "recorded_reward"

    def __call__(self, completions: list[str], prompts: list[str], **_) -> list[float]:
        pairs = zip(prompts, completions, strict=True)
        rewards = [1.0 if prompt == self.constant_prompt else float(len(text) % 4) for prompt, text in pairs]
        self.calls.append(rewards)
        return rewards


@pytest.mark.parametrize(("scale_rewards", "estimator"), [("group", "grpo"), ("none", "dr_grpo")])
def test_advantages_equal_trl(scale_rewards, estimator, policy_dir, arithmetic_tokenizer, tmp_path):
    prompts = arithmetic_dataset(3, seed=3)["prompt"]
    reward = RecordedReward(prompts[0])
    trainer = trl_trainer(policy_dir, arithmetic_tokenizer, tmp_path, reward=reward, beta=0.0,
                          scale_rewards=scale_rewards, max_completion_length=6)  # fmt: skip
    group_size = trainer.num_generations
    generated = trainer._generate_and_score_completions([{"prompt": p} for p in prompts for _ in range(group_size)])

    (rewards,) = reward.calls
    rewards = torch.tensor(rewards).view(len(prompts), group_size)
    assert (rewards[0] == 1).all() and rewards[1:].std() > 0
    ours = compute_advantages(rewards, estimator, eps=1e-4).view(-1)
    torch.testing.assert_close(ours, generated["advantages"], rtol=1e-6, atol=1e-7)
