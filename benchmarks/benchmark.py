#!/usr/bin/env python
# Copyright 2026 The Kandinsky 2.2 fine-tuning authors. Licensed under the Apache License, Version 2.0.
"""Training throughput and peak GPU memory of the two Kandinsky 2.2 scripts, measured as a user runs them.

Full-size mode (a GPU) builds random-init models from benchmarks/configs (the real Kandinsky 2.2 architectures,
saved in fp32 safetensors as the Hub repos are) and 64 random 768x768 JPEGs, once per --work_dir, then runs each
setting with `accelerate launch`. With --reference_dir, diffusers' own scripts run the same settings side by side.
Every script is measured the same way: samples/s from the wall-clock times of the `train_loss` events that each
writes to TensorBoard once per optimizer step (after --warmup steps), and the whole process's peak GPU memory,
read by benchmarks/measure.py when the script exits. --quick does the same on the CPU with the tiny models of
tools/tiny_kandinsky.py (a smoke test of this script, not a benchmark).

    python benchmarks/benchmark.py --work_dir /data/bench --out results.jsonl \
        --reference_dir diffusers/examples/kandinsky2_2/text_to_image
    python benchmarks/benchmark.py --stage decoder --settings bf16-b8 --extra= --extra=--cache_embeddings
    python benchmarks/benchmark.py --quick
"""

import argparse
import json
import os
import re
import shlex
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from importlib.metadata import version
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
CONFIGS = REPO / "benchmarks" / "configs"
SCRIPTS = {"prior": REPO / "train_text_to_image_prior.py", "decoder": REPO / "train_text_to_image_decoder.py"}
STAGES = ("prior", "decoder")

# The settings of the project's issue: the guide's commands, and bf16 with the batch that fills an 80 GB GPU.
SETTINGS = {
    "prior": {
        "guide": "--mixed_precision fp16 --train_batch_size 1 --gradient_accumulation_steps 4",
        "bf16-b32": "--mixed_precision bf16 --train_batch_size 32",
    },
    "decoder": {
        "guide": "--mixed_precision fp16 --resolution 768 --train_batch_size 1 --gradient_accumulation_steps 4 "
                 "--gradient_checkpointing",
        "bf16-b8": "--mixed_precision bf16 --resolution 768 --train_batch_size 8 --gradient_checkpointing",
    },
}
# The CPU has no fp16 autocast, so --quick has one fp32 setting per stage.
QUICK_SETTINGS = {stage: {"cpu-fp32": "--mixed_precision no"} for stage in STAGES}
COMMON_FLAGS = ("--checkpointing_steps 100000 --report_to tensorboard --learning_rate 1e-5 --lr_warmup_steps 0 "
                "--seed 0")
FULL_FLAGS = "--dataloader_num_workers 4"
QUICK_FLAGS = "--dataloader_num_workers 0 --resolution 64 --train_batch_size 2"
WORDS = ("a photo of red blue green small large old new cat dog house tree car river mountain city street "
         "portrait painting sunset forest robot flower bird boat in the with on").split()


# --------------------------------------------------------------------------------------------------------------
# Models and data
# --------------------------------------------------------------------------------------------------------------


def _config(stage, name):
    return json.loads((CONFIGS / stage / f"{name}.json").read_text())


def _hf_config(name):
    # transformers' config classes take the fields, not the checkpoint's bookkeeping keys
    return {k: v for k, v in _config("prior", name).items() if k not in ("architectures", "model_type")}


def build_prior(path, device):
    import torch
    from diffusers import KandinskyV22PriorPipeline, PriorTransformer, UnCLIPScheduler
    from transformers import CLIPImageProcessor, CLIPTextConfig, CLIPTextModelWithProjection, CLIPVisionConfig
    from transformers import CLIPVisionModelWithProjection

    import tiny_kandinsky

    torch.manual_seed(0)
    with device:  # random init on the GPU takes seconds; 3.6 B parameters on the CPU take minutes
        prior = PriorTransformer.from_config(_config("prior", "prior"))
        text_encoder = CLIPTextModelWithProjection(CLIPTextConfig(**_hf_config("text_encoder")))
        image_encoder = CLIPVisionModelWithProjection(CLIPVisionConfig(**_hf_config("image_encoder")))
    with torch.no_grad():  # the scripts divide by clip_std, which an untrained prior holds as zeros
        prior.clip_mean.zero_()
        prior.clip_std.fill_(1.0)
    tokenizer = tiny_kandinsky.write_clip_tokenizer(path.parent / "_tokenizer")  # CLIP's real 49,408-token BPE
    KandinskyV22PriorPipeline(
        prior=prior, text_encoder=text_encoder, image_encoder=image_encoder, tokenizer=tokenizer,
        image_processor=CLIPImageProcessor(**_config("prior", "image_processor")),
        scheduler=UnCLIPScheduler.from_config(_config("prior", "scheduler"))).save_pretrained(str(path))
    shutil.rmtree(path.parent / "_tokenizer")


