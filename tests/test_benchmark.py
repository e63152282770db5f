"""benchmarks/benchmark.py --quick: builds the tiny models, runs the scripts through `accelerate launch` and
benchmarks/measure.py, and reads their TensorBoard logs back, so the benchmark cannot rot while no GPU is at hand.
Our own scripts stand in for diffusers' reference scripts (they take the same command line)."""

import json
import math
import re
import subprocess
import sys

import pytest

from conftest import REPO, offline_env


@pytest.fixture
def work(tiny, tmp_path):
    """A --work_dir whose tiny models are the session's (benchmarks/build.py's build_quick finds them built)."""
    work = tmp_path / "work"
    (work / "tiny").mkdir(parents=True)
    for name in ("prior", "decoder", "images"):
        (work / "tiny" / name).symlink_to(tiny[name], target_is_directory=True)
    (work / "tiny.done").touch()
    return work


def logged_speed(record, work):
    """Samples per second over the record's measured steps, from its run's TensorBoard train_loss events (their wall
    times) and its command line's batch: what the record must say."""
    from kandinsky_train.tracking import read_scalars

    name = f"{record['stage']}-{record['setting']}-{record['script']}-{record['label']}"
    losses = read_scalars(work / "runs" / re.sub(r"[^A-Za-z0-9._-]+", "_", name) / "output" / "logs")["train_loss"]
    first, last = record["warmup"], record["warmup"] + record["measured_steps"]
    batch = int(re.search(r"--train_batch_size (\d+)", record["script_args"]).group(1))
    return batch * (last - first) / (losses[last][0] - losses[first][0])


def assert_measured(record, steps):
    """A run of ours or the reference's measured on the CPU: `steps` steps, no CUDA figures."""
    assert record["measured_steps"] == steps and record["exit_code"] == 0
    assert record["device"] == "cpu" and record["peak_memory_gib"] is None  # no CUDA figure on the CPU
    assert record["mfu"] is None and record["flops_per_sample"] > 0  # no peak FLOP/s for a CPU
    assert set(record["versions"]) == {"torch", "diffusers", "transformers", "accelerate"}


def test_quick_benchmark_measures_variants_side_by_side_with_the_reference(work, tmp_path):
    """One stage (the decoder: the prior runs through the same code), the reference and two variants of ours, as
    the GPU session ran them, then a recipe, compared with the reference: each row with the FLOPs of a sample (no
    MFU on a CPU). (The other recipe, or the note of a checkout that lacks its flags, in the gpu_check test below.)"""
    out = tmp_path / "r.jsonl"
    proc = subprocess.run([sys.executable, "benchmarks/benchmark.py", "--quick", "--stage", "decoder",
                           "--work_dir", str(work), "--out", str(out), "--reference_dir", str(REPO),
                           "--extra=", "--extra=--cache_embeddings", "--settings", "cpu-fp32", "--settings",
                           "fastest"],
                          cwd=REPO, env=offline_env(), capture_output=True, text=True, timeout=1200)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    records = [json.loads(line) for line in out.read_text().splitlines()]
    assert [(r["script"], r["label"]) for r in records] == [
        ("reference", "as is"), ("ours", "baseline"), ("ours", "--cache_embeddings"), ("ours", "fastest recipe")]
    for record in records:
        assert_measured(record, steps=4)
    assert "--cache_embeddings" in records[2]["script_args"] and "--cache_embeddings" not in records[1]["script_args"]
    # the cached run's sample skips the frozen MoVQ and CLIP forwards; the reference counts as ours uncached
    assert records[0]["flops_per_sample"] == records[1]["flops_per_sample"] > records[2]["flops_per_sample"]
    assert records[3]["against"] == "cpu-fp32" and "--cache_embeddings --allow_tf32" in records[3]["script_args"]
    for record in records:
        assert math.isclose(record["samples_per_second"], logged_speed(record, work), rel_tol=1e-6), record
    rows = [line for line in proc.stdout.splitlines() if line.startswith("| cpu |")]
    assert len(rows) == 4  # one Markdown row per run, in the records' order
    reference = records[0]["samples_per_second"]  # every row of ours is against the reference's cpu-fp32
    for row, record in zip(rows, records):
        cells = re.search(r"\| (\S+) / (\S+) \| n/a \| n/a \(CPU\) \| (\S*) \|$", row)  # MFU, peak, speed-up
        assert cells, row
        assert cells.group(1, 2) == (f"{record['samples_per_second']:.2f}",
                                     f"{record['samples_per_second_median']:.2f}"), (row, record)
        speed_up = f"{record['samples_per_second'] / reference:.2f}x" if record["script"] == "ours" else ""
        assert cells.group(3) == speed_up, (row, record)  # ours / reference, not the other way round


def test_reference_dir_without_the_scripts_is_refused(tmp_path):
    proc = subprocess.run([sys.executable, "benchmarks/benchmark.py", "--quick", "--reference_dir", str(tmp_path)],
                          cwd=REPO, env=offline_env(), capture_output=True, text=True, timeout=1200)
    assert proc.returncode == 2
    assert "has no train_text_to_image_prior.py, train_text_to_image_decoder.py" in proc.stderr


