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
import functools
import json
import os
import re
import shlex
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from importlib.metadata import version
from pathlib import Path

import flops
from build import build_full, build_quick

REPO = Path(__file__).resolve().parent.parent
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
# Our flags for a goal rather than for a like-for-like comparison: one table row each, run by our script alone and
# compared with the reference at the setting named first. A recipe whose flags this checkout's script does not
# accept (read from its --help) is skipped with a note: the low-memory one needs issue 24's --fused_backward_pass
# and --full_bf16.
# The low-memory recipe, the README's word for word (tests/test_benchmark.py): Adafactor, whose factored moments
# count smallest of the optimizers (kandinsky_train/optimizers.state_bytes: 0.007 GiB for the decoder UNet, against
# 1.24 for 4-bit AdamW, 2.37 for 8-bit, 9.34 for AdamW); the prior takes it without --resolution.
LOW_MEMORY = ("--mixed_precision bf16 --resolution 768 --train_batch_size 1 --fused_backward_pass --full_bf16 "
              "--gradient_checkpointing --cache_embeddings --optimizer adafactor")
RECIPES = {
    "prior": {
        "low-memory": ("guide", LOW_MEMORY.replace(" --resolution 768", "")),
        "fastest": ("bf16-b32", "--mixed_precision bf16 --train_batch_size 32 --cache_embeddings --allow_tf32 "
                                "--torch_compile"),
    },
    "decoder": {
        "low-memory": ("guide", LOW_MEMORY),
        "fastest": ("bf16-b8", "--mixed_precision bf16 --resolution 768 --train_batch_size 8 --cache_embeddings "
                               "--allow_tf32 --torch_compile"),
        # the guide's command on a 24 GB card: the cache and one memory flag
        "24gb-card": ("guide", SETTINGS["decoder"]["guide"] + " --cache_embeddings --use_8bit_adam"),
    },
}
# --quick keeps a recipe's levers but not its size (QUICK_FLAGS'), nor what needs CUDA (bitsandbytes) or takes
# minutes a graph on a CPU (Inductor's C++ builds). Flag -> how many values follow it.
QUICK_DROPPED = {"--resolution": 1, "--train_batch_size": 1, "--use_8bit_adam": 0, "--torch_compile": 0}


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


def launch(script, script_args, run_dir, cpu_only=False, env=None):
    """`accelerate launch` one process of `script` through measure.py; logs and peak.json go to run_dir. env: more
    environment variables (measure.py's profiler)."""
    precision = flag_value(script_args, "--mixed_precision", "no")  # Accelerate and the script must agree
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", "1", "--num_machines", "1",
           "--dynamo_backend", "no", "--mixed_precision", precision, str(REPO / "benchmarks" / "measure.py"),
           str(script), *script_args]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "PYTHONUNBUFFERED": "1",
           "BENCH_PEAK_FILE": str(run_dir / "peak.json"), **(env or {})}
    if cpu_only:
        env["CUDA_VISIBLE_DEVICES"] = ""  # --quick measures the CPU path even on a GPU machine
    print(f"  {shlex.join(cmd)}", file=sys.stderr, flush=True)
    with open(run_dir / "stdout.log", "w") as out, open(run_dir / "stderr.log", "w") as err:
        proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=out, stderr=err, start_new_session=True)
        try:
            return proc.wait()
        except BaseException:  # a run cut short (gpu_check.py's time budget, Ctrl-C): the script with its launcher
            os.killpg(proc.pid, signal.SIGKILL)
            raise


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
    estimate = None if cli.quick else start_estimate(script, script_args, run_dir)
    start = time.perf_counter()
    try:
        returncode = launch(script, script_args, run_dir, cpu_only=cli.quick)
    except BaseException:  # cut (gpu_check.py's budget, Ctrl-C): the estimate goes with the run
        if estimate is not None:
            os.killpg(estimate.pid, signal.SIGKILL)
        raise
    wall = time.perf_counter() - start
    estimated = estimated_peak(estimate, run_dir)
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
            "estimated_peak_gib": estimated, "script_args": shlex.join(script_args)}