def build_decoder(path, device):
    import torch
    from diffusers import DDPMScheduler, KandinskyV22Pipeline, UNet2DConditionModel, VQModel

    torch.manual_seed(0)
    with device:
        unet = UNet2DConditionModel.from_config(_config("decoder", "unet"))
        movq = VQModel.from_config(_config("decoder", "movq"))
    KandinskyV22Pipeline(unet=unet, movq=movq, scheduler=DDPMScheduler.from_config(_config("decoder", "scheduler"))
                         ).save_pretrained(str(path))


def build_images(path, device=None, count=64, size=768):
    """Smooth random colour fields plus a little grain: JPEGs of photo-like size and decode cost (white noise would
    be several times larger), each with a random caption."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    path.mkdir(parents=True)
    rows = []
    for i in range(count):
        low = Image.fromarray(rng.integers(0, 256, (12, 12, 3), dtype=np.uint8)).resize((size, size), Image.BICUBIC)
        pixels = np.asarray(low, np.int16) + rng.integers(-8, 9, (size, size, 3))
        Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)).save(path / f"{i:03d}.jpg", quality=90)
        rows.append({"file_name": f"{i:03d}.jpg", "text": " ".join(rng.choice(WORDS, 8))})
    (path / "metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))


def build_full(root):
    """The full-size repos and image folder under root; each part is built once (a .done marker says complete)."""
    import torch

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    for name, build in (("prior", build_prior), ("decoder", build_decoder), ("images", build_images)):
        path, done = root / name, root / f"{name}.done"
        if done.exists():
            continue
        shutil.rmtree(path, ignore_errors=True)  # a half-built leftover of an interrupted run
        print(f"Building {path} on {device.type} ...", file=sys.stderr, flush=True)
        start = time.perf_counter()
        build(path, device)
        done.touch()
        print(f"  done in {time.perf_counter() - start:.0f} s", file=sys.stderr, flush=True)
        if device.type == "cuda":
            torch.cuda.empty_cache()  # give the memory back before the training subprocesses start
    return {name: root / name for name in ("prior", "decoder", "images")}


def build_quick(root):
    import tiny_kandinsky

    done = root / "tiny.done"
    if not done.exists():
        shutil.rmtree(root / "tiny", ignore_errors=True)
        tiny_kandinsky.build_all(str(root / "tiny"))
        done.touch()
    return {name: root / "tiny" / name for name in ("prior", "decoder", "images")}


# --------------------------------------------------------------------------------------------------------------
# Runs
# --------------------------------------------------------------------------------------------------------------


def flag_value(flags, name, default):
    """The value argparse will see for a flag: its last occurrence, as `--flag value` or `--flag=value`."""
    value = default
    for i, flag in enumerate(flags):
        if flag == name and i + 1 < len(flags):
            value = flags[i + 1]
        elif flag.startswith(name + "="):
            value = flag.split("=", 1)[1]
    return value


def launch(script, script_args, run_dir, cpu_only=False):
    """`accelerate launch` one process of `script` through measure.py; logs and peak.json go to run_dir."""
    precision = flag_value(script_args, "--mixed_precision", "no")  # Accelerate and the script must agree
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", "1", "--num_machines", "1",
           "--dynamo_backend", "no", "--mixed_precision", precision, str(REPO / "benchmarks" / "measure.py"),
           str(script), *script_args]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "PYTHONUNBUFFERED": "1",
           "BENCH_PEAK_FILE": str(run_dir / "peak.json")}
    if cpu_only:
        env["CUDA_VISIBLE_DEVICES"] = ""  # --quick measures the CPU path even on a GPU machine
    print(f"  {shlex.join(cmd)}", file=sys.stderr, flush=True)
    with open(run_dir / "stdout.log", "w") as out, open(run_dir / "stderr.log", "w") as err:
        return subprocess.run(cmd, cwd=REPO, env=env, stdout=out, stderr=err).returncode


def run_setting(stage, setting, flags, paths, cli, run_dir, script):
    """Launch one training run of `script`; return its figures, or {"failed": why} (with the stderr tail printed)."""
    shutil.rmtree(run_dir, ignore_errors=True)  # stale event files would mix into the figures
    output_dir = run_dir / "output"
    output_dir.mkdir(parents=True)
    script_args = [
        *shlex.split(COMMON_FLAGS), *shlex.split(QUICK_FLAGS if cli.quick else FULL_FLAGS), *shlex.split(flags),
        "--max_train_steps", str(cli.warmup + cli.steps + 1), "--train_data_dir", str(paths["images"]),
        "--pretrained_prior_model_name_or_path", str(paths["prior"]),
        "--pretrained_decoder_model_name_or_path", str(paths["decoder"]),
        "--output_dir", str(output_dir), *shlex.split(cli.extra)]
    print(f"Running {stage} / {setting} / {cli.label}", file=sys.stderr, flush=True)
    start = time.perf_counter()
    returncode = launch(script, script_args, run_dir, cpu_only=cli.quick)
    wall = time.perf_counter() - start
    if returncode != 0:  # say why, and go on: a GPU session is too short to lose the other runs
        tail = (run_dir / "stderr.log").read_text(errors="replace").splitlines()[-40:]
        print(f"\n{script} failed with exit code {returncode} ({stage} / {setting}); stderr tail:\n"
              + "\n".join(tail), file=sys.stderr, flush=True)

    from kandinsky_train.tracking import read_scalars

    losses = read_scalars(output_dir / "logs").get("train_loss", {})
    # Steps warmup+1 .. warmup+steps, timed between their train_loss events. The run has one step more, left out
    # for every script alike: ours log a step's figures when the next step ends (reading them then never stalls
    # the GPU), so the last event of a run, written as soon as training ends, comes early.
    measured = sorted(step for step in losses if cli.warmup <= step <= cli.warmup + cli.steps)
    if len(measured) < 2:
        print(f"Too few train_loss events after step {cli.warmup} under {output_dir / 'logs'}.", file=sys.stderr)
        return {"failed": f"exit code {returncode}, too few train_loss events", "wall_seconds": round(wall, 1),
                "script_args": shlex.join(script_args)}
    batch = int(flag_value(script_args, "--train_batch_size", 1)) * int(
        flag_value(script_args, "--gradient_accumulation_steps", 1))
    speeds = [batch * (b - a) / (losses[b][0] - losses[a][0]) for a, b in zip(measured, measured[1:])
              if losses[b][0] > losses[a][0]]
    elapsed = losses[measured[-1]][0] - losses[measured[0]][0]
    peak = json.loads((run_dir / "peak.json").read_text())["peak_memory_gib"]
    for item in output_dir.iterdir():  # keep the logs; the saved pipeline is gigabytes nobody reads
        if item.name != "logs":
            shutil.rmtree(item) if item.is_dir() else item.unlink()
    # A script that fails after training (the reference's final save, say) still measured its steps: kept, with the
    # exit code beside the figures.
    return {"exit_code": returncode, "samples_per_second": batch * (measured[-1] - measured[0]) / elapsed,
            "samples_per_second_median": statistics.median(speeds), "peak_memory_gib": peak,
            "measured_steps": measured[-1] - measured[0], "final_train_loss": losses[measured[-1]][1],
            "wall_seconds": round(wall, 1), "mixed_precision": flag_value(script_args, "--mixed_precision", "no"),
            "script_args": shlex.join(script_args)}


def device_name(quick):
    import torch

    return torch.cuda.get_device_name(0) if torch.cuda.is_available() and not quick else "cpu"


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--stage", choices=("prior", "decoder", "both"), default="both")
    parser.add_argument("--steps", type=int, default=None, help="Measured optimizer steps (default 30; --quick 4).")
    parser.add_argument("--warmup", type=int, default=None,
                        help="Optimizer steps run before measuring (default 10; --quick 1).")
    parser.add_argument("--quick", action="store_true",
                        help="CPU smoke run: tiny models, 64 px, batch 2. Its figures say nothing about a GPU.")
    parser.add_argument("--work_dir", default=None,
                        help="Where models, images and runs go; reuse it to skip rebuilding the models "
                        "(default: a new temporary folder, removed at the end).")
    parser.add_argument("--out", default=None, help="Append one JSON line per run to this file.")
    parser.add_argument("--settings", action="append", default=None, metavar="NAME",
                        help="A named setting to run (repeatable). Default: all of the stage's settings. "
                        + "; ".join(f"{stage}: {', '.join(SETTINGS[stage])}" for stage in STAGES) + ".")
    parser.add_argument("--extra", action="append", default=None,
                        help='More flags for our training script, e.g. "--cache_embeddings". Repeatable: each value '
                        'is one variant of ours, run in turn after the reference ("" is ours as is).')
    parser.add_argument("--without", action="append", default=[], metavar="SWITCH",
                        help="Drop a switch from the named settings, e.g. --without gradient_checkpointing "
                        "(a store_true flag cannot be turned off from --extra).")
    parser.add_argument("--label", default=None, help="Name of this variant in the output (default: from --extra "
                        'and --without, else "baseline").')
    parser.add_argument("--reference_dir", default=None,
                        help="A folder with diffusers' train_text_to_image_prior.py / train_text_to_image_decoder.py "
                        "(examples/kandinsky2_2/text_to_image of a diffusers checkout): each setting also runs them, "
                        "without --extra, and the table gives our speed-up. They take the same command line.")
    cli = parser.parse_args(argv)
    cli.steps = cli.steps if cli.steps is not None else (4 if cli.quick else 30)
    cli.warmup = cli.warmup if cli.warmup is not None else (1 if cli.quick else 10)
    if cli.steps < 1 or cli.warmup < 0:
        parser.error("--steps must be at least 1 and --warmup at least 0.")
    cli.without = [w.lstrip("-") for w in cli.without]
    cli.extra = cli.extra or [""]
    without = [f"without --{w}" for w in cli.without]
    cli.labels = [cli.label or " ".join([extra.strip()] + without).strip() or "baseline" for extra in cli.extra]
    stages = STAGES if cli.stage == "both" else (cli.stage,)
    table = QUICK_SETTINGS if cli.quick else SETTINGS
    known = {name for stage in stages for name in table[stage]}
    unknown = sorted(set(cli.settings or ()) - known)
    if cli.reference_dir is not None:
        missing = [p.name for p in SCRIPTS.values() if not (Path(cli.reference_dir) / p.name).is_file()]
        if missing:
            parser.error(f"--reference_dir {cli.reference_dir} has no {', '.join(missing)}.")
    if unknown:
        parser.error(f"unknown setting(s) {', '.join(unknown)} for --stage {cli.stage}"
                     f"{' --quick' if cli.quick else ''}; known: {', '.join(sorted(known))}.")
    # A setting named for one stage only runs where it exists (e.g. bf16-b8 with --stage both: the decoder).
    cli.runs = [(stage, name, " ".join(f for f in flags.split() if f.lstrip("-") not in cli.without))
                for stage in stages for name, flags in table[stage].items()
                if cli.settings is None or name in cli.settings]
    return cli


def main(argv=None):
    cli = parse_args(argv)
    sys.path[:0] = [str(REPO), str(REPO / "tools")]  # kandinsky_train and tiny_kandinsky
    work_dir = Path(cli.work_dir or tempfile.mkdtemp(prefix="kandinsky-bench-")).resolve()
    work_dir.mkdir(parents=True, exist_ok=True)
    try:
        paths = build_quick(work_dir) if cli.quick else build_full(work_dir)
        device = device_name(cli.quick)
        versions = {lib: version(lib) for lib in ("torch", "diffusers", "transformers", "accelerate")}
        print("| GPU | stage | settings | script | variant | samples/s (mean / median) | peak allocated GiB | "
              "speed-up |\n|---|---|---|---|---|---|---|---|", flush=True)
        for stage, setting, flags in cli.runs:
            runs = [("ours", SCRIPTS[stage], extra, label) for extra, label in zip(cli.extra, cli.labels)]
            if cli.reference_dir is not None:  # the reference has none of our flags: it runs without --extra
                runs.insert(0, ("reference", Path(cli.reference_dir).resolve() / SCRIPTS[stage].name, "", "as is"))
            reference_speed = None
            for name, script, extra, label in runs:
                slug = re.sub(r"[^A-Za-z0-9._-]+", "_", f"{stage}-{setting}-{name}-{label}")
                run_cli = argparse.Namespace(**{**vars(cli), "extra": extra, "label": f"{name}, {label}"})
                result = run_setting(stage, setting, flags, paths, run_cli, work_dir / "runs" / slug, script)
                if "failed" in result:
                    print(f"| {device} | {stage} | {setting}: `{flags}` | {name} | {label} | failed: "
                          f"{result['failed']} | | |", flush=True)
                    continue
                speed = result["samples_per_second"]
                label += f" (exit code {result['exit_code']} after training)" if result["exit_code"] else ""
                reference_speed = speed if name == "reference" else reference_speed
                peak = "n/a (CPU)" if result["peak_memory_gib"] is None else f"{result['peak_memory_gib']:.1f}"
                ratio = f"{speed / reference_speed:.2f}x" if reference_speed and name == "ours" else ""
                print(f"| {device} | {stage} | {setting}: `{flags}` | {name} | {label} | {speed:.2f} / "
                      f"{result['samples_per_second_median']:.2f} | {peak} | {ratio} |", flush=True)
                if cli.out:
                    record = {"stage": stage, "setting": setting, "script": name, "label": label, "extra": extra,
                              "without": cli.without, "device": device, "quick": cli.quick, "warmup": cli.warmup,
                              "steps": cli.steps, **result, "versions": versions,
                              "time": datetime.now(timezone.utc).isoformat(timespec="seconds")}
                    with open(cli.out, "a") as f:
                        f.write(json.dumps(record) + "\n")
    finally:
        if cli.work_dir is None:  # a temporary folder holds ~20 GB of full-size models: do not leave it behind
            shutil.rmtree(work_dir, ignore_errors=True)


if __name__ == "__main__":
    main()
