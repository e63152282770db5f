#!/usr/bin/env python
# Copyright 2026 The Kandinsky 2.2 fine-tuning authors. Licensed under the Apache License, Version 2.0.
"""The prepared GPU check of issues 24 and 30: everything the decoder work needs measured, in parts that each fit one
6-minute call on a lent GPU (15 minutes of device time, start-up included). BENCHMARKS.md has the exact calls.

    python benchmarks/gpu_check.py --part 1 --out $OUT     # the targets: the low-memory and fastest recipes
    python benchmarks/gpu_check.py --part 2 --out $OUT     # the fused pass against the plain step, 24 GB recipe
    python benchmarks/gpu_check.py --part 3 --out $OUT     # profile, reference vs ours; 4: the prior's recipes
    python benchmarks/gpu_check.py --quick --part 1        # the same plumbing on the CPU, tiny models

Each run's measured peak stands beside the figure of the script's --estimate_memory for the same command (run on the
CPU beside it, where the script has that flag).

Most important first: a cut run keeps what it measured. Each result is appended to OUT/gpu_check-partN.jsonl as
soon as it is known (the profile's table and trace go beside it); at --budget_s the item under way is cut and the
rest are recorded as not run, and the summary is printed last. Full-size random models are built from
benchmarks/configs in --work_dir (fp32 safetensors; the decoder items need only the prior's CLIP image tower, and
the whole prior is built only when a prior item starts). --quick runs most of the decoder's items on the CPU with
tools/tiny_kandinsky.py's models, a few steps each: it proves the plumbing, its figures say nothing.
"""

import argparse
import json
import os
import signal
import sys
import tempfile
import time
from pathlib import Path

sys.path[:0] = [str(Path(__file__).resolve().parent), str(Path(__file__).resolve().parent.parent),
                str(Path(__file__).resolve().parent.parent / "tools")]

import benchmark  # noqa: E402  (benchmarks/ is not a package)
import check_fast_path  # noqa: E402
import flops  # noqa: E402
from build import build_full, build_quick  # noqa: E402

# (part, kind, stage, name, expected seconds on an H100), most important first. The expected cost counts the item's
# full-size runs at ~100 s each (the last H100 session's: model loading, the first steps' cuDNN search, a save),
# 150 s for one that compiles with Inductor, ~200 s for 100-step curves; each part but the last fits the default
# budget (tests/test_benchmark.py). An item that would not finish in what is left is not started, and a cheaper one
# after it may still run. Part 1: the targets (the decoder's low-memory and fastest recipes); 2: the fused pass
# against the plain step, the 24 GB recipe; 3: where a step's time goes, the reference against ours; 4: the prior's
# recipes; 5: curves, smoke runs and the rest of the side by side (given a larger --budget_s).
PLAN = [
    (1, "recipe", "decoder", "low-memory", 100),
    (1, "recipe", "decoder", "fastest", 150),
    (2, "weights", "decoder", "fused", 200),
    (2, "recipe", "decoder", "24gb-card", 100),
    (3, "profile", "decoder", "guide", 100),
    (3, "side by side", "decoder", "bf16-b8", 200),
    (4, "recipe", "prior", "low-memory", 100),
    (4, "recipe", "prior", "fastest", 150),
    (5, "curves", "decoder", "cache", 200),
    (5, "smoke", "decoder", "fp16", 100),
    (5, "smoke", "decoder", "8-bit Adam", 100),
    (5, "smoke", "prior", "fp16", 100),
    (5, "smoke", "prior", "8-bit Adam", 100),
    (5, "side by side", "decoder", "guide", 200),
    (5, "side by side", "prior", "guide", 200),
    (5, "side by side", "prior", "bf16-b32", 200),
]
# --quick: the decoder's items at the CPU's one setting, but no 8-bit Adam (tests/test_optimizers.py runs it on the
# CPU; the 24 GB recipe adds only it to the cache curve's cached run), no side by side (the recipes take the same path
# through benchmark.py, whose own --quick test runs the reference beside ours and the fastest recipe), and neither
# the fastest recipe nor the fused weights (the low-memory recipe's and the cache curves' paths with other flags:
# three runs more of the test suite's time; tests/test_memory.py compares the fused pass with the plain step).
QUICK_LEFT_OUT = ("side by side", "8-bit Adam", "24gb-card", "weights", "fastest")
QUICK_SETTING = next(iter(benchmark.QUICK_SETTINGS["decoder"]))
CURVES = {"cache": (check_fast_path.CACHE_VARIANTS, "cache curve")}
# The fused pass against the plain step: with --max_grad_norm out of reach (the random full-size UNet's total
# gradient norm is ~7.3, so the default 1.0 clips every plain step, and per-tensor clipping differs by design) the
# two must end with the same weights, to the rounding of bf16 autocast.
FUSED_VARIANTS = (("plain", "--max_grad_norm 1e9"), ("fused", "--max_grad_norm 1e9 --fused_backward_pass"))
PROFILE_STEP = 4
# Optimizer steps the profiled run may take: fp16's loss scaler skips the updates of overflowing steps at first, and
# only an update moves the profiler on.
PROFILE_RUN_STEPS = PROFILE_STEP + 4


