"""Weight loading inside vLLM's GPU workers (`worker_extension_cls="r1kit.rollout.vllm_extension.WeightSyncExtension"`).

vLLM mixes this class into each of its workers (one per tensor-parallel rank);
`LLM.collective_rpc("r1kit_...")` runs a method on all of them at once. Each
worker loads full (unsharded) tensors through its model's own `load_weights`,
whose weight loaders take this rank's shard, then runs vLLM's
`process_weights_after_loading` once per update: that step rebuilds what vLLM
derives from the raw weights (MLA's absorbed W_UK / W_UV from `kv_b_proj`,
kernel-specific layouts), which would otherwise keep serving the old weights.

Server mode: every worker joins the trainer's weight-sync group as ranks
first_rank + (its vLLM world rank) and receives the buckets itself.
Colocated mode: the engine lives in the trainer process, so the tensors are
handed over directly (`r1kit_load_weights`), no copy through a group.

Quantized vLLM weights (fp8 checkpoints, online quantization) are not
supported for in-place updates: serve the policy in bf16/fp16.
"""

from __future__ import annotations

from collections.abc import Iterable

from torch import Tensor

from r1kit.rollout.buckets import Bucket
from r1kit.rollout.sync_group import Rendezvous, WeightSyncGroup, receive_buckets
from r1kit.rollout.vllm_weights import vllm_named_weights


class WeightSyncExtension:
    """Methods added to vLLM's worker class; `self` is the vLLM worker (model_runner, device, model_config)."""

    def r1kit_join_weight_sync(self, rendezvous: Rendezvous, first_rank: int, local_host: str) -> None:
        from vllm.distributed.parallel_state import get_world_group

        self.r1kit_leave_weight_sync()
        self._r1kit_group = WeightSyncGroup(
            rendezvous, first_rank + get_world_group().rank, device=self.device, local_host=local_host
        )

    def r1kit_receive_weights(self, plan: list[Bucket]) -> None:
        """Receives every bucket of `plan`, loads it, then finishes the update.

        All buckets are received even after a load error (the group stays in
        step with the trainer); the first error is raised at the end.
        """
        group = getattr(self, "_r1kit_group", None)
        if group is None:
            raise RuntimeError("no weight-sync group: the trainer must send JoinSyncGroup first")
        error: Exception | None = None
        for named_tensors in receive_buckets(group, plan, self.device):
            if error is None:
                try:
                    self.r1kit_load_weights(named_tensors)
                except Exception as load_error:
                    error = load_error
        if error is not None:
            raise error
        self.r1kit_finish_weights()

    def r1kit_load_weights(self, named_tensors: Iterable[tuple[str, Tensor]]) -> None:
        """Loads (trainer-named) tensors into this rank's shard of the model."""
        model = self.model_runner.model
        model.load_weights(weights=list(vllm_named_weights(named_tensors, self.model_config.hf_config)))

    def r1kit_finish_weights(self) -> None:
        """Rebuilds the weights vLLM derives from the loaded ones; call once after the last tensor."""
        import torch
        from vllm.model_executor.model_loader.utils import process_weights_after_loading

        process_weights_after_loading(self.model_runner.model, self.model_config, self.device)
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def r1kit_leave_weight_sync(self) -> None:
        group = getattr(self, "_r1kit_group", None)
        if group is not None:
            group.close()
        self._r1kit_group = None
