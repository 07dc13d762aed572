"""RoutingBiasCallback inside a real transformers Trainer: one bias update per optimizer step."""

from __future__ import annotations

import pytest
import torch
from torch.utils.data import Dataset
from transformers import Trainer, TrainingArguments

from r1kit.policy import DeepseekV3ForCausalLM, RoutingBiasCallback
from r1kit.policy.callbacks import find_routed_model


class Tokens(Dataset):
    def __init__(self, rows: int, seq: int) -> None:
        self.ids = torch.randint(0, 128, (rows, seq))

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.ids[i], "labels": self.ids[i]}


class CountingModel(DeepseekV3ForCausalLM):
    updates = 0

    def update_routing_bias(self, load=None):
        type(self).updates += 1
        return super().update_routing_bias(load)


def test_one_update_per_optimizer_step_with_gradient_accumulation(tiny_config, tmp_path):
    model = CountingModel(tiny_config(router_bias_update_speed=0.01))
    callback = RoutingBiasCallback()
    args = TrainingArguments(
        output_dir=str(tmp_path),
        per_device_train_batch_size=2,
        gradient_accumulation_steps=3,
        max_steps=2,
        learning_rate=1e-3,
        report_to=[],
        save_strategy="no",
        use_cpu=True,
        dataloader_num_workers=0,
    )
    Trainer(model=model, args=args, train_dataset=Tokens(12, 8), callbacks=[callback]).train()
    assert CountingModel.updates == 2
    tokens_per_step, top_k = 3 * 2 * 8, 2
    assert callback.last_load[0].sum() == tokens_per_step * top_k  # all micro-batches of the step
    assert not model.routing_load().any()  # reset after the update
    bias = model.routers()[0].e_score_correction_bias
    assert bias.abs().max() <= 0.02 + 1e-6 and bias.abs().max() > 0  # two steps of speed 0.01


def test_callback_refuses_a_model_without_routers():
    with pytest.raises(TypeError, match="no DeepSeek-V3 policy"):
        find_routed_model(torch.nn.Linear(2, 2))
