"""--estimate_memory: its figure against the tensor memory of a real run of the same command, and that it needs the
models' configuration files alone."""

import re
import shutil
import sys

import pytest

from kandinsky_train import loop
from kandinsky_train.live_bytes import LiveBytes

from conftest import DECODER_SCRIPT, REPO, base_args, launch

sys.path.insert(0, str(REPO / "benchmarks"))

import train_text_to_image_decoder as decoder_script  # noqa: E402
import train_text_to_image_prior as prior_script  # noqa: E402


def tracked_peak(module, args, monkeypatch):
    """The peak bytes of tensor storage alive during a real CPU run's training: the models the run keeps on the
    device (the trained one and, without the cache, the frozen encoders), and every tensor an operator makes from
    the start of training on (the same dispatch-mode counter as the estimate's, here on real tensors)."""
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(reset_partial_state=True)  # an earlier in-process run's precision
    tracker = LiveBytes(fake_only=False)
    train = loop.train

    def tracked(run_args, accelerator, stage, *rest, **kwargs):
        on_device = [stage.model]
        if not run_args.cache_embeddings:
            on_device += [*stage.frozen_models, *stage.image_embedding.models]
        tracker.add([t for m in on_device for t in (*m.parameters(), *m.buffers())])
        with tracker:
            return train(run_args, accelerator, stage, *rest, **kwargs)

    monkeypatch.setattr(loop, "train", tracked)
    module.main(module.parse_args([str(a) for a in args]))
    return tracker.peak


COMMANDS = {
    "decoder, bf16, checkpointing, EMA, accumulation": (
        decoder_script, {"--mixed_precision": "bf16", "--gradient_checkpointing": True, "--use_ema": True,
                         "--gradient_accumulation_steps": 2}),
    "decoder, fused pass, full bf16, adafactor": (
        decoder_script, {"--mixed_precision": "bf16", "--fused_backward_pass": True, "--full_bf16": True,
                         "--optimizer": "adafactor"}),
    "prior, fp32, AdamW": (prior_script, {"--train_batch_size": 4}),
}


@pytest.mark.parametrize("name", list(COMMANDS))
def test_estimate_is_within_5_percent_of_a_real_runs_tensor_memory(name, tiny, tmp_path, monkeypatch, capsys):
    module, flags = COMMANDS[name]
    args = base_args(tiny, tmp_path / "run", steps=2, **flags)
    real = tracked_peak(module, args, monkeypatch)
    estimated = module.main(module.parse_args([str(a) for a in args] + ["--estimate_memory"]))
    out = capsys.readouterr().out
    assert out.splitlines()[-1].startswith("Estimated peak device memory: ")
    print(f"\nFIGURES {name}: estimated {estimated} tracked {real} ratio {estimated / real:.4f}")
    assert abs(estimated - real) <= 0.05 * real, f"{name}: estimated {estimated} bytes, tracked {real}\n{out}"


def config_only_copy(folder, into):
    """The model folder's configuration files (JSON) alone, no weight, no tokenizer vocabulary."""
    for path in folder.rglob("*.json"):
        target = into / path.relative_to(folder)
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(path, target)
    return into


def test_estimate_needs_only_the_configurations_and_plans_the_launchers_precision(tiny, tmp_path):
    prior = config_only_copy(tiny["prior"], tmp_path / "prior")
    decoder = config_only_copy(tiny["decoder"], tmp_path / "decoder")
    assert not [p for p in tmp_path.rglob("*") if p.is_file() and p.suffix != ".json"]
    # fp16 from the launcher, on a machine without a GPU: planned for the GPU run, not refused
    launcher = ["--num_processes", "1", "--num_machines", "1", "--mixed_precision", "fp16", "--dynamo_backend", "no"]
    proc = launch(DECODER_SCRIPT, ["--pretrained_prior_model_name_or_path", prior, "--pretrained_decoder_model_name_or_path",
                                   decoder, "--output_dir", tmp_path / "out", "--resolution", 64,
                                   "--gradient_checkpointing", "--estimate_memory", "--memory_budget_gib", "0.001"],
                  launcher=launcher)
    lines = proc.stdout.splitlines()
    assert re.fullmatch(r"Estimated peak device memory: \d+\.\d\d GiB", lines[-1]), proc.stdout
    assert "precision fp16" in lines[0] and "weights" in proc.stdout and "activations and temporaries" in proc.stdout
    assert "Over the budget of 0.00 GiB" in proc.stdout and re.search(r"--cache_embeddings +saves", proc.stdout)
    assert not (tmp_path / "out").exists()  # nothing trained, nothing written


def test_a_budget_that_is_no_size_is_refused_in_one_line(tiny, tmp_path, capsys):
    from test_robustness import error_line, run_in_process

    error = run_in_process(prior_script, ["--pretrained_prior_model_name_or_path", tiny["prior"], "--output_dir",
                                          tmp_path / "out", "--estimate_memory", "--memory_budget_gib", "0"], capsys)
    assert error_line(error) == "error: --memory_budget_gib must be a positive number of GiB, got 0.0."
