"""DeepSeek-V3 as a transformers model: decoder layer, base model, causal LM with MTP.

    h_0 = Emb(input_ids)
    h_l = h_{l-1} + MLA(RMSNorm(h_{l-1}));  h_l = h_l + FFN(RMSNorm(h_l))
          FFN = dense SwiGLU for the first `first_k_dense_replace` layers, DeepSeekMoE after
    last_hidden_state = RMSNorm(h_L);   logits = lm_head(last_hidden_state)
    loss = CE(next token, -100 ignored) + sum_layers alpha * L_bal + (lambda / D) sum_k CE_k

The model is single-device and pure apart from two pieces of routing state per
MoE layer: the selection bias (a checkpointed fp32 buffer) and the token
counts accumulated while training (`routing_load`, `update_routing_bias`).
Counts are recorded here, outside the layers, only when the model is in
training mode with gradients enabled (the tokens an optimizer step trains on),
so activation checkpointing's recomputation never counts a token twice.

The decoding cache is a `LatentCache`; once it holds tokens, attention runs in
the absorbed form. `forward` takes it as `cache` or `past_key_values` and model
outputs carry it under the name the installed transformers' `generate()` uses
(policy/transformers_compat.py). `save_pretrained` writes the released DeepSeek-V3 layout
(policy/checkpoint.py) with model_type "deepseek_v3", which transformers and
vLLM load directly; `from_pretrained` builds on the meta device and streams that
layout, transformers' or ours into it tensor by tensor (policy/streaming_load.py),
dequantises released FP8 (`weight_scale_inv`) weights, and refuses to drop or
invent a tensor. `config.fp8` builds the model for FP8 training
(policy/fp8_policy.py); `enable_fp8` switches an existing model over.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import torch
from torch import nn
from transformers import AutoModel, AutoModelForCausalLM, GenerationConfig, GenerationMixin, PreTrainedModel
from transformers import initialization as init
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.utils import ModelOutput

from r1kit.policy import checkpoint
from r1kit.policy.attention import AttentionMask, MultiheadLatentAttention, PackedSequences, attention_layout
from r1kit.policy.cache import LatentCache
from r1kit.policy.config import DeepseekV3Config
from r1kit.policy.fp8_gemm import FP8Config
from r1kit.policy.fp8_policy import enable_fp8
from r1kit.policy.layers import MLP, RMSNorm
from r1kit.policy.moe import MoE, RoutedExperts, Router
from r1kit.policy.mtp import MTPModule, mtp_loss
from r1kit.policy.rope import RotaryEmbedding, rope_frequencies
from r1kit.policy.streaming_load import load_into
from r1kit.policy.transformers_compat import CACHE_NAME, pop_cache_argument, with_cache_field

MLA_DECODE_PATHS = ("absorbed", "expanded")


class DecoderLayer(GradientCheckpointingLayer):
    """Pre-norm block: MLA then a dense SwiGLU or a DeepSeekMoE feed-forward."""

    def __init__(self, config: DeepseekV3Config, layer_idx: int, moe: bool) -> None:
        super().__init__()
        self.self_attn = MultiheadLatentAttention(config, layer_idx)
        self.mlp = MoE(config) if moe else MLP(config.hidden_size, config.intermediate_size, config.hidden_act)
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)

    def forward(
        self,
        hidden: torch.Tensor,
        rope: tuple[torch.Tensor, torch.Tensor],
        mask: AttentionMask,
        cache: LatentCache | None = None,
        token_mask: torch.Tensor | None = None,
        routed_experts: torch.Tensor | None = None,
        sequences: PackedSequences | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
        """hidden (B, T, H) -> (hidden, balance loss or None, expert load (E,) or None,
        routed experts (B, T, K) or None for a dense layer).

        routed_experts (B, T, K): experts to replay in a MoE layer, -1 where the router chooses.
        sequences: the packed samples of the rows (`PackedSequences`), whose balance loss a MoE
        layer computes one sample at a time; None: one sample per row.
        """
        hidden = hidden + self.self_attn(self.input_layernorm(hidden), rope, mask, cache)
        ffn_in = self.post_attention_layernorm(hidden)
        if isinstance(self.mlp, MoE):
            out = self.mlp(ffn_in, token_mask, routed_experts, sequences)
            return hidden + out.hidden, out.aux_loss, out.load, out.experts
        return hidden + self.mlp(ffn_in), None, None, None


@dataclass
@with_cache_field
class DeepseekV3ModelOutput(ModelOutput):
    """last_hidden_state (B, T, H) after the final norm; aux_loss: alpha-weighted balance loss summed
    over MoE layers (0 outside training); routed_experts (num_moe_layers, B, T, K) int16 when asked
    for (`output_routed_experts`); the latent cache, when one is used, under `CACHE_NAME`."""

    last_hidden_state: torch.Tensor | None = None
    aux_loss: torch.Tensor | None = None
    routed_experts: torch.Tensor | None = None


@dataclass
@with_cache_field
class DeepseekV3CausalLMOutput(ModelOutput):
    """loss = CE + aux_loss + mtp_loss when labels are given; logits (B, T or logits_to_keep, V);
    routed_experts as in `DeepseekV3ModelOutput`; the latent cache, when one is used, under `CACHE_NAME`."""

    loss: torch.Tensor | None = None
    logits: torch.Tensor | None = None
    aux_loss: torch.Tensor | None = None
    mtp_loss: torch.Tensor | None = None
    routed_experts: torch.Tensor | None = None


class DeepseekV3PreTrainedModel(PreTrainedModel):
    """Weight init and the routing-bias interface shared by the base model and the causal LM."""

    config_class = DeepseekV3Config
    config: DeepseekV3Config
    base_model_prefix = "model"
    supports_gradient_checkpointing = True
    _no_split_modules: ClassVar[list[str]] = ["DecoderLayer"]
    _supports_sdpa = True  # MLA always runs through torch's scaled_dot_product_attention

    @torch.no_grad()
    def _init_weights(self, module: nn.Module) -> None:
        super()._init_weights(module)  # Linear / Embedding: normal(0, initializer_range); RMSNorm: ones
        std = self.config.initializer_range
        if isinstance(module, Router):
            init.normal_(module.weight, mean=0.0, std=std)
            init.zeros_(module.e_score_correction_bias)
        elif isinstance(module, RoutedExperts):
            init.normal_(module.gate_up_proj, mean=0.0, std=std)
            init.normal_(module.down_proj, mean=0.0, std=std)

    def post_init(self) -> None:
        """transformers' weight init, then the FP8 recipe of `config.fp8`, if any."""
        super().post_init()
        recipe = self.config.fp8_recipe()
        if recipe is not None:
            enable_fp8(self, recipe)

    def enable_fp8(self, recipe: FP8Config | None = None) -> None:
        """Trains this model in FP8 from now on (`recipe` defaults to FP8Config()); see policy/fp8_policy.py.

        Parameters and optimizer state are untouched; `config.fp8` records the recipe, so
        `save_pretrained` writes it and loading the checkpoint builds the model in FP8 again.
        """
        enable_fp8(self, recipe if recipe is not None else FP8Config())

    def set_mla_decode(self, path: str) -> None:
        """Decode with the "absorbed" MLA path (fast, the default) or the "expanded" one (the training
        forward's arithmetic: sampler log-probs closest to the trainer's in bf16 and FP8)."""
        if path not in MLA_DECODE_PATHS:
            raise ValueError(f"MLA decode path must be one of {MLA_DECODE_PATHS}, got {path!r}")
        for module in self.modules():
            if isinstance(module, MultiheadLatentAttention):
                module.absorb_decode = path == "absorbed"

    @torch.no_grad()
    def init_buffers(self) -> None:
        """Recomputes the buffers no state dict holds: the rotary frequencies and the routing-load counts.

        For a model built on the meta device: `with torch.device("meta"): model = cls(config)`, then
        (sharding, if any) `model.to_empty(device=...)`, `model.init_buffers()` and
        `streaming_load.load_into(model, directory)` or `model.load_state_dict(...)`.
        """
        for module in self.modules():
            if isinstance(module, RotaryEmbedding):
                module.inv_freq.copy_(rope_frequencies(self.config)[0])
            elif isinstance(module, Router):
                module.expert_load.zero_()

    def routers(self) -> list[Router]:
        """Every MoE router: main layers in order, then the MTP modules' layers."""
        return [module for module in self.modules() if isinstance(module, Router)]

    def routing_load(self) -> torch.Tensor:
        """Tokens per expert since the last bias update: (num_moe_layers, n_routed_experts) fp32."""
        routers = self.routers()
        if not routers:
            return torch.zeros(0, self.config.n_routed_experts)
        return torch.stack([router.expert_load for router in routers])

    @torch.no_grad()
    def update_routing_bias(self, load: torch.Tensor | None = None) -> torch.Tensor:
        """bias += router_bias_update_speed * sign(mean(load) - load) per MoE layer; resets the counts.

        load: (num_moe_layers, n_routed_experts), e.g. counts all-reduced over
        data-parallel ranks; defaults to this process's `routing_load()`.
        Returns the load used. Call once per optimizer step.
        """
        routers = self.routers()
        load = self.routing_load() if load is None else load
        if load.shape != (len(routers), self.config.n_routed_experts):
            raise ValueError(
                f"update_routing_bias: load has shape {tuple(load.shape)}, expected "
                f"({len(routers)}, {self.config.n_routed_experts}) (num_moe_layers, n_routed_experts)"
            )
        for router, layer_load in zip(routers, load, strict=True):
            router.update_bias(layer_load, self.config.router_bias_update_speed)
        return load


