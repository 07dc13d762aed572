"""Rollouts for one GRPO step: prompts -> engine -> rewards -> group advantages.

`RolloutCollector.collect(step)` draws B prompts, has the rollout engine sample
G completions for each, scores them with the reward suite, and turns the rewards
into group-relative advantages. Two options change what reaches the update:

- overlap: the next step's generation is started before returning, so the
  engine samples batch t+1 while the trainer updates on batch t (one step off
  policy; the update corrects with importance weights);
- dynamic sampling (DAPO): groups whose G rewards are all equal carry no
  signal; "drop" removes them, "refill" samples further rounds of prompts until
  B informative groups are found or `dynamic_sampling_max_rounds` is reached.

Reward metrics always describe the first round, an unbiased sample of the policy.

Rewards are called under TRL's GRPOTrainer contract (trl 1.16,
`GRPOTrainer._calculate_rewards`): the prompts as the dataset holds them, the
completions (the suite passes them as assistant messages when the prompts are
conversational), `completion_ids`, every dataset column but the prompt,
"completion" and "completion_ids", and `trainer_state`, a
`transformers.TrainerState` counted in optimizer updates as TRL counts it:
global_step = step * num_iterations of max_steps * num_iterations, epoch = the
passes over the prompts made before this batch was drawn. What the rewards log
with `log_metric` joins the step's metrics, and what they log with `log_extra`
joins the completions written to samples.jsonl (built-in keys win a clash).
"""

from __future__ import annotations

import time
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch
from torch import Tensor
from transformers import PreTrainedTokenizerBase, TrainerState

from r1kit.grpo.advantages import compute_advantages, zero_std_groups
from r1kit.grpo.config import GRPOConfig
from r1kit.grpo.data import PromptSampler, encode_prompt, stop_token_ids
from r1kit.grpo.metrics import nan_mean_std, timed
from r1kit.rollout.engine import RolloutBatch, RolloutEngine, SamplingParams, concat_rollouts


class RewardScores(Protocol):
    """What the trainer reads from a reward suite's result for N completions (see rewards.RewardResult).

    total: (N,) weighted sum of the reward functions.
    scores: name -> (N,) scores, NaN where a function gave None or failed.
    extra: column -> N values the functions logged with log_extra.
    logged_metrics: name -> value the functions logged with log_metric (averaged).
    metrics(prefix): flat per-function statistics to log.
    """

    total: Tensor
    scores: dict[str, Tensor]
    extra: dict[str, list[Any]]
    logged_metrics: dict[str, float]

    def metrics(self, prefix: str = ...) -> dict[str, float]: ...


class RewardScorer(Protocol):
    """A reward suite (see rewards.RewardSuite): scores completions given their prompts (as the dataset holds
    them), the dataset's columns and the trainer's state, under TRL's reward-function contract."""

    def score(
        self, prompts: list, completions: list[str], columns: dict[str, list], *, trainer_state: TrainerState
    ) -> RewardScores: ...


def speculation_metrics(rollout: RolloutBatch) -> dict[str, float]:
    """Acceptance rate of the drafted tokens and tokens emitted per verifying forward, when the engine
    decoded speculatively; {} otherwise."""
    counts = rollout.draft_counts
    rounds = sum(row.rounds for row in counts) if counts else 0
    if rounds == 0:
        return {}
    accepted = sum(row.accepted for row in counts)
    return {"speculation/acceptance_rate": accepted / sum(row.drafted for row in counts),
            "speculation/tokens_per_forward": (rounds + accepted) / rounds}  # fmt: skip


def reward_columns(column_names: list[str], prompt_column: str) -> list[str]:
    """The dataset columns rewards get, as in TRL: all but the prompt, "completion" and "completion_ids"
    (`completion_ids` comes from generation instead).

    >>> reward_columns(["prompt", "answer", "completion"], "prompt")
    ['answer']
    """
    return [c for c in column_names if c not in (prompt_column, "completion", "completion_ids")]


@dataclass
class ScoredRollout:
    """The groups one step trains on.

    rows: the dataset rows, one per group (B').
    rollout: their completions, G per row, grouped by row.
    rewards: (B', G) total rewards; advantages: (B' * G,) one per completion.
    metrics: reward, throughput and dynamic-sampling statistics of the whole step (all processes).
    generation_time: seconds this step waited for the engine.
    """

    rows: list[dict[str, Any]]
    rollout: RolloutBatch
    rewards: Tensor
    advantages: Tensor
    metrics: dict[str, float]
    generation_time: float
    samples: list[dict[str, Any]] = field(default_factory=list)

    def select(self, groups: list[int]) -> ScoredRollout:
        """The given groups (indices into `rows`), in that order."""
        g = self.rewards.shape[1]
        return ScoredRollout(
            rows=[self.rows[i] for i in groups],
            rollout=select_groups(self.rollout, groups, g),
            rewards=self.rewards[groups],
            advantages=self.advantages.view(-1, g)[groups].reshape(-1),
            metrics=self.metrics,
            generation_time=self.generation_time,
            samples=self.samples,
        )

    def shard(self, rank: int, world_size: int) -> ScoredRollout:
        """This rank's contiguous share of whole groups; `world_size` must divide the group count."""
        per_rank, rest = divmod(len(self.rows), world_size)
        if rest:
            raise ValueError(f"{len(self.rows)} groups cannot be split evenly over {world_size} processes")
        return self.select(list(range(rank * per_rank, (rank + 1) * per_rank)))


