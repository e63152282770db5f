"""--estimate_memory: its figure against the tensor memory of a real run of the same command, and that it needs the
models' configuration files alone."""

import contextlib
import re
import shutil
import sys
from unittest import mock

import pytest

from kandinsky_train import cache, loop, runtime
from kandinsky_train.estimate import model_tensors
from kandinsky_train.live_bytes import LiveBytes

from conftest import DECODER_SCRIPT, REPO, base_args, launch

sys.path.insert(0, str(REPO / "benchmarks"))

import train_text_to_image_decoder as decoder_script  # noqa: E402
import train_text_to_image_prior as prior_script  # noqa: E402


def tracked_peak(module, args, monkeypatch):
    """The peak bytes of tensor storage alive during a real CPU run's training: the models the run keeps on the
    device (the trained one and, without the cache, the frozen encoders), those it brings to the device for a while
    (runtime.on_device: the cache's passes), and every tensor an operator makes from the start of training on (the
    same dispatch-mode counter as the estimate's, here on real tensors). Also the most frozen models that were on
    the device at once."""
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(reset_partial_state=True)  # an earlier in-process run's precision
    tracker = LiveBytes(fake_only=False)
    train, frozen_outputs, resident, together = loop.train, loop.frozen_outputs, set(), [0]

    @contextlib.contextmanager
    def brought(device, *models):  # the CPU is the device here: what would move is counted as if it did
        new = [m for m in models if id(m) not in resident]
        tensors = model_tensors(*new)
        resident.update(map(id, new))
        together[0] = max(together[0], len(resident) - 1)  # the trained model aside
        tracker.to_device(tensors)
        try:
            yield
        finally:
            tracker.to_host(tensors)
            resident.difference_update(map(id, new))

    def tracked(run_args, accelerator, stage, *rest, **kwargs):
        frozen = [] if run_args.cache_embeddings else [*stage.frozen_models, *stage.image_embedding.models]
        resident.update(map(id, [stage.model, *frozen]))
        together[0] = len(frozen)
        tracker.add(model_tensors(*frozen))

        def outputs_then_model(*args):  # the trained model comes to the device after the cache's passes
            outputs = frozen_outputs(*args)
            tracker.add(model_tensors(stage.model))
            return outputs

        with tracker, mock.patch.object(runtime, "on_device", brought), \
                mock.patch.object(loop, "frozen_outputs", outputs_then_model):
            return train(run_args, accelerator, stage, *rest, **kwargs)

    monkeypatch.setattr(loop, "train", tracked)
    # the frozen encoders at the training batch, as on the GPU the estimate plans for (one sample at a time on the
    # CPU, for identical bits, cache.encoding_batch_size)
    monkeypatch.setattr(cache, "encoding_batch_size", lambda device, train_batch_size: train_batch_size)
    module.main(module.parse_args([str(a) for a in args]))
    return tracker.peak, together[0]


COMMANDS = {
    "decoder, bf16, checkpointing, EMA, accumulation": (
        decoder_script, {"--mixed_precision": "bf16", "--gradient_checkpointing": True, "--use_ema": True,
                         "--gradient_accumulation_steps": 2}),
    "decoder, fused pass, full bf16, adafactor": (
        decoder_script, {"--mixed_precision": "bf16", "--fused_backward_pass": True, "--full_bf16": True,
                         "--optimizer": "adafactor"}),
    "prior, fp32, AdamW": (prior_script, {"--train_batch_size": 4}),
    # the low-memory recipe, whose peak is the caching pass of the larger CLIP tower (alone on the device)
    "prior, low-memory recipe": (
        prior_script, {"--mixed_precision": "bf16", "--fused_backward_pass": True, "--full_bf16": True,
                       "--optimizer": "adafactor", "--gradient_checkpointing": True, "--cache_embeddings": True,
                       "--train_batch_size": 1}),
}


@pytest.mark.parametrize("name", list(COMMANDS))
def test_estimate_is_within_5_percent_of_a_real_runs_tensor_memory(name, tiny, tmp_path, monkeypatch, capsys):
    module, flags = COMMANDS[name]
    args = base_args(tiny, tmp_path / "run", steps=2, **flags)
    real, together = tracked_peak(module, args, monkeypatch)
    estimated = module.main(module.parse_args([str(a) for a in args] + ["--estimate_memory"]))
    out = capsys.readouterr().out
    assert out.splitlines()[-1].startswith("Estimated peak device memory: ")
    print(f"\nFIGURES {name}: estimated {estimated} tracked {real} ratio {estimated / real:.4f}")
    assert abs(estimated - real) <= 0.05 * real, f"{name}: estimated {estimated} bytes, tracked {real}\n{out}"
    # with the cache, each frozen model comes to the device for its own pass, alone
    assert together == (1 if "--cache_embeddings" in flags else 2)


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