def test_quick_gpu_check_writes_each_result_as_it_comes_and_a_cut_part_lists_what_did_not_run(work, tmp_path):
    """benchmarks/gpu_check.py --quick, its parts on the tiny decoder: a recipe through benchmark.py (skipped with a
    note that names the flags a checkout lacks; the other recipe in the benchmark test above), the profile of one
    optimizer step (its top-20 table and busy share), the cached/uncached loss curves, a smoke run whose saved
    pipeline renders; then the last part again with half a second's budget: cut in its first item, the rest listed
    as not run, and still the summary."""
    out = tmp_path / "out"

    def gpu_check(part, budget):
        proc = subprocess.run([sys.executable, "benchmarks/gpu_check.py", "--quick", "--out", str(out), "--work_dir",
                               str(work), "--part", part, "--budget_s", budget], cwd=REPO, env=offline_env(),
                              capture_output=True, text=True, timeout=1200)
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
        results = (out / f"gpu_check-part{part}.jsonl").read_text().splitlines()
        return proc.stdout, [json.loads(line) for line in results]

    help_text = subprocess.run([sys.executable, "train_text_to_image_decoder.py", "--help"], cwd=REPO,
                               capture_output=True, text=True).stdout
    missing = [flag for flag in ("--full_bf16", "--fused_backward_pass") if flag not in help_text]
    summary, part1 = gpu_check("1", "600")
    assert f"| recipe, decoder, low-memory | {'skipped' if missing else 'ok'} |" in summary
    low_memory = next(r for r in part1 if r.get("label") == "low-memory recipe")
    if missing:  # issue 24's memory flags, not in every checkout
        assert low_memory["skipped"] == f"skipped: this checkout's script does not accept {', '.join(missing)}"
    else:
        assert_measured(low_memory, steps=2)
        assert low_memory["against"] == "cpu-fp32" and "--fused_backward_pass --full_bf16" in low_memory["script_args"]
    assert [r["item"] for r in part1 if "outcome" in r] == [["recipe", "decoder", "low-memory"]]

    summary, part3 = gpu_check("3", "600")
    assert "| profile, decoder, cpu-fp32 | ok |" in summary
    profile = part3[0]
    assert profile["check"] == "profile" and profile["ok"] and profile["step"] == 4 and profile["clock"] == "cpu"
    assert 0 < profile["busy_seconds"] and 0 < profile["step_seconds"]
    rows = [line for line in profile["top20"].splitlines()
            if line.strip() and not line.startswith("---") and "Name" not in line and "time total:" not in line]
    assert len(rows) == 20 and any("aten::convolution" in row for row in rows)
    assert (out / "profile-decoder-cpu-fp32.txt").read_text() == profile["top20"]
    assert (out / "profile-decoder-cpu-fp32.txt.trace.json.gz").stat().st_size > 0

    summary, part5 = gpu_check("5", "600")
    assert "| curves, decoder, cache | ok |\n| smoke, decoder, fp16 | ok |" in summary
    curve = next(r for r in part5 if r.get("check") == "cache curve")
    assert curve["steps"] == 3 and curve["mean_difference"] == 0  # the CPU's cached run is bit-identical
    smoke = next(r for r in part5 if r.get("check") == "fp16")
    assert smoke["ok"] and smoke["generated_shape"] == [1, 256, 256, 3] and len(smoke["losses"]) == 6

    (out / "gpu_check-part5.jsonl").unlink()
    summary, outcomes = gpu_check("5", "0.5")
    assert "| curves, decoder, cache | cut at 0.5 s |\n| smoke, decoder, fp16 | not run: out of time |" in summary
    assert [r["outcome"] for r in outcomes] == ["cut at 0.5 s", "not run: out of time"]


def test_the_low_memory_recipe_is_one_definition():
    """The README's low-memory recipe is benchmark.py's, which gpu_check.py runs (through RECIPES)."""
    sys.path.insert(0, str(REPO / "benchmarks"))
    import benchmark

    readme = " ".join((REPO / "README.md").read_text().split())
    assert f"**Low-memory recipe** (full fine-tuning on a small card): `{benchmark.LOW_MEMORY}`" in readme
    for stage in ("prior", "decoder"):
        assert benchmark.RECIPES[stage]["low-memory"][1].endswith("--optimizer adafactor")


def test_gpu_check_measures_the_targets_first_and_each_part_fits_its_budget():
    """Part 1 holds the decoder's low-memory and fastest recipes, first; every part but the last (the rest, given
    time) fits the default budget by its items' expected costs; the fused pass is compared by weights, with
    clipping out of reach."""
    sys.path.insert(0, str(REPO / "benchmarks"))
    import gpu_check

    budget = gpu_check.parse_args(["--part", "1", "--quick"]).budget_s
    parts = sorted({item[0] for item in gpu_check.PLAN})
    assert [item[1:4] for item in gpu_check.PLAN[:2]] == [("recipe", "decoder", "low-memory"),
                                                           ("recipe", "decoder", "fastest")]
    for part in parts[:-1]:
        assert sum(item[4] for item in gpu_check.PLAN if item[0] == part) <= budget, part
    assert ("weights", "decoder", "fused") in [item[1:4] for item in gpu_check.PLAN if item[0] < parts[-1]]
    assert all("--max_grad_norm 1e9" in flags for _, flags in gpu_check.FUSED_VARIANTS)
