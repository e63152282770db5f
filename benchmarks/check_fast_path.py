#!/usr/bin/env python
# Copyright 2026 The Kandinsky 2.2 fine-tuning authors. Licensed under the Apache License, Version 2.0.
"""Correctness of the fast paths on a GPU, on the full-size models of benchmark.py (same --work_dir).

    python benchmarks/check_fast_path.py --work_dir /data/bench --out checks.jsonl [--only curves|options]

curves:  each stage trains --curve_steps steps in bf16 with the same seed and data, with and without
         --cache_embeddings; the two train_loss curves are compared (the runs differ in rounding only, so their
         means over the run must agree within the steps' own spread).
options: --mixed_precision fp16 (GradScaler) and --use_8bit_adam each train a few steps per stage; the losses must
         be finite and the saved output must load in the diffusers pipeline and generate one image without NaN.
One JSON line per check goes to --out; a summary table to stdout.
"""

import argparse
import json
import math
import shutil
import statistics
import sys
from pathlib import Path

sys.path[:0] = [str(Path(__file__).resolve().parent), str(Path(__file__).resolve().parent.parent)]

import benchmark  # noqa: E402  (benchmarks/ is not a package)

BATCH = {"prior": 8, "decoder": 2}
RESOLUTION = 768  # the guide's
OPTIONS = {"fp16": "--mixed_precision fp16", "8-bit Adam": "--mixed_precision bf16 --use_8bit_adam"}
# The CPU (gpu_check.py --quick) has no fp16 autocast and no bitsandbytes: a plain run proves the check's plumbing.
QUICK_OPTIONS = {"fp16": "--mixed_precision no"}
CACHE_VARIANTS = (("uncached", ""), ("cached", "--cache_embeddings"))


def train(stage, flags, steps, paths, run_dir, quick=False):
    """One run of our script; returns ({step: loss}, output folder, peak GiB) or (None, why, None). quick: the tiny
    models on the CPU (benchmark.py's --quick sizes)."""
    shutil.rmtree(run_dir, ignore_errors=True)
    output_dir = run_dir / "output"
    output_dir.mkdir(parents=True)
    size = benchmark.QUICK_FLAGS if quick else (f"{benchmark.FULL_FLAGS} --resolution {RESOLUTION} "
                                                f"--train_batch_size {BATCH[stage]}")
    script_args = [*benchmark.COMMON_FLAGS.split(), *size.split(), *flags.split(), "--max_train_steps", str(steps),
                   "--train_data_dir", str(paths["images"]), "--pretrained_prior_model_name_or_path",
                   str(paths["prior"]), "--pretrained_decoder_model_name_or_path", str(paths["decoder"]),
                   "--output_dir", str(output_dir)]
    print(f"Checking {stage}: {flags}", file=sys.stderr, flush=True)
    if benchmark.launch(benchmark.SCRIPTS[stage], script_args, run_dir, cpu_only=quick) != 0:
        tail = (run_dir / "stderr.log").read_text(errors="replace").splitlines()[-30:]
        print("\n".join(tail), file=sys.stderr, flush=True)
        drop_weights(output_dir)
        why = [line for line in tail if "error" in line.lower() and "CalledProcessError" not in line
               and "raise " not in line]  # the script's own message, not the launcher's
        return None, (why or tail)[-1], None
    from kandinsky_train.tracking import read_scalars

    losses = read_scalars(output_dir / "logs").get("train_loss", {})
    peak = json.loads((run_dir / "peak.json").read_text())["peak_memory_gib"]
    return {step: value for step, (_, value) in sorted(losses.items())}, output_dir, peak


def generate(stage, output_dir):
    """Load the saved output in its diffusers pipeline and return the generated image as an array."""
    import numpy as np
    import torch
    from diffusers import KandinskyV22Pipeline, KandinskyV22PriorPipeline

    device, dtype = ("cuda", torch.float16) if torch.cuda.is_available() else ("cpu", torch.float32)
    torch.manual_seed(0)
    if stage == "prior":
        pipe = KandinskyV22PriorPipeline.from_pretrained(str(output_dir), torch_dtype=dtype).to(device)
        result = pipe("a photo of a red house", num_inference_steps=4).image_embeds
    else:
        pipe = KandinskyV22Pipeline.from_pretrained(str(output_dir), torch_dtype=dtype).to(device)
        embeds = torch.randn(1, pipe.unet.config.encoder_hid_dim, device=device, dtype=dtype)
        result = pipe(image_embeds=embeds, negative_image_embeds=torch.zeros_like(embeds), height=256, width=256,
                      num_inference_steps=4, output_type="np").images
    del pipe
    if device == "cuda":
        torch.cuda.empty_cache()
    return np.asarray(result.float().cpu() if torch.is_tensor(result) else result)


def drop_weights(output_dir):
    """Keep a run's logs, remove its saved weights: a full-size prior output is 14 GB, and a 64 GB disk holds the
    models and four of them (the first GPU session's checks ran out of space so)."""
    for item in Path(output_dir).iterdir():
        if item.name != "logs":
            shutil.rmtree(item) if item.is_dir() else item.unlink()


