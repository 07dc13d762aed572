"""GRPO on math word problems, with an SFT warm start for the embedded default.

    accelerate launch recipes/grpo_math.py                                   # embedded default, CPU, minutes
    accelerate launch recipes/grpo_math.py --model PATH_OR_HUB_ID --dataset gsm8k
    accelerate launch recipes/grpo_math.py --config my.yaml --num_generations 16 --beta 0.0
    accelerate launch recipes/grpo_math.py --reward my_pkg.rewards:brevity --reward math_accuracy

Defaults: recipes/configs/grpo_math.yaml; `--help` lists every option.
"""

from r1kit.recipes.launch import run_recipe


def main(argv: list[str] | None = None) -> None:
    run_recipe("grpo_math", argv)


if __name__ == "__main__":
    main()