ESTIMATE_LINE = re.compile(r"Estimated peak device memory: ([0-9.]+) GiB")


def start_estimate(script, script_args, run_dir):
    """The same command with --estimate_memory (issue 30), on the CPU beside the run (it reads no weight), so that
    its figure stands beside the measured peak at no cost of GPU time. None where the script has no such flag (the
    reference's, a checkout without it)."""
    if "--estimate_memory" not in accepted_flags(script):
        return None
    precision = flag_value(script_args, "--mixed_precision", "no")
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", "1", "--num_machines", "1",
           "--dynamo_backend", "no", "--mixed_precision", precision, str(script), *script_args, "--estimate_memory"]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "CUDA_VISIBLE_DEVICES": ""}
    with open(run_dir / "estimate.log", "w") as log:
        return subprocess.Popen(cmd, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)


def estimated_peak(proc, run_dir, wait_s=120):
    """The GiB of the estimate's last line naming the peak, or None (no estimate, it failed or took too long)."""
    if proc is None:
        return None
    try:
        proc.wait(timeout=wait_s)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        return None
    found = ESTIMATE_LINE.findall((run_dir / "estimate.log").read_text(errors="replace"))
    return float(found[-1]) if found else None


def device_name(quick):
    import torch

    return torch.cuda.get_device_name(0) if torch.cuda.is_available() and not quick else "cpu"


@functools.lru_cache(maxsize=None)
def accepted_flags(script):
    """The flags a training script's --help lists (it answers before loading any model)."""
    proc = subprocess.run([sys.executable, str(script), "--help"], cwd=REPO, capture_output=True, text=True)
    return set(re.findall(r"--[A-Za-z0-9_]+", proc.stdout))


def quick_recipe(flags):
    kept, words = [], flags.split()
    while words:
        word = words.pop(0)
        if word in QUICK_DROPPED:
            del words[:QUICK_DROPPED[word]]
        else:
            kept.append(word)
    return " ".join(kept)


