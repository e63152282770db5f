"""benchmarks/benchmark.py --quick: builds the tiny models, runs both scripts through `accelerate launch` and reads
their TensorBoard logs back, so the benchmark cannot rot while no GPU is at hand."""

import json
import subprocess
import sys

from conftest import REPO, offline_env


def test_quick_benchmark_measures_both_stages(tmp_path):
    out = tmp_path / "r.jsonl"
    proc = subprocess.run([sys.executable, "benchmarks/benchmark.py", "--quick", "--stage", "both",
                           "--work_dir", str(tmp_path / "work"), "--out", str(out)],
                          cwd=REPO, env=offline_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    records = [json.loads(line) for line in out.read_text().splitlines()]
    assert sorted(r["stage"] for r in records) == ["decoder", "prior"]
    for record in records:
        assert record["samples_per_second"] > 0 and record["measured_steps"] == 4
        assert record["device"] == "cpu" and record["peak_memory_gib"] is None  # no CUDA figure on the CPU
        assert set(record["versions"]) == {"torch", "diffusers", "transformers", "accelerate"}
    assert proc.stdout.count("| cpu |") == 2  # one Markdown row per run
