"""The causal LM: parity with transformers' DeepseekV3, decoder path, latent-cache decoding, generate()."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from transformers import AutoModelForCausalLM
from transformers import DeepseekV3Config as TransformersConfig
from transformers import DeepseekV3ForCausalLM as TransformersDeepseekV3

from r1kit.policy import DeepseekV3ForCausalLM, DeepseekV3Model, LatentCache
from r1kit.policy.transformers_compat import CACHE_NAME, LEGACY_CACHE_NAME, enable_activation_checkpointing


def left_padded(pads: list[int], seq: int) -> tuple[torch.Tensor, torch.Tensor]:
    mask = torch.ones(len(pads), seq, dtype=torch.long)
    for row, pad in enumerate(pads):
        mask[row, :pad] = 0
    return mask, (mask.cumsum(-1) - 1).clamp(min=0)


@pytest.mark.parametrize(
    "variant",
    ["default rope", "yarn interleaved", "yarn rotate-half", "four groups keep one", "no q compression"],
)
def test_logits_match_transformers(tiny_config, yarn, randomized, twin, variant):
    overrides = {
        "default rope": {},
        "yarn interleaved": dict(rope_parameters=yarn),
        "yarn rotate-half": dict(rope_parameters=yarn, rope_interleave=False),
        "four groups keep one": dict(n_group=4, topk_group=1, num_experts_per_tok=2),
        "no q compression": dict(q_lora_rank=None, n_group=2, topk_group=1, norm_topk_prob=False),
    }[variant]
    # 3 layers: one dense, two MoE; MTP off for the comparison (transformers has none)
    config = tiny_config(num_hidden_layers=3, num_nextn_predict_layers=0, max_position_embeddings=128, **overrides)
    ours = DeepseekV3ForCausalLM(config).eval()
    randomized(ours)
    theirs = twin(ours)
    ids = torch.randint(0, config.vocab_size, (3, 48))
    mask, positions = left_padded([0, 5, 11], 48)
    with torch.no_grad():
        plain = (ours(ids).logits - theirs(ids).logits).abs().max()
        ours_padded = ours(ids, attention_mask=mask, position_ids=positions).logits
        their_padded = theirs(ids, attention_mask=mask, position_ids=positions).logits
    padded = (ours_padded - their_padded)[mask.bool()].abs().max()
    assert plain < 1e-4 and padded < 1e-4, (plain, padded)


def test_decoder_hidden_states_give_exactly_the_logits(tiny_config):
    model = DeepseekV3ForCausalLM(tiny_config()).train()
    ids = torch.randint(0, 128, (2, 9))
    mask, positions = left_padded([0, 3], 9)
    decoder = model.get_decoder()
    assert isinstance(decoder, DeepseekV3Model) and model.get_output_embeddings() is model.lm_head
    out = decoder(ids, mask, positions)
    assert out.last_hidden_state.shape == (2, 9, 32) and out.aux_loss.ndim == 0 and out.aux_loss > 0
    logits = model(ids, attention_mask=mask, position_ids=positions).logits
    assert torch.equal(model.get_output_embeddings()(out.last_hidden_state), logits)
    assert model.eval().get_decoder()(ids).aux_loss == 0  # no balance loss outside training


def test_latent_cache_decoding_reproduces_the_full_forward(tiny_config, yarn, randomized):
    model = DeepseekV3ForCausalLM(tiny_config(rope_parameters=yarn)).eval()
    randomized(model)
    ids = torch.randint(0, 128, (3, 14))
    mask, positions = left_padded([0, 2, 6], 14)
    with torch.no_grad():
        full = model(ids, attention_mask=mask, position_ids=positions).logits
        out = model(
            ids[:, :8],
            attention_mask=mask[:, :8],
            position_ids=positions[:, :8],
            use_cache=True,
            logits_to_keep=1,
        )
        steps = [out.logits[:, -1]]
        for t in range(8, 14):
            out = model(
                ids[:, t : t + 1],
                attention_mask=mask[:, : t + 1],
                position_ids=positions[:, t : t + 1],
                use_cache=True,
                logits_to_keep=1,
                **{CACHE_NAME: getattr(out, CACHE_NAME)},
            )
            steps.append(out.logits[:, -1])
    cache = getattr(out, CACHE_NAME)
    assert isinstance(cache, LatentCache) and cache.get_seq_length() == 14
    assert CACHE_NAME in out  # where generate() looks the cache up
    torch.testing.assert_close(torch.stack(steps, dim=1), full[:, 7:], rtol=0, atol=1e-5)


@pytest.mark.parametrize("name", sorted({CACHE_NAME, LEGACY_CACHE_NAME}))
def test_forward_takes_the_cache_under_either_name_and_never_drops_it(tiny_config, name):
    model = DeepseekV3ForCausalLM(tiny_config()).eval()
    ids = torch.randint(0, 128, (2, 5))
    with torch.no_grad():
        full = model(ids).logits
        cache = LatentCache(model.config.num_hidden_layers)
        model(ids[:, :4], use_cache=True, **{name: cache})
        assert cache.get_seq_length() == 4
        last = model(ids[:, 4:], use_cache=True, **{name: cache})
    assert getattr(last, CACHE_NAME) is cache and cache.get_seq_length() == 5
    torch.testing.assert_close(last.logits[:, -1], full[:, -1], rtol=0, atol=1e-5)
    with pytest.raises(TypeError, match="both"):
        model(ids, cache=cache, past_key_values=LatentCache(model.config.num_hidden_layers))


def test_greedy_generate_equals_step_by_step_decoding(tiny_config, randomized):
    # generate() decodes through the latent cache; the reference reruns the whole sequence every step
    model = DeepseekV3ForCausalLM(tiny_config()).eval()
    randomized(model)
    ids = torch.randint(2, 128, (2, 7))
    mask, _ = left_padded([0, 3], 7)
    with torch.no_grad():
        generated = model.generate(
            ids, attention_mask=mask, max_new_tokens=8, do_sample=False, pad_token_id=0, eos_token_id=None
        )
        expected = ids
        for _ in range(8):
            full_mask = torch.cat([mask, mask.new_ones(2, expected.shape[1] - 7)], dim=1)
            positions = (full_mask.cumsum(-1) - 1).clamp(min=0)
            logits = model(expected, attention_mask=full_mask, position_ids=positions).logits[:, -1]
            expected = torch.cat([expected, logits.argmax(-1, keepdim=True)], dim=1)
    assert torch.equal(generated, expected)


def test_greedy_generate_matches_transformers(tiny_config, randomized, twin):
    model = DeepseekV3ForCausalLM(tiny_config(num_nextn_predict_layers=0)).eval()
    randomized(model)
    theirs = twin(model)
    ids = torch.randint(2, 128, (2, 7))
    mask, _ = left_padded([0, 3], 7)
    settings = dict(attention_mask=mask, max_new_tokens=6, do_sample=False, pad_token_id=0, eos_token_id=None)
    with torch.no_grad():
        assert torch.equal(model.generate(ids, **settings), theirs.generate(ids, **settings))


def test_num_items_in_batch_normalises_the_token_loss(tiny_config):
    model = DeepseekV3ForCausalLM(tiny_config(num_nextn_predict_layers=0, seq_balance_alpha=0.0)).eval()
    ids = torch.randint(0, 128, (2, 6))
    out = model(ids, labels=ids, num_items_in_batch=torch.tensor(20), some_trainer_kwarg=1)
    summed = F.cross_entropy(out.logits[:, :-1].flatten(0, 1), ids[:, 1:].flatten(), reduction="sum")
    torch.testing.assert_close(out.loss, summed / 20)


def test_logits_to_keep(tiny_config):
    model = DeepseekV3ForCausalLM(tiny_config()).eval()
    ids = torch.randint(0, 128, (2, 6))
    with torch.no_grad():
        full = model(ids).logits
        torch.testing.assert_close(model(ids, logits_to_keep=2).logits, full[:, -2:])
        torch.testing.assert_close(model(ids, logits_to_keep=torch.tensor([0, 3])).logits, full[:, [0, 3]])


def test_gradient_checkpointing_gives_the_same_gradients_and_counts(tiny_config):
    reference = DeepseekV3ForCausalLM(tiny_config()).train()
    checkpointed = copy.deepcopy(reference)
    enable_activation_checkpointing(checkpointed)
    assert all(layer.gradient_checkpointing for layer in checkpointed.model.layers)
    ids = torch.randint(0, 128, (2, 8))
    for model in (reference, checkpointed):
        model(ids, labels=ids).loss.backward()
    assert torch.equal(reference.routing_load(), checkpointed.routing_load())
    for (name, a), b in zip(reference.named_parameters(), checkpointed.parameters(), strict=True):
        torch.testing.assert_close(a.grad, b.grad, msg=name)


def test_foreign_cache_is_refused(tiny_config):
    from transformers import DynamicCache

    with pytest.raises(TypeError, match="LatentCache"):
        DeepseekV3ForCausalLM(tiny_config())(torch.zeros(1, 2, dtype=torch.long), **{CACHE_NAME: DynamicCache()})


def test_auto_classes_pick_ours_for_our_config_only(tiny_config):
    assert isinstance(AutoModelForCausalLM.from_config(tiny_config()), DeepseekV3ForCausalLM)
    theirs = TransformersConfig(**{k: v for k, v in tiny_config().to_dict().items() if k != "model_type"})
    assert isinstance(AutoModelForCausalLM.from_config(theirs), TransformersDeepseekV3)