class DeepseekV3Model(DeepseekV3PreTrainedModel):
    """Embedding, decoder layers and final norm; returns the normed hidden states and the balance loss."""

    def __init__(self, config: DeepseekV3Config) -> None:
        super().__init__(config)
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size, config.pad_token_id)
        self.layers = nn.ModuleList(
            DecoderLayer(config, i, moe=i >= config.first_k_dense_replace) for i in range(config.num_hidden_layers)
        )
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.rotary_emb = RotaryEmbedding(config)
        self.post_init()

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache: LatentCache | None = None,
        use_cache: bool = False,
        inputs_embeds: torch.Tensor | None = None,
        routed_experts: torch.Tensor | None = None,
        output_routed_experts: bool = False,
        **kwargs,
    ) -> DeepseekV3ModelOutput:
        """input_ids (B, T); attention_mask (B, past + T), 0 on padding; position_ids (B, T).

        Samples packed into one row, their position_ids restarting at 0, attend only
        within themselves (attention runs one sample at a time, see `attention_layout`), and
        the MoE balance loss is computed per sample, not per row. Samples may share a
        prefix (a prompt and several completions, `PackedSequences`): the prefix is
        computed once, and each sample's balance statistics and each token's expert
        load count it once per sample, as if the samples were laid out one a row.
        The cache may also come as `past_key_values` (transformers before 5.24).
        routed_experts (num_moe_layers, B, T, K): experts to replay in each MoE layer
        (keep routing), -1 for tokens the routers choose for; `output_routed_experts`
        returns the experts used, in the same layout, as int16.
        """
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("pass exactly one of input_ids and inputs_embeds")
        hidden = self.embed_tokens(input_ids) if inputs_embeds is None else inputs_embeds
        batch, seq = hidden.shape[:2]
        cache = self._cache(pop_cache_argument(cache, kwargs), use_cache)
        past = cache.get_seq_length() if cache is not None else 0
        token_mask = None if attention_mask is None else attention_mask[:, -seq:].bool()
        if position_ids is not None:
            position_ids = position_ids.expand(batch, -1)  # (1, T) positions serve every row
        # the packed samples of each row: the mask keeps them apart, the MoE layers balance them one by one
        sequences = None
        if position_ids is not None and past == 0:
            sequences = PackedSequences.from_positions(position_ids, token_mask)
        mask = attention_layout(attention_mask, past, seq, position_ids, sequences)
        if position_ids is None:
            position_ids = torch.arange(past, past + seq, device=hidden.device).expand(batch, -1)
        rope = self.rotary_emb(position_ids, hidden.dtype)
        record_load = self.training and torch.is_grad_enabled()
        aux_loss = hidden.new_zeros((), dtype=torch.float32)
        moe_layers = self.layers[self.config.first_k_dense_replace :]
        if routed_experts is not None and routed_experts.shape[:3] != (len(moe_layers), batch, seq):
            raise ValueError(
                f"routed_experts has shape {tuple(routed_experts.shape)}, expected "
                f"({len(moe_layers)}, {batch}, {seq}, K) (num_moe_layers, batch, tokens, experts per token)"
            )
        used = []
        for index, layer in enumerate(self.layers):
            moe_index = index - self.config.first_k_dense_replace
            replay = routed_experts[moe_index] if routed_experts is not None and moe_index >= 0 else None
            hidden, layer_aux, load, experts = layer(
                hidden,
                rope,
                mask,
                cache=cache,
                token_mask=token_mask,
                routed_experts=replay,
                sequences=sequences,
            )
            if layer_aux is not None:
                aux_loss = aux_loss + layer_aux
            if load is not None and record_load:
                layer.mlp.gate.record_load(load)
            if experts is not None and output_routed_experts:
                used.append(experts.to(torch.int16))
        return DeepseekV3ModelOutput(
            last_hidden_state=self.norm(hidden),
            aux_loss=aux_loss,
            routed_experts=torch.stack(used) if used else None,
            **{CACHE_NAME: cache},
        )

    def _cache(self, cache: object, use_cache: bool) -> LatentCache | None:
        if cache is None:
            return LatentCache(self.config.num_hidden_layers) if use_cache else None
        if not isinstance(cache, LatentCache):
            raise TypeError(f"the cache must be a policy.LatentCache (MLA caches latents), got {type(cache).__name__}")
        return cache

    @classmethod
    def from_pretrained(cls, *args, **kwargs):
        raise TypeError("load DeepseekV3ForCausalLM.from_pretrained(...) and use its .model")