def planned_runs(cli, stages):
    """(stage, name, flags, against) of each row group: the named settings, then the recipes (against: the setting
    whose reference run a recipe is compared with; None for a setting)."""
    table = QUICK_SETTINGS if cli.quick else SETTINGS
    runs = [(stage, name, " ".join(f for f in flags.split() if f.lstrip("-") not in cli.without), None)
            for stage in stages for name, flags in table[stage].items()]
    for stage in stages:
        for name, (against, flags) in RECIPES[stage].items():
            runs.append((stage, name, quick_recipe(flags) if cli.quick else flags,
                         next(iter(table[stage])) if cli.quick else against))
    return [run for run in runs if cli.settings is None or run[1] in cli.settings]


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
                        help="A named setting or recipe to run (repeatable). Default: all of the stage's settings, "
                        "then its recipes. " + "; ".join(f"{stage}: {', '.join(SETTINGS[stage])}" for stage in STAGES)
                        + f"; recipes (our script alone): {', '.join(RECIPES['decoder'])}.")
    parser.add_argument("--extra", action="append", default=None,
                        help='More flags for our training script, e.g. "--cache_embeddings". Repeatable: each value '
                        'is one variant of ours, run in turn after the reference ("" is ours as is). Recipes run '
                        "their own flags only.")
    parser.add_argument("--without", action="append", default=[], metavar="SWITCH",
                        help="Drop a switch from the named settings, e.g. --without gradient_checkpointing "
                        "(a store_true flag cannot be turned off from --extra).")
    parser.add_argument("--label", default=None, help="Name of this variant in the output (default: from --extra "
                        'and --without, else "baseline").')
    parser.add_argument("--reference_dir", default=None,
                        help="A folder with diffusers' train_text_to_image_prior.py / train_text_to_image_decoder.py "
                        "(examples/kandinsky2_2/text_to_image of a diffusers checkout): each setting also runs them, "
                        "without --extra, and the table gives our speed-up. They take the same command line.")
    parser.add_argument("--peak_tflops", type=float, default=None,
                        help="The GPU's peak dense bf16 TFLOP/s, for MFU. Default: " + ", ".join(
                            f"{flops_ / 1e12:g} for /{pattern}/" for pattern, flops_ in flops.PEAK_BF16_FLOPS)
                        + " (NVIDIA's datasheets); no MFU on other devices.")
    parser.add_argument("--prior_vision_only", action="store_true",
                        help="Build only the prior's CLIP image tower (all the decoder scripts read of the prior): "
                        "for --stage decoder, 7 GB less to write.")
    cli = parser.parse_args(argv)
    cli.steps = cli.steps if cli.steps is not None else (4 if cli.quick else 30)
    cli.warmup = cli.warmup if cli.warmup is not None else (1 if cli.quick else 10)
    if cli.steps < 1 or cli.warmup < 0:
        parser.error("--steps must be at least 1 and --warmup at least 0.")
    if cli.prior_vision_only and cli.stage != "decoder":
        parser.error("--prior_vision_only builds no prior to train: use it with --stage decoder.")
    cli.without = [w.lstrip("-") for w in cli.without]
    cli.extra = cli.extra or [""]
    without = [f"without --{w}" for w in cli.without]
    cli.labels = [cli.label or " ".join([extra.strip()] + without).strip() or "baseline" for extra in cli.extra]
    stages = STAGES if cli.stage == "both" else (cli.stage,)
    table = QUICK_SETTINGS if cli.quick else SETTINGS
    known = {name for stage in stages for name in (*table[stage], *RECIPES[stage])}
    unknown = sorted(set(cli.settings or ()) - known)
    if cli.reference_dir is not None:
        missing = [p.name for p in SCRIPTS.values() if not (Path(cli.reference_dir) / p.name).is_file()]
        if missing:
            parser.error(f"--reference_dir {cli.reference_dir} has no {', '.join(missing)}.")
    if unknown:
        parser.error(f"unknown setting(s) {', '.join(unknown)} for --stage {cli.stage}"
                     f"{' --quick' if cli.quick else ''}; known: {', '.join(sorted(known))}.")
    # A setting named for one stage only runs where it exists (e.g. bf16-b8 with --stage both: the decoder).
    cli.runs = planned_runs(cli, stages)
    return cli


def build(cli, work_dir):
    if cli.quick:
        return build_quick(work_dir)
    return build_full(work_dir, ("prior-vision" if cli.prior_vision_only else "prior", "decoder", "images"))


def with_mfu(result, stage, paths, peak):
    """The run's FLOPs per sample (see flops.py) and MFU against `peak` FLOP/s (None where no peak is known)."""
    args = shlex.split(result["script_args"])
    per_sample = flops.sample_flops(stage, paths, flag_value(args, "--resolution", 512), "--cache_embeddings" in args)
    mfu = result["samples_per_second"] * per_sample / peak if peak else None
    return {**result, "flops_per_sample": per_sample, "mfu": mfu, "peak_flops": peak}


