"""Multi-token prediction: the loss equals a transcription over explicitly truncated sequences."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from r1kit.policy import DeepseekV3ForCausalLM
from r1kit.policy.mtp import shift_left


def reference_mtp_terms(model, hidden, ids, loss_mask):
    """Per depth k, (logits, targets) of one unpadded row; module k sees h^{k-1}[:T-k] and tokens k..T-1."""
    seq = ids.shape[0]
    rope_of = lambda length: model.model.rotary_emb(torch.arange(length)[None], hidden.dtype)
    previous, terms = hidden[None], []
    for depth, module in enumerate(model.mtp, start=1):
        length = seq - depth
        next_embeds = model.model.embed_tokens(ids[None, depth:])
        x = module.eh_proj(torch.cat((module.enorm(next_embeds), module.hnorm(previous[:, :length])), dim=-1))
        out = module.block(x, rope_of(length), None)[0]
        keep = loss_mask[depth + 1 :]  # position i predicts token i + depth + 1
        logits = model.lm_head(module.norm(out[0, : length - 1]))[keep]
        terms.append((logits, ids[depth + 1 :][keep]))
        previous = out
    return terms


def reference_mtp_loss(model, hidden, ids, loss_mask, attention_mask):
    depth_terms = [[] for _ in model.mtp]
    for row in range(ids.shape[0]):
        real = attention_mask[row].bool()
        terms = reference_mtp_terms(model, hidden[row][real], ids[row][real], loss_mask[row][real])
        for collected, term in zip(depth_terms, terms, strict=True):
            collected.append(term)
    losses = [
        F.cross_entropy(torch.cat([t[0] for t in terms]), torch.cat([t[1] for t in terms])) for terms in depth_terms
    ]
    return model.config.mtp_loss_weight / len(losses) * sum(losses)


@pytest.mark.parametrize("depth", [1, 2])
def test_mtp_loss_matches_truncated_sequence_transcription(tiny_config, randomized, depth):
    model = DeepseekV3ForCausalLM(tiny_config(num_nextn_predict_layers=depth, mtp_loss_weight=0.3)).eval()
    randomized(model)
    ids = torch.randint(0, 128, (3, 12))
    attention_mask = torch.ones(3, 12, dtype=torch.long)
    attention_mask[1, :3] = 0  # left padding
    positions = (attention_mask.cumsum(-1) - 1).clamp(min=0)
    loss_mask = attention_mask.bool().clone()
    loss_mask[:, :5] = False  # prompt tokens are no targets
    with torch.no_grad():
        hidden = model.model(ids, attention_mask, positions).last_hidden_state
        ours = model.mtp_loss(hidden, ids, loss_mask, attention_mask, positions)
        expected = reference_mtp_loss(model, hidden, ids, loss_mask, attention_mask)
    torch.testing.assert_close(ours, expected, rtol=1e-5, atol=1e-6)


def test_forward_loss_is_ce_plus_balance_plus_mtp(tiny_config):
    model = DeepseekV3ForCausalLM(tiny_config(seq_balance_alpha=0.01)).train()
    ids = torch.randint(0, 128, (2, 10))
    labels = ids.clone()
    labels[:, :4] = -100
    out = model(ids, labels=labels, num_items_in_batch=None)
    hidden = model.get_decoder()(ids).last_hidden_state
    ce = F.cross_entropy(out.logits[:, :-1].flatten(0, 1), labels[:, 1:].flatten(), ignore_index=-100)
    mtp = model.mtp_loss(hidden, ids, labels != -100)
    torch.testing.assert_close(out.mtp_loss, mtp)
    assert out.aux_loss > 0
    torch.testing.assert_close(out.loss, ce + out.aux_loss + mtp)
    out.loss.backward()
    assert model.mtp[0].eh_proj.weight.grad.abs().sum() > 0
    assert model.mtp[0].block.self_attn.q_a_proj.weight.grad.abs().sum() > 0


def test_mtp_switched_off(tiny_config):
    ids = torch.randint(0, 128, (2, 8))
    no_modules = DeepseekV3ForCausalLM(tiny_config(num_nextn_predict_layers=0))
    assert len(no_modules.mtp) == 0 and no_modules(ids, labels=ids).mtp_loss is None
    no_weight = DeepseekV3ForCausalLM(tiny_config(mtp_loss_weight=0.0))
    assert no_weight(ids, labels=ids).mtp_loss is None
    assert no_weight.mtp_loss(torch.zeros(2, 8, 32), ids, ids > 0) == 0


def test_no_targets_gives_zero_loss_that_still_backpropagates(tiny_config):
    model = DeepseekV3ForCausalLM(tiny_config())
    ids = torch.randint(0, 128, (2, 8))
    hidden = model.get_decoder()(ids).last_hidden_state
    loss = model.mtp_loss(hidden, ids, torch.zeros(2, 8, dtype=torch.bool))
    loss.backward()
    assert loss == 0 and model.mtp[0].eh_proj.weight.grad is not None


def test_mtp_router_loads_are_counted_in_training(tiny_config):
    model = DeepseekV3ForCausalLM(tiny_config()).train()
    ids = torch.randint(0, 128, (2, 8))
    model(ids, labels=ids).loss.backward()
    main, mtp = model.routing_load()
    assert main.sum() == 2 * 8 * 2
    assert mtp.sum() == 2 * 7 * 2  # position i needs token i + 1: the last position has no MTP input


def test_shift_left():
    x = torch.tensor([[1, 2, 3, 4]])
    assert shift_left(x, 1).tolist() == [[2, 3, 4, 0]]
    assert shift_left(x, 2, fill=-1).tolist() == [[3, 4, -1, -1]]
    assert shift_left(x, 5).tolist() == [[0, 0, 0, 0]]