@dataclass
class _Round:
    """One draw of prompts: their rows, the engine's rollouts, and the trainer's state when they were drawn."""

    rows: list[dict[str, Any]]
    rollout: RolloutBatch | Future[RolloutBatch]
    trainer_state: TrainerState


def select_groups(rollout: RolloutBatch, groups: list[int], group_size: int) -> RolloutBatch:
    """The rows of `rollout` belonging to the given groups, in that order."""
    return rollout.select([g * group_size + j for g in groups for j in range(group_size)])


def repeat_each(values: list[Any], times: int) -> list[Any]:
    """Each value `times` times in a row: one per completion of its group."""
    return [value for value in values for _ in range(times)]


class RolloutCollector:
    """Draws prompts, samples groups through the engine and scores them (see the module docstring)."""

    def __init__(
        self,
        config: GRPOConfig,
        engine: RolloutEngine,
        rewards: RewardScorer,
        tokenizer: PreTrainedTokenizerBase,
        sampler: PromptSampler,
        prompt_column: str,
        accuracy_reward: str | None,
        stop_ids: tuple[int, ...] | None = None,
    ) -> None:
        self.config, self.engine, self.rewards, self.tokenizer = config, engine, rewards, tokenizer
        self.stop_ids = stop_ids if stop_ids is not None else stop_token_ids(tokenizer)
        self.sampler, self.prompt_column, self.accuracy_reward = sampler, prompt_column, accuracy_reward
        self._pending: _Round | None = None  # with overlap: the next step's prompts, being sampled
        self._times: dict[str, float] = {}  # seconds spent scoring in the current `collect`

    def _trainer_state(self, step: int) -> TrainerState:
        """The `trainer_state` rewards get for prompts drawn now for step `step` (see the module docstring)."""
        config, position = self.config, self.sampler.state_dict()
        return TrainerState(
            global_step=step * config.num_iterations,
            max_steps=config.max_steps * config.num_iterations,
            epoch=position["epoch"] + position["position"] / len(self.sampler.dataset),
        )

    def _start(self, step: int, round_index: int, background: bool) -> _Round:
        config = self.config
        trainer_state = self._trainer_state(step)
        rows = self.sampler.next_batch()
        prompts = [encode_prompt(self.tokenizer, row[self.prompt_column]) for row in rows]
        params = SamplingParams(
            n=config.num_generations, temperature=config.temperature, top_p=config.top_p, top_k=config.top_k,
            min_p=config.min_p, max_new_tokens=config.max_completion_length, stop_token_ids=self.stop_ids,
            stop_strings=tuple(config.stop_strings), seed=config.seed * 1_000_003 + step * 101 + round_index,
            record_routing=config.keep_routing, record_kept_tokens=config.keep_sampling_mask,
        )  # fmt: skip
        generate = self.engine.generate_async if background else self.engine.generate
        return _Round(rows, generate(prompts, params), trainer_state)

    def _score(self, round_: _Round) -> tuple[RolloutBatch, RewardScores, Tensor]:
        rollout = round_.rollout if isinstance(round_.rollout, RolloutBatch) else round_.rollout.result()
        g, rows = self.config.num_generations, round_.rows
        names = reward_columns(list(rows[0]), self.prompt_column)
        columns = {c: repeat_each([row[c] for row in rows], g) for c in names}
        columns["completion_ids"] = rollout.completion_ids
        prompts = repeat_each([row[self.prompt_column] for row in rows], g)
        with timed(self._times, "time/rewards_s"):
            scores = self.rewards.score(prompts, rollout.completion_text, columns, trainer_state=round_.trainer_state)
        return rollout, scores, scores.total.view(len(rows), g)

    def collect(self, step: int) -> ScoredRollout:
        """The scored groups for optimizer step `step` (0-based)."""
        config, start = self.config, time.perf_counter()
        self._times = {"time/rewards_s": 0.0}
        first = self._pending if self._pending is not None else self._start(step, 0, background=False)
        self._pending = None
        rollout, scores, rewards = self._score(first)
        metrics = self._reward_metrics(scores, rewards)
        every = config.log_completions_steps
        samples = self._samples(first.rows, rollout, scores, rewards) if every and (step + 1) % every == 0 else []
        rows, rollouts, totals = first.rows, [rollout], [rewards]
        if config.dynamic_sampling != "off":
            rows, rollouts, totals, rounds = self._keep_informative(step, rows, rollout, rewards)
            metrics["dynamic_sampling/rounds"] = rounds
            metrics["dynamic_sampling/groups"] = len(rows)
        if config.overlap:  # the engine samples step + 1 while the trainer updates on this batch
            self._pending = self._start(step + 1, 0, background=True)
        rewards = torch.cat(totals)
        advantages = compute_advantages(rewards, config.advantage_estimator, eps=config.advantage_eps)
        generation_time = time.perf_counter() - start - self._times["time/rewards_s"]  # waiting for the engine
        rollout = concat_rollouts(rollouts)
        metrics["tokens_per_second"] = rollout.num_generated_tokens / max(generation_time, 1e-9)  # the whole batch's
        metrics.update(speculation_metrics(rollout))
        metrics.update(self._times)
        return ScoredRollout(rows, rollout, rewards, advantages.view(-1), metrics, generation_time, samples)

    def _keep_informative(self, step: int, rows: list, rollout: RolloutBatch, rewards: Tensor):
        """Groups with reward variance, refilled from further rounds when configured."""
        config, g = self.config, self.config.num_generations
        kept_rows, kept_rollouts, kept_rewards, rounds = [], [], [], 1
        while True:
            informative = (~zero_std_groups(rewards)).nonzero().flatten().tolist()
            room = config.prompts_per_step - len(kept_rows)
            informative = informative[:room]
            kept_rows += [rows[i] for i in informative]
            kept_rollouts.append(select_groups(rollout, informative, g))
            kept_rewards.append(rewards[informative])
            done = len(kept_rows) == config.prompts_per_step or config.dynamic_sampling == "drop"
            if done or rounds == config.dynamic_sampling_max_rounds:
                return kept_rows, kept_rollouts, kept_rewards, rounds
            round_ = self._start(step, rounds, background=False)
            rollout, _, rewards = self._score(round_)
            rows, rounds = round_.rows, rounds + 1

    def _samples(
        self, rows: list[dict[str, Any]], rollout: RolloutBatch, scores: RewardScores, rewards: Tensor
    ) -> list[dict[str, Any]]:
        """One record per completion of the first round: prompt, completion, reward per function, advantage,
        and the columns the rewards logged with log_extra."""
        config, g = self.config, self.config.num_generations
        advantages = compute_advantages(rewards, config.advantage_estimator, eps=config.advantage_eps).view(-1)
        samples = []
        for k in range(len(rollout)):
            sample = {
                "prompt": rows[k // g][self.prompt_column],
                "completion": rollout.completion_text[k],
                "reward": scores.total[k].item(),
                "advantage": advantages[k].item(),
                **{f"rewards/{name}": values[k].item() for name, values in scores.scores.items()},
            }
            sample.update({column: values[k] for column, values in scores.extra.items() if column not in sample})
            samples.append(sample)
        return samples

    def _reward_metrics(self, scores: RewardScores, rewards: Tensor) -> dict[str, float]:
        reward_mean, reward_std = nan_mean_std(scores.total)
        metrics = {
            **scores.logged_metrics,  # what the rewards logged with log_metric; built-in names win a clash
            "reward": reward_mean,
            "reward/std": reward_std,
            "zero_std_groups": zero_std_groups(rewards).float().mean().item(),
            **scores.metrics(prefix="rewards/"),
        }
        if self.accuracy_reward in scores.scores:
            metrics["accuracy"] = nan_mean_std(scores.scores[self.accuracy_reward])[0]
        return metrics

    def state_dict(self) -> dict[str, Any]:
        """The prompt position and, with overlap, the batch prefetched for the next step (waited for): a
        resumed run trains on the very batch the uninterrupted one would, sampled by the same weights."""
        prefetched = None
        if self._pending is not None:
            round_ = self._pending
            if isinstance(round_.rollout, Future):
                round_ = _Round(round_.rows, round_.rollout.result(), round_.trainer_state)
                self._pending = round_
            prefetched = {"rows": round_.rows, "rollout": round_.rollout, "trainer_state": round_.trainer_state}
        return {"sampler": self.sampler.state_dict(), "prefetched": prefetched}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.sampler.load_state_dict(state["sampler"])
        prefetched = state["prefetched"]
        self._pending = None if prefetched is None else _Round(**prefetched)

    def close(self) -> None:
        """Wait for a prefetched batch so that no generation outlives the run."""
        if self._pending is not None and isinstance(self._pending.rollout, Future):
            self._pending.rollout.result()
        self._pending = None