class Table:
    """The Markdown table on stdout and the JSON lines of --out, one row per run."""

    def __init__(self, cli, device, peak):
        self.cli, self.device, self.peak = cli, device, peak
        self.versions = {lib: version(lib) for lib in ("torch", "diffusers", "transformers", "accelerate")}
        self.reference_speeds = {}  # (stage, setting) -> samples/s
        print("| GPU | stage | settings | script | variant | samples/s (mean / median) | MFU | "
              "peak allocated GiB (--estimate_memory's) | speed-up |\n" + "|---" * 9 + "|", flush=True)

    def row(self, stage, setting, flags, name, label, result, against=None):
        cells = f"| {self.device} | {stage} | {setting}: `{flags}` | {name} | {label} |"
        if "failed" in result or "skipped" in result:
            print(f"{cells} {'failed: ' + result['failed'] if 'failed' in result else result['skipped']} "
                  "| | | |", flush=True)
        else:
            speed = result["samples_per_second"]
            label += f" (exit code {result['exit_code']} after training)" if result["exit_code"] else ""
            if name == "reference":
                self.reference_speeds[(stage, setting)] = speed
            reference = self.reference_speeds.get((stage, against or setting))
            peak = "n/a (CPU)" if result["peak_memory_gib"] is None else f"{result['peak_memory_gib']:.1f}"
            if result.get("estimated_peak_gib") is not None:  # --estimate_memory's figure for the same command
                peak += f" (est. {result['estimated_peak_gib']:.1f})"
            mfu = "n/a" if result["mfu"] is None else f"{100 * result['mfu']:.1f}%"
            ratio = f"{speed / reference:.2f}x" if reference and name == "ours" else ""
            print(f"{cells} {speed:.2f} / {result['samples_per_second_median']:.2f} | {mfu} | {peak} | {ratio} |",
                  flush=True)
        self.record(stage=stage, setting=setting, script=name, label=label, against=against, **result)

    def record(self, **fields):
        if self.cli.out:
            record = {**fields, "without": self.cli.without, "device": self.device, "quick": self.cli.quick,
                      "warmup": self.cli.warmup, "steps": self.cli.steps, "versions": self.versions,
                      "time": datetime.now(timezone.utc).isoformat(timespec="seconds")}
            with open(self.cli.out, "a") as f:
                f.write(json.dumps(record) + "\n")


def run_group(cli, table, paths, work_dir, stage, setting, flags, against):
    """One setting (the reference, then each variant of ours) or one recipe (ours, its own flags)."""
    if against is not None:
        runs = [("ours", SCRIPTS[stage], "", f"{setting} recipe")]
        missing = sorted(set(re.findall(r"--[A-Za-z0-9_]+", flags)) - accepted_flags(SCRIPTS[stage]))
        if missing:
            note = f"skipped: this checkout's script does not accept {', '.join(missing)}"
            return table.row(stage, setting, flags, "ours", f"{setting} recipe", {"skipped": note}, against)
    else:
        runs = [("ours", SCRIPTS[stage], extra, label) for extra, label in zip(cli.extra, cli.labels)]
        if cli.reference_dir is not None:  # the reference has none of our flags: it runs without --extra
            runs.insert(0, ("reference", Path(cli.reference_dir).resolve() / SCRIPTS[stage].name, "", "as is"))
    for name, script, extra, label in runs:
        slug = re.sub(r"[^A-Za-z0-9._-]+", "_", f"{stage}-{setting}-{name}-{label}")
        run_cli = argparse.Namespace(**{**vars(cli), "extra": extra, "label": f"{name}, {label}"})
        result = run_setting(stage, setting, flags, paths, run_cli, work_dir / "runs" / slug, script)
        if "failed" not in result:
            result = with_mfu(result, stage, paths, table.peak)
        table.row(stage, setting, flags, name, label, {**result, "extra": extra}, against)


def main(argv=None):
    cli = parse_args(argv)
    sys.path[:0] = [str(REPO), str(REPO / "tools")]  # kandinsky_train and tiny_kandinsky
    work_dir = Path(cli.work_dir or tempfile.mkdtemp(prefix="kandinsky-bench-")).resolve()
    work_dir.mkdir(parents=True, exist_ok=True)
    try:
        paths = build(cli, work_dir)
        device = device_name(cli.quick)
        table = Table(cli, device, flops.peak_flops(device, cli.peak_tflops))
        for stage, setting, flags, against in cli.runs:
            run_group(cli, table, paths, work_dir, stage, setting, flags, against)
    finally:
        if cli.work_dir is None:  # a temporary folder holds ~20 GB of full-size models: do not leave it behind
            shutil.rmtree(work_dir, ignore_errors=True)


if __name__ == "__main__":
    main()
