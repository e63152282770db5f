"""benchmarks/benchmark.py --quick: builds the tiny models, runs the scripts through `accelerate launch` and
benchmarks/measure.py, and reads their TensorBoard logs back, so the benchmark cannot rot while no GPU is at hand.
Our own scripts stand in for diffusers' reference scripts (they take the same command line)."""

import json
import re
import subprocess
import sys

from conftest import REPO, offline_env


def test_quick_benchmark_measures_variants_side_by_side_with_the_reference(tmp_path):
    """One stage (the decoder: the prior runs through the same code), the reference and two variants of ours, as
    the GPU session ran them."""
    out = tmp_path / "r.jsonl"
    proc = subprocess.run([sys.executable, "benchmarks/benchmark.py", "--quick", "--stage", "decoder",
                           "--work_dir", str(tmp_path / "work"), "--out", str(out), "--reference_dir", str(REPO),
                           "--extra=", "--extra=--cache_embeddings"],
                          cwd=REPO, env=offline_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    records = [json.loads(line) for line in out.read_text().splitlines()]
    assert [(r["script"], r["label"]) for r in records] == [
        ("reference", "as is"), ("ours", "baseline"), ("ours", "--cache_embeddings")]
    for record in records:
        assert record["samples_per_second"] > 0 and record["measured_steps"] == 4 and record["exit_code"] == 0
        assert record["device"] == "cpu" and record["peak_memory_gib"] is None  # no CUDA figure on the CPU
        assert set(record["versions"]) == {"torch", "diffusers", "transformers", "accelerate"}
    assert "--cache_embeddings" in records[2]["script_args"] and "--cache_embeddings" not in records[1]["script_args"]
    rows = [line for line in proc.stdout.splitlines() if line.startswith("| cpu |")]
    assert len(rows) == 3  # one Markdown row per run
    assert all(re.search(r"\| \d+\.\d\dx \|$", row) for row in rows if "| ours |" in row)  # speed-up column


def test_reference_dir_without_the_scripts_is_refused(tmp_path):
    proc = subprocess.run([sys.executable, "benchmarks/benchmark.py", "--quick", "--reference_dir", str(tmp_path)],
                          cwd=REPO, env=offline_env(), capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert "has no train_text_to_image_prior.py, train_text_to_image_decoder.py" in proc.stderr
