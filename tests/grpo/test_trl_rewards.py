"""TRL's own reward functions score the same through our RewardSuite as inside TRL's GRPOTrainer.

TRL 1.16's GRPOTrainer is built around a tiny random Qwen2 model with a chat
template, and its `_generate_and_score_completions` runs on conversational
prompts with hand-written completions: generation is replaced by the
completions' token ids, so TRL itself decodes them, wraps them in assistant
messages (`GRPOTrainer._generate`) and calls the reward functions
(`GRPOTrainer._calculate_rewards`) with the prompts, the completions,
`completion_ids`, the dataset's columns, `trainer_state`, `log_extra` and
`log_metric`. Our suite scores the same prompts, decoded texts and columns, in
the calling process and in worker processes, and must give the same scores
(None as NaN), the same logged columns and the same logged metrics.
"""

from __future__ import annotations

import copy

import pytest
import torch
from datasets import Dataset
from transformers import Qwen2Config, Qwen2ForCausalLM
from trl import GRPOConfig as TRLConfig
from trl import GRPOTrainer as TRLTrainer
from trl.rewards import accuracy_reward, think_format_reward

from r1kit.policy.transformers_compat import ACTIVATION_CHECKPOINTING
from r1kit.rewards import RewardSuite, RewardSuiteConfig
from r1kit.rewards.protocol import trl_completions
from tests.rewards.contract_rewards import keyword_names, trainer_aware

CONTRACT = "tests.rewards.contract_rewards"
TEMPLATE = (
    "{% for message in messages %}<|{{ message['role'] }}|>{{ message['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)
ROWS = [
    {
        "prompt": [
            {"role": "system", "content": "Reason inside <think> tags, then give the answer."},
            {"role": "user", "content": "What is one third of 1?"},
        ],
        "solution": r"\frac{1}{3}",
    },
    {  # ends with an assistant turn: TRL 1.16 neither continues it nor prefixes it to the completions
        "prompt": [{"role": "user", "content": "What is 19 + 23?"}, {"role": "assistant", "content": "<think>"}],
        "solution": "$42$",
    },
    {"prompt": [{"role": "user", "content": "Name a colour."}], "solution": "blue"},  # no parseable gold: None
]
COMPLETIONS = [  # three per row: correct, wrong, malformed
    "<think>\nOne third.\n</think>\nThe answer is $\\boxed{\\frac{1}{3}}$.",
    "<think>\nHalf.\n</think>\n\\boxed{\\frac{1}{2}}",
    "<think>\nno closing tag, \\boxed{\\frac{1}{3",
    "\n19 + 23 = 42\n</think>\n\\boxed{42}",
    "<think>\n19 + 23 = 41\n</think>\nThe answer is $41$.",
    "I do not know.",
    "<think>\nblue\n</think>\nblue",
    "red",
    "<think></think>",
]
G = 3
FUNCTIONS = [accuracy_reward, think_format_reward, trainer_aware, keyword_names]
NAMES = ["accuracy_reward", "think_format_reward", "trainer_aware", "keyword_names"]
BY_IMPORT_PATH = [f"trl.rewards:{name}" for name in NAMES[:2]] + [f"{CONTRACT}:{name}" for name in NAMES[2:]]


@pytest.fixture(scope="module")
def trl_scored(arithmetic_tokenizer, tmp_path_factory):
    """What TRL's GRPOTrainer computed: (its trainer, rewards per function, completions, extra columns, metrics)."""
    tokenizer = copy.deepcopy(arithmetic_tokenizer)
    tokenizer.chat_template = TEMPLATE
    config = Qwen2Config(vocab_size=len(tokenizer), hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=1, pad_token_id=tokenizer.pad_token_id,
                         eos_token_id=tokenizer.eos_token_id)  # fmt: skip
    args = TRLConfig(output_dir=str(tmp_path_factory.mktemp("trl")), per_device_train_batch_size=len(COMPLETIONS),
                     gradient_accumulation_steps=1, num_generations=G, max_completion_length=64, beta=0.0,
                     use_cpu=True, bf16=False, use_vllm=False, report_to="none", save_strategy="no",
                     **{ACTIVATION_CHECKPOINTING: False})  # fmt: skip
    trainer = TRLTrainer(model=Qwen2ForCausalLM(config), reward_funcs=FUNCTIONS, args=args,
                         train_dataset=Dataset.from_list(ROWS), processing_class=tokenizer)  # fmt: skip
    trainer.state.global_step, trainer.state.max_steps, trainer.state.epoch = 3, 10, 0.25
    ids = [tokenizer(text, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id] for text in COMPLETIONS]
    trainer._generate_single_turn = lambda *args, **kwargs: (ids, None)  # TRL decodes these itself
    trainer.model.train()
    trainer._generate_and_score_completions([row for row in ROWS for _ in range(G)])
    logs = trainer._logs
    rewards = {name: torch.tensor(list(values)) for name, values in logs["rewards"].items()}
    extra = {column: list(values) for column, values in logs["extra"].items()}
    metrics = {name: values[-1] for name, values in trainer._metrics["train"].items()}
    return trainer, rewards, list(logs["completion"]), extra, metrics, ids


def test_trl_decodes_the_hand_written_completions_into_assistant_messages(trl_scored):
    _, rewards, completions, _, _, _ = trl_scored
    prompts = [row["prompt"] for row in ROWS for _ in range(G)]
    assert completions == trl_completions(prompts, COMPLETIONS)
    assert rewards["accuracy_reward"][:6].tolist() == [1.0, 0.0, 0.0, 1.0, 0.0, 0.0]
    assert rewards["accuracy_reward"][6:].isnan().all()  # no parseable gold answer: None


@pytest.mark.parametrize("num_workers", [0, 2], ids=["in_process", "workers"])
def test_our_suite_scores_and_logs_as_trls_grpo_trainer(trl_scored, num_workers):
    trainer, rewards, _, extra, metrics, ids = trl_scored
    specs = FUNCTIONS if num_workers == 0 else BY_IMPORT_PATH
    prompts = [row["prompt"] for row in ROWS for _ in range(G)]
    columns = {"solution": [row["solution"] for row in ROWS for _ in range(G)], "completion_ids": ids}
    placement = "in-process" if num_workers == 0 else "workers, whole batch"
    with RewardSuite(specs, config=RewardSuiteConfig(num_workers=num_workers)) as suite:
        assert repr(suite).count(f"({placement}, ") == len(NAMES)
        result = suite.score(prompts, COMPLETIONS, columns, trainer_state=trainer.state)
    assert result.names == NAMES and not result.failures
    for name in NAMES:
        torch.testing.assert_close(result.scores[name], rewards[name], equal_nan=True)
    assert result.extra == extra  # accuracy_reward's solution / gold_parsed / answer_parsed, and ours
    assert result.extra["keywords"][0] == "completion_ids log_extra log_metric prompts solution trainer_state"
    assert result.logged_metrics == pytest.approx({name: metrics[name] for name in ("progress", "batch_size")})