class OutOfTime(BaseException):
    """Raised by the budget's timer. Not an Exception: libraries that swallow `except Exception` (import-time checks
    of optional packages) let it through."""


def plan(cli):
    """(part, kind, stage, name, expected seconds) of this part's items; --quick: on the CPU, no expected cost."""
    if not cli.quick:
        return [item for item in PLAN if item[0] == cli.part]
    quick = []
    for part, kind, stage, name, _ in PLAN:
        if part == cli.part and stage == "decoder" and kind not in QUICK_LEFT_OUT and name not in QUICK_LEFT_OUT:
            quick.append((part, kind, stage, QUICK_SETTING if kind == "profile" else name, 0))
    return quick


class Check:
    """One part's items against one work folder; results go to the JSON lines file as they come."""

    def __init__(self, cli):
        self.cli, self.work_dir = cli, Path(cli.work_dir).resolve()
        self.work_dir.mkdir(parents=True, exist_ok=True)
        self.out_dir = Path(cli.out).resolve()
        self.results = self.out_dir / f"gpu_check-part{cli.part}.jsonl"
        self.steps = dict(warmup=1, steps=2, curve_steps=3) if cli.quick else dict(warmup=3, steps=12,
                                                                                   curve_steps=100)
        self.paths = {}
        self.table = None

    def models(self, stage):
        """The folders for a stage's runs, built on first use (a decoder item needs only the prior's image tower)."""
        if self.cli.quick:
            self.paths = self.paths or build_quick(self.work_dir)
        elif stage == "prior" or not self.paths:
            self.paths = build_full(self.work_dir, ("prior" if stage == "prior" else "prior-vision", "decoder",
                                                    "images"))
        return self.paths

    def write(self, record):
        with open(self.results, "a") as f:
            f.write(json.dumps(record) + "\n")

    def run(self, kind, stage, name):
        paths = self.models(stage)
        if kind == "profile":
            return self.profile(stage, name, paths)
        if kind in ("side by side", "recipe"):
            return self.benchmark(stage, name, paths)
        if kind == "weights":
            return self.report(check_fast_path.check_weights(stage, 4, paths, self.work_dir, FUSED_VARIANTS,
                                                             "fused weights", self.cli.quick))
        if kind == "curves":
            variants, check = CURVES[name]
            accepted = benchmark.accepted_flags(benchmark.SCRIPTS[stage])
            missing = [flag for _, flags in variants for flag in flags.split() if flag not in accepted]
            if missing:
                return self.report({"check": check, "stage": stage, "ok": False,
                                    "skipped": f"skipped: this checkout's script does not accept {', '.join(missing)}"})
            return self.report(check_fast_path.check_curves(stage, self.steps["curve_steps"], paths, self.work_dir,
                                                            variants, check, self.cli.quick))
        return self.report(check_fast_path.check_option(stage, name, paths, self.work_dir, quick=self.cli.quick))

    def report(self, record):
        return check_fast_path.report(record, self.results)

    def benchmark(self, stage, setting, paths):
        """benchmark.py's rows for one setting (the reference, then ours with the same flags) or recipe."""
        argv = ["--quick"] if self.cli.quick else []
        argv += ["--stage", stage, "--settings", setting, "--out", str(self.results), "--extra=",
                 "--warmup", str(self.steps["warmup"]), "--steps", str(self.steps["steps"])]
        if self.cli.reference_dir:
            argv += ["--reference_dir", self.cli.reference_dir]
        bench = benchmark.parse_args(argv)
        if self.table is None:
            device = benchmark.device_name(self.cli.quick)
            self.table = benchmark.Table(bench, device, flops.peak_flops(device))
        count = len(self.results.read_text().splitlines()) if self.results.exists() else 0
        benchmark.run_group(bench, self.table, paths, self.work_dir, *bench.runs[0])
        rows = [json.loads(line) for line in self.results.read_text().splitlines()[count:]]
        if all("skipped" in row for row in rows):
            return "skipped"
        return "ok" if all("failed" not in row for row in rows) else "FAILED"

    def profile(self, stage, setting, paths):
        """Our script at a setting, with torch.profiler on optimizer step PROFILE_STEP (measure.py)."""
        table = self.out_dir / f"profile-{stage}-{setting}.txt"
        flags = (benchmark.QUICK_SETTINGS if self.cli.quick else benchmark.SETTINGS)[stage][setting]
        size = benchmark.QUICK_FLAGS if self.cli.quick else benchmark.FULL_FLAGS
        run_dir = self.work_dir / "runs" / f"profile-{stage}-{setting}"
        run_dir.mkdir(parents=True, exist_ok=True)
        args = [*benchmark.COMMON_FLAGS.split(), *size.split(), *flags.split(), "--max_train_steps",
                str(PROFILE_RUN_STEPS), "--train_data_dir", str(paths["images"]), "--output_dir", str(run_dir / "out"),
                "--pretrained_prior_model_name_or_path", str(paths["prior"]),
                "--pretrained_decoder_model_name_or_path", str(paths["decoder"])]
        code = benchmark.launch(benchmark.SCRIPTS[stage], args, run_dir, cpu_only=self.cli.quick,
                                env={"BENCH_PROFILE_FILE": str(table), "BENCH_PROFILE_STEP": str(PROFILE_STEP)})
        record = {"check": "profile", "stage": stage, "setting": f"{setting}: {flags}", "exit_code": code}
        if table.exists():
            record.update(json.loads(Path(f"{table}.json").read_text()), top20=table.read_text())
            print(table.read_text(), flush=True)
        else:
            record["why"] = (run_dir / "stderr.log").read_text(errors="replace").splitlines()[-5:]
        if (run_dir / "out").is_dir():
            check_fast_path.drop_weights(run_dir / "out")
        return self.report({**record, "ok": code == 0 and table.exists()})


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--part", type=int, choices=sorted({item[0] for item in PLAN}), required=True,
                        help="Which part of the check to run (1 first: the targets).")
    parser.add_argument("--quick", action="store_true", help="The decoder's items on the CPU with tiny models.")
    parser.add_argument("--out", default=os.environ.get("OUT", "gpu_check_out"),
                        help="Folder for the results (default: $OUT, where the device tool collects files).")
    parser.add_argument("--work_dir", default=None,
                        help="Models, data and runs (default: /tmp/kandinsky-gpu-check; --quick: a temporary folder).")
    parser.add_argument("--reference_dir", default=None,
                        help="diffusers' two Kandinsky 2.2 training scripts, run beside ours (default: .reference/ "
                        "where it exists; --quick: none).")
    parser.add_argument("--budget_s", type=float, default=320,
                        help="Seconds this part may take: then the item under way is cut and the rest are listed "
                        "as not run (default 320: a 6-minute call less the wheels' install and a margin).")
    cli = parser.parse_args(argv)
    default_reference = benchmark.REPO / ".reference"
    if cli.reference_dir is None and not cli.quick and default_reference.is_dir():
        cli.reference_dir = str(default_reference)
    if cli.work_dir is None:
        cli.work_dir = tempfile.mkdtemp(prefix="kandinsky-gpu-check-") if cli.quick else "/tmp/kandinsky-gpu-check"
    return cli


