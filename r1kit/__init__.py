"""r1kit: SFT then GRPO for DeepSeek-R1-style reasoning models.

The subpackages, each in its own top-level folder of the repository:

    r1kit.policy    the DeepSeek-V3 policy (MLA, DeepSeekMoE, MTP, FP8) and model loading
    r1kit.rollout   rollout engines (built-in torch, vLLM), worker processes, weight sync
    r1kit.rewards   rule-based and model-based rewards, run under time limits
    r1kit.grpo      the GRPO loss, advantages, trainer, checkpoints, metrics, report
    r1kit.sft       supervised fine-tuning and rejection sampling
    r1kit.recipes   the runnable recipes and their configs (also the `r1kit` command)
"""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("r1kit")
except PackageNotFoundError:  # imported from a source tree that was never installed
    __version__ = "0+unknown"