class DeepseekV3ForCausalLM(DeepseekV3PreTrainedModel, GenerationMixin):
    """The policy: base model, output head and `num_nextn_predict_layers` MTP modules."""

    _tied_weights_keys: ClassVar[dict[str, str]] = {"lm_head.weight": "model.embed_tokens.weight"}

    def __init__(self, config: DeepseekV3Config) -> None:
        super().__init__(config)
        self.model = DeepseekV3Model(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.mtp = nn.ModuleList(
            MTPModule(config, DecoderLayer(config, config.num_hidden_layers + k, moe=True))
            for k in range(config.num_nextn_predict_layers)
        )
        self.post_init()

    def get_decoder(self) -> DeepseekV3Model:
        return self.model

    def get_output_embeddings(self) -> nn.Linear:
        return self.lm_head

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        labels: torch.LongTensor | None = None,
        cache: LatentCache | None = None,
        use_cache: bool = False,
        logits_to_keep: int | torch.Tensor = 0,
        inputs_embeds: torch.Tensor | None = None,
        routed_experts: torch.Tensor | None = None,
        output_routed_experts: bool = False,
        **kwargs,
    ) -> DeepseekV3CausalLMOutput:
        """HF causal-LM forward. labels (B, T) are unshifted token ids, -100 where ignored; the cache
        may also come as `past_key_values`; routed_experts / output_routed_experts as in
        `DeepseekV3Model.forward` (main layers; the MTP modules always route); other extra kwargs
        than `num_items_in_batch` (used by the CE normalisation) are ignored."""
        out = self.model(
            input_ids,
            attention_mask,
            position_ids,
            pop_cache_argument(cache, kwargs),
            use_cache,
            inputs_embeds,
            routed_experts=routed_experts,
            output_routed_experts=output_routed_experts,
        )
        hidden = out.last_hidden_state
        if isinstance(logits_to_keep, int):
            kept = hidden[:, -logits_to_keep:] if logits_to_keep > 0 else hidden
        else:
            kept = hidden[:, logits_to_keep]
        logits = self.lm_head(kept)
        loss = mtp = None
        if labels is not None:
            ce = self.loss_function(
                logits=logits,
                labels=labels,
                vocab_size=self.config.vocab_size,
                num_items_in_batch=kwargs.get("num_items_in_batch"),
            )
            loss = ce + out.aux_loss
            if input_ids is not None and len(self.mtp) > 0 and self.config.mtp_loss_weight > 0:
                mtp = self.mtp_loss(hidden, input_ids, labels != -100, attention_mask, position_ids)
                loss = loss + mtp
        return DeepseekV3CausalLMOutput(
            loss=loss,
            logits=logits,
            aux_loss=out.aux_loss,
            mtp_loss=mtp,
            routed_experts=out.routed_experts,
            **{CACHE_NAME: getattr(out, CACHE_NAME)},
        )

    def mtp_loss(
        self,
        hidden_states: torch.Tensor,
        input_ids: torch.Tensor,
        loss_mask: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """(lambda / D) * sum_k CE_k from the main model's last_hidden_state (B, T, H); see policy/mtp.py.

        loss_mask (B, T) bool: True where token j is a training target (prompt and
        padding False). Pass the forward's attention_mask and position_ids for
        padded batches and packed rows (no target then lies in another sample);
        rows whose samples share a prefix are refused (the shifted targets of a
        continuing segment would run into the next one).
        Zero when the model has no MTP modules or lambda is 0.
        """
        if len(self.mtp) == 0 or self.config.mtp_loss_weight == 0:
            return hidden_states.new_zeros((), dtype=torch.float32)
        batch, seq = input_ids.shape
        sequences = None
        if position_ids is not None:
            position_ids = position_ids.expand(batch, -1)
            sequences = PackedSequences.from_positions(position_ids, attention_mask)
            if sequences.shares_prefixes:
                raise ValueError("the MTP loss takes packed rows of whole samples, not samples sharing a prefix")
        mask = attention_layout(attention_mask, 0, seq, position_ids, sequences)
        if position_ids is None:
            position_ids = torch.arange(seq, device=input_ids.device).expand(batch, -1)
        rope = self.model.rotary_emb(position_ids, hidden_states.dtype)
        loss, loads = mtp_loss(
            self.mtp,
            hidden_states,
            input_ids,
            loss_mask,
            self.model.embed_tokens,
            self.lm_head,
            rope,
            mask,
            attention_mask,
            self.config.mtp_loss_weight,
            None if sequences is None else sequences.segment,
        )
        if self.training and torch.is_grad_enabled():
            for module, load in zip(self.mtp, loads, strict=True):
                module.block.mlp.gate.record_load(load)
        return loss

    def _prepare_cache_for_generation(
        self, generation_config, model_kwargs, generation_mode, batch_size, max_cache_length
    ) -> None:
        """`generate()` hook: a latent cache preallocated for the whole generation."""
        if model_kwargs.get(CACHE_NAME) is None and generation_config.use_cache is not False:
            model_kwargs[CACHE_NAME] = LatentCache(self.config.num_hidden_layers, capacity=max_cache_length)
            return
        super()._prepare_cache_for_generation(
            generation_config, model_kwargs, generation_mode, batch_size, max_cache_length
        )

    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):
        """Accepts our layout and the released one (what `save_pretrained` writes, e.g. on Trainer resume)."""
        state_dict, _ = checkpoint.from_released(state_dict.items(), self.config)
        return super().load_state_dict(state_dict, strict=strict, assign=assign)

    def save_pretrained(
        self,
        save_directory: str | os.PathLike,
        is_main_process: bool = True,
        state_dict: dict[str, torch.Tensor] | None = None,
        max_shard_size: int | str = "5GB",
        **kwargs,
    ) -> None:
        """Writes config.json, generation_config.json and safetensors in the released layout."""
        if not is_main_process:
            return
        directory = Path(save_directory)
        directory.mkdir(parents=True, exist_ok=True)
        self.config.architectures = [type(self).__name__]
        self.config.save_pretrained(directory)
        if self.generation_config is not None:
            self.generation_config.save_pretrained(directory)
        state_dict = self.state_dict() if state_dict is None else state_dict
        checkpoint.write_safetensors(
            directory,
            checkpoint.to_released(state_dict, self.config),
            checkpoint.size_in_bytes(max_shard_size),
        )

    @classmethod
    def from_pretrained(
        cls,
        pretrained_model_name_or_path: str | os.PathLike,
        *,
        config: DeepseekV3Config | None = None,
        dtype: torch.dtype | str | None = None,
        device: torch.device | str | None = None,
        shard: Callable[[DeepseekV3ForCausalLM], object] | None = None,
        **config_overrides,
    ) -> DeepseekV3ForCausalLM:
        """Loads a local checkpoint directory in the released, transformers or our layout.

        config_overrides replace config.json fields (unknown names raise);
        `num_nextn_predict_layers=0` drops a checkpoint's MTP layers on purpose,
        `fp8=True` (or a dict of FP8Config fields) trains the loaded model in FP8.
        MTP modules the checkpoint has no weights for (transformers' DeepseekV3
        saves none) are initialised fresh, with one warning naming them; any
        other missing tensor raises. dtype defaults to config.json's.
        A checkpoint whose config.json declares FP8 block quantisation (DeepSeek-V3's
        release) is dequantised (fp8 * weight_scale_inv) into the model's dtype; the
        loaded model's config drops `quantization_config`, since its weights are no
        longer quantised. generation_config.json, when present, is the model's generation config.
        The model is built on the meta device, materialised on `device` (default CPU) and
        filled tensor by tensor (`streaming_load.load_into`): no random init, and besides the
        model at most about one checkpoint tensor in host memory. `shard` is applied to the
        model while it is still on the meta device (e.g. `lambda m: parallelize(m, mesh)`):
        then each process allocates and reads only its own slices.
        """
        directory = Path(pretrained_model_name_or_path)
        if not (directory / "config.json").is_file():
            raise FileNotFoundError(f"{directory} is not a checkpoint directory with a config.json")
        config = config if config is not None else DeepseekV3Config.from_pretrained(directory)
        unknown = sorted(key for key in config_overrides if not hasattr(config, key))
        if unknown:
            raise ValueError(f"from_pretrained: {unknown} are not DeepseekV3Config fields")
        fields = {**config.to_dict(), **config_overrides}
        fields.pop("quantization_config", None)
        config = DeepseekV3Config(**fields)
        with torch.device("meta"), _default_dtype(_resolve_dtype(config.dtype if dtype in (None, "auto") else dtype)):
            model = cls(config)  # no memory, no random init
        if shard is not None:
            if config.tie_word_embeddings:
                raise ValueError("from_pretrained(shard=...): a head tied to the embedding cannot be sharded apart")
            shard(model)
        model.to_empty(device=device if device is not None else "cpu")
        model.tie_weights()  # to_empty made new tensors: a tied head shares the embedding again
        model.init_buffers()
        load_into(model, directory, skip_extra_mtp="num_nextn_predict_layers" in config_overrides)
        model.config.name_or_path = str(directory)
        if (directory / "generation_config.json").is_file():
            model.generation_config = GenerationConfig.from_pretrained(directory)
        return model


def _resolve_dtype(dtype: torch.dtype | str | None) -> torch.dtype:
    """torch.bfloat16 / "bfloat16" / None (float32) -> a torch dtype."""
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype or torch.float32
    resolved = getattr(torch, str(dtype), None)
    if not isinstance(resolved, torch.dtype):
        raise ValueError(f"unknown dtype {dtype!r}")
    return resolved


@contextmanager
def _default_dtype(dtype: torch.dtype) -> Iterator[None]:
    """Builds modules in `dtype` (the routing buffers are fp32 by construction)."""
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(previous)


AutoModel.register(DeepseekV3Config, DeepseekV3Model, exist_ok=True)
AutoModelForCausalLM.register(DeepseekV3Config, DeepseekV3ForCausalLM, exist_ok=True)