def main(argv=None):
    cli = parse_args(argv)
    Path(cli.out).mkdir(parents=True, exist_ok=True)
    check = Check(cli)
    start = time.monotonic()

    def out_of_time(*_):
        raise OutOfTime

    signal.signal(signal.SIGALRM, out_of_time)
    outcomes, items = [], plan(cli)
    try:
        signal.setitimer(signal.ITIMER_REAL, cli.budget_s, 1)  # again every second, should a bare except eat one
        for part, kind, stage, name, expected in items:
            left = cli.budget_s - (time.monotonic() - start)
            if expected > left:  # would be cut: leave the time to a cheaper item after it
                outcomes.append(f"not run: expected {expected} s, {left:.0f} s left")
                check.write({"item": [kind, stage, name], "outcome": outcomes[-1]})
                continue
            print(f"=== part {part}: {kind}, {stage}, {name} ({time.monotonic() - start:.0f} s in)", file=sys.stderr,
                  flush=True)
            outcomes.append(check.run(kind, stage, name))
            check.write({"item": [kind, stage, name], "outcome": outcomes[-1],
                         "seconds": round(time.monotonic() - start)})
    except OutOfTime:  # the runs under way die with this call; what finished is written already
        signal.setitimer(signal.ITIMER_REAL, 0)
        if len(outcomes) < len(items):
            outcomes.append(f"cut at {cli.budget_s:g} s")
            check.write({"item": list(items[len(outcomes) - 1][1:4]), "outcome": outcomes[-1]})
        for item in items[len(outcomes):]:
            outcomes.append("not run: out of time")
            check.write({"item": list(item[1:4]), "outcome": outcomes[-1]})
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
    print(f"\n| part {cli.part} item | outcome |\n|---|---|")
    for (_, kind, stage, name, _), outcome in zip(items, outcomes):
        print(f"| {kind}, {stage}, {name} | {outcome} |")
    print(f"Results: {check.results} ({time.monotonic() - start:.0f} s)", flush=True)


if __name__ == "__main__":
    main()
