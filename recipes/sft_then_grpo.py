"""The DeepSeek-R1 pipeline on any model and dataset: SFT, then GRPO from the SFT checkpoint.

    accelerate launch recipes/sft_then_grpo.py --model PATH_OR_HUB_ID --dataset PATH_TO_GSM8K
    accelerate launch recipes/sft_then_grpo.py --config recipes/configs/sft_then_grpo.yaml

The SFT checkpoint is written to OUTPUT_DIR/sft and handed to GRPO; held-out
accuracy of both checkpoints is printed at the end. Defaults:
recipes/configs/sft_then_grpo.yaml; `--help` lists every option.
"""

from r1kit.recipes.launch import run_recipe


def main(argv: list[str] | None = None) -> None:
    run_recipe("sft_then_grpo", argv)


if __name__ == "__main__":
    main()