def check_curves(stage, steps, paths, work_dir, variants=CACHE_VARIANTS, check="cache curve", quick=False):
    """Two bf16 runs of `steps` steps from the same seed that must differ in rounding only (variants: two (label,
    flags) pairs): their mean losses must agree within the steps' own spread."""
    curves, peaks = {}, {}
    for label, extra in variants:
        losses, output, peak = train(stage, f"--mixed_precision bf16 {extra}", steps, paths,
                                     work_dir / "checks" / f"{stage}-curve-{label}", quick)
        if losses is None:
            return {"check": check, "stage": stage, "ok": False, "why": f"{label}: {output}"}
        curves[label], peaks[label] = [losses[s] for s in sorted(losses)], peak
        drop_weights(output)
    (first, a), (second, b) = curves.items()
    n = min(len(a), len(b))
    spread = statistics.pstdev(a[:n] + b[:n])
    # Two curves that differ only by rounding: the mean difference is a small fraction of one step's spread.
    mean_diff = statistics.fmean(x - y for x, y in zip(a[:n], b[:n]))
    limit = 3 * spread / math.sqrt(n)
    return {"check": check, "stage": stage, "steps": n, f"mean_{first}": statistics.fmean(a[:n]),
            f"mean_{second}": statistics.fmean(b[:n]), "mean_difference": mean_diff, "limit": limit,
            f"first_steps_{first}": a[:5], f"first_steps_{second}": b[:5], "peak_memory_gib": peaks,
            "max_abs_difference": max(abs(x - y) for x, y in zip(a[:n], b[:n])),
            "ok": abs(mean_diff) <= limit, f"curve_{first}": a, f"curve_{second}": b}


def check_weights(stage, steps, paths, work_dir, variants, check, quick=False):
    """Two bf16 runs of `steps` steps from the same seed that must end with the same weights (variants: two (label,
    flags) pairs, the fused pass and the plain step with clipping out of reach): the largest difference between
    their trained weights must be a small share (under 2%) of the largest change training made."""
    from safetensors.torch import load_file

    sub = "prior" if stage == "prior" else "unet"
    start = load_file(next((Path(paths[stage]) / sub).glob("*.safetensors")))
    trained = {}
    for label, extra in variants:
        losses, output, _ = train(stage, f"--mixed_precision bf16 {extra}", steps, paths,
                                  work_dir / "checks" / f"{stage}-weights-{label}", quick)
        if losses is None:
            return {"check": check, "stage": stage, "ok": False, "why": f"{label}: {output}"}
        trained[label] = {}
        for file in (Path(output) / sub).glob("*.safetensors"):
            trained[label].update(load_file(file))
        drop_weights(output)
    (first, a), (second, b) = trained.items()
    moved = max((a[k].float() - start[k].float()).abs().max().item() for k in start)
    difference = max((a[k].float() - b[k].float()).abs().max().item() for k in start)
    return {"check": check, "stage": stage, "steps": steps, "max_change": moved, "max_difference": difference,
            "ok": moved > 0 and difference <= 0.02 * moved}


def check_option(stage, name, paths, work_dir, steps=6, quick=False):
    flags = (QUICK_OPTIONS if quick else OPTIONS)[name]
    losses, output, peak = train(stage, flags, steps, paths,
                                 work_dir / "checks" / f"{stage}-{name.replace(' ', '')}", quick)
    if losses is None:
        return {"check": name, "stage": stage, "ok": False, "why": output}
    record = {"check": name, "stage": stage, "flags": flags, "losses": list(losses.values()),
              "peak_memory_gib": peak}
    try:
        image = generate(stage, output)
    except Exception as error:  # noqa: BLE001  (recorded, not hidden: the check fails with the reason)
        return {**record, "ok": False, "why": f"pipeline did not load or generate: {error!r}"}
    finally:
        drop_weights(output)
    finite = all(math.isfinite(v) for v in losses.values()) and bool(__import__("numpy").isfinite(image).all())
    return {**record, "generated_shape": list(image.shape), "ok": finite}


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work_dir", required=True, help="benchmark.py's --work_dir (models are built if absent).")
    parser.add_argument("--out", required=True, help="Append one JSON line per check to this file.")
    parser.add_argument("--stage", choices=("prior", "decoder", "both"), default="both", help="Which stage.")
    parser.add_argument("--only", choices=("curves", "options"), default=None, help="Run one kind of check.")
    parser.add_argument("--curve_steps", type=int, default=100, help="Steps of each loss curve.")
    cli = parser.parse_args()
    work_dir = Path(cli.work_dir).resolve()
    paths = benchmark.build_full(work_dir)
    stages = benchmark.STAGES if cli.stage == "both" else (cli.stage,)
    checks = []
    for stage in stages:
        if cli.only in (None, "curves"):
            checks.append(lambda stage=stage: check_curves(stage, cli.curve_steps, paths, work_dir))
        if cli.only in (None, "options"):
            checks += [lambda stage=stage, name=name: check_option(stage, name, paths, work_dir) for name in OPTIONS]
    print(CHECK_TABLE_HEADER, flush=True)
    for check in checks:
        report(check(), cli.out)


CHECK_TABLE_HEADER = "| stage | check | result | detail |\n|---|---|---|---|"


def report(record, out):
    """One check's Markdown row on stdout (curves left out) and its JSON line in `out`; returns its outcome."""
    outcome = "ok" if record["ok"] else ("skipped" if "skipped" in record else "FAILED")
    detail = {k: v for k, v in record.items() if not k.startswith("curve_") and k not in ("check", "stage", "ok")}
    print(f"| {record['stage']} | {record['check']} | {outcome} | {json.dumps(detail)[:300]} |", flush=True)
    with open(out, "a") as f:
        f.write(json.dumps(record) + "\n")
    return outcome

if __name__ == "__main__":
    main()
