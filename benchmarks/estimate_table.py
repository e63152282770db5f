# Copyright 2026 The Kandinsky 2.2 fine-tuning authors. Licensed under the Apache License, Version 2.0.
"""BENCHMARKS.md's counted memory table: `--estimate_memory` of each setting and recipe at full size, from the
configurations in benchmarks/configs (no weight, no GPU), one markdown row per command as soon as it is counted.

    python benchmarks/estimate_table.py [--stage decoder|prior|both]
"""

import argparse
import contextlib
import io
import shlex
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(REPO), str(REPO / "benchmarks"), str(REPO / "tools")]

import build  # noqa: E402
from benchmark import RECIPES, SETTINGS  # noqa: E402

GiB = 2 ** 30
# Peaks measured on the H100 (BENCHMARKS.md, 2026-11-25, our script): setting, with --cache_embeddings or not
MEASURED = {("decoder", "guide", False): 25.73, ("decoder", "guide", True): 22.15, ("decoder", "bf16-b8", False): 27.23,
            ("prior", "guide", False): 22.17, ("prior", "guide", True): 17.43, ("prior", "bf16-b32", False): 22.34,
            ("prior", "bf16-b32", True): 17.59}
OPTIMIZERS = {"adamw": "", "8-bit adam": "--use_8bit_adam", "adafactor": "--optimizer adafactor"}


def commands(stage):
    """(name, flags, measured GiB or None) of each counted command."""
    for name, flags in SETTINGS[stage].items():
        for cached in (False, True):
            yield (f"{name}{', cached' if cached else ''}", flags + (" --cache_embeddings" if cached else ""),
                   MEASURED.get((stage, name, cached)))
    for name, (_, flags) in RECIPES[stage].items():
        yield f"{name} recipe", flags, None
    # the low-memory recipe's variants: each optimizer with --full_bf16, with and without the fused pass; and
    # each with the fused pass but without --full_bf16
    base, words = [], iter(shlex.split(RECIPES[stage]["low-memory"][1]))
    for word in words:
        if word == "--optimizer":
            next(words)
        elif word not in ("--use_8bit_adam", "--fused_backward_pass", "--full_bf16"):
            base.append(word)
    for levers in ("--fused_backward_pass --full_bf16", "--full_bf16", "--fused_backward_pass"):
        for optimizer, flag in OPTIMIZERS.items():
            yield f"low-memory base, {optimizer}, {levers}", " ".join([*base, flag, levers]), None


def counted(stage, flags, folders):
    module = __import__(f"train_text_to_image_{stage}")
    args = module.parse_args([*shlex.split(flags), "--estimate_memory", "--output_dir", "/tmp/estimate-table",
                              "--pretrained_prior_model_name_or_path", str(folders["prior"]),
                              "--pretrained_decoder_model_name_or_path", str(folders["decoder"])])
    with contextlib.redirect_stdout(io.StringIO()):
        return module.main(args) / GiB


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--stage", choices=("prior", "decoder", "both"), default="both")
    parser.add_argument("--start", type=int, default=0, help="Skip each stage's first commands (a resumed table).")
    cli = parser.parse_args()
    with tempfile.TemporaryDirectory() as root:
        folders = build.build_configs(Path(root))
        print("| stage | command | flags | counted | measured (H100) | counted / measured |")
        print("|---|---|---|---|---|---|", flush=True)
        for stage in (("decoder", "prior") if cli.stage == "both" else (cli.stage,)):
            for name, flags, measured in list(commands(stage))[cli.start:]:
                figure = counted(stage, flags, folders)
                ratio = f"{figure / measured:.3f}" if measured else ""
                print(f"| {stage} | {name} | `{' '.join(flags.split())}` | {figure:.2f} GiB | "
                      f"{f'{measured:.2f} GiB' if measured else ''} | {ratio} |", flush=True)


if __name__ == "__main__":
    main()
