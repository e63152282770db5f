"""benchmarks/benchmark.py --quick: builds the tiny models, runs the scripts through `accelerate launch` and
benchmarks/measure.py, and reads their TensorBoard logs back, so the benchmark cannot rot while no GPU is at hand.
Our own scripts stand in for diffusers' reference scripts (they take the same command line)."""

import json
import re
import subprocess
import sys

from conftest import REPO, offline_env


def test_quick_benchmark_measures_both_stages_side_by_side(tmp_path):
    out = tmp_path / "r.jsonl"
    proc = subprocess.run([sys.executable, "benchmarks/benchmark.py", "--quick", "--stage", "both",
                           "--work_dir", str(tmp_path / "work"), "--out", str(out), "--reference_dir", str(REPO)],
                          cwd=REPO, env=offline_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    records = [json.loads(line) for line in out.read_text().splitlines()]
    assert sorted((r["stage"], r["script"]) for r in records) == [
        ("decoder", "ours"), ("decoder", "reference"), ("prior", "ours"), ("prior", "reference")]
    for record in records:
        assert record["samples_per_second"] > 0 and record["measured_steps"] == 4
        assert record["device"] == "cpu" and record["peak_memory_gib"] is None  # no CUDA figure on the CPU
        assert set(record["versions"]) == {"torch", "diffusers", "transformers", "accelerate"}
    rows = [line for line in proc.stdout.splitlines() if line.startswith("| cpu |")]
    assert len(rows) == 4  # one Markdown row per run
    assert all(re.search(r"\| \d+\.\d\dx \|$", row) for row in rows if "| ours |" in row)  # speed-up column


def test_reference_dir_without_the_scripts_is_refused(tmp_path):
    proc = subprocess.run([sys.executable, "benchmarks/benchmark.py", "--quick", "--reference_dir", str(tmp_path)],
                          cwd=REPO, env=offline_env(), capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert "has no train_text_to_image_prior.py, train_text_to_image_decoder.py" in proc.stderr
