"""Watching a run learn (issue: held-out loss, step-based validation, the official optimizer): eval_loss and
eval_cosine on a held-out set at the asked steps, falling and rising while the model fits, identical for identical
weights; validation images every --validation_steps; Adafactor and Prodigy checkpoint and resume to the
uninterrupted run's exact state. Each test is one run and its resume from a copy of its checkpoint-2."""

import re
import shutil

import pytest
import torch

from conftest import DECODER_SCRIPT, PRIOR_SCRIPT, base_args, launch
from test_options import tensorboard_events
from test_robustness import assert_same_state, state_of


def resume_from_checkpoint_2(script, tiny, whole, parts, steps, common):
    """Continue `whole`'s checkpoint-2 in another folder, as a run stopped there would."""
    parts.mkdir()
    shutil.copytree(whole / "checkpoint-2", parts / "checkpoint-2")
    proc = launch(script, base_args(tiny, parts, steps=steps, **common, **{"--resume_from_checkpoint": "latest"}))
    return proc.stdout + proc.stderr


def printed_evaluations(text):
    """{step: (eval_loss, eval_cosine) as printed} from a run's "Held-out evaluation at step N: ..." lines."""
    found = re.findall(r"Held-out evaluation at step (\d+): eval_loss ([^\s,]+), eval_cosine ([^\s,(]+)", text)
    return {int(step): (loss, cosine) for step, loss, cosine in found}


def optimizer_groups(checkpoint):
    """The optimizer's per-group settings and state (Prodigy keeps its step-size estimate there)."""
    groups = torch.load(checkpoint / "optimizer.bin", weights_only=False)["param_groups"]
    return [{k: v for k, v in group.items() if k != "params"} for group in groups]


def test_prior_held_out_split_every_n_steps_and_adafactor_resumes_exactly(tiny, tmp_path):
    common = {"--optimizer": "adafactor", "--validation_split": 0.25, "--validation_steps": 2,
              "--checkpointing_steps": 2, "--validation_prompts": ["a red circle"], "--report_to": "tensorboard"}
    whole, parts = tmp_path / "whole", tmp_path / "parts"
    proc = launch(PRIOR_SCRIPT, base_args(tiny, whole, steps=6, **common))
    text = proc.stdout + proc.stderr
    assert "6 examples" in text  # 8 images, 2 held out
    assert ("Evaluating a held-out set of 2 samples: eval_loss at timesteps [125, 375, 625, 875], eval_cosine, "
            "every 2 steps\n") in text
    assert re.search(r"Held-out evaluation at step 0: eval_loss \S+, eval_cosine \S+ \(2 samples, [\d.]+ s per "
                     r"evaluation\)", text)
    scalars, images = tensorboard_events(whole)
    loss, cosine = dict(scalars["eval_loss"]), dict(scalars["eval_cosine"])
    printed = printed_evaluations(text)
    assert printed == {step: (f"{loss[step]:.6g}", f"{cosine[step]:.6g}") for step in (0, 2, 4, 6)}
    assert sorted(loss) == sorted(cosine) == [0, 2, 4, 6]  # the starting weights, then every 2 steps
    assert loss[0] > loss[2] > loss[4] > loss[6]
    assert all(-1 <= value <= 1 for value in cosine.values()) and cosine[6] > cosine[0] + 0.2
    # the validation images at the asked steps, on disk and in TensorBoard
    assert sorted(int(p.name.split("-")[1]) for p in (whole / "validation").glob("step-*.png")) == [2, 4, 6]
    assert list(images.values()) == [[2, 4, 6]]

    resumed_text = resume_from_checkpoint_2(PRIOR_SCRIPT, tiny, whole, parts, 6, common)
    assert printed_evaluations(resumed_text) == {step: printed[step] for step in (4, 6)}  # the same lines
    a, b = state_of(whole / "checkpoint-6", "prior"), state_of(parts / "checkpoint-6", "prior")
    assert any("exp_avg_sq_row" in slots for slots in a["optimizer"].values())  # Adafactor's factored moments
    assert_same_state(a, b, ema=False)
    # the same weights give the same held-out figures, in another process
    resumed = tensorboard_events(parts)[0]
    assert dict(resumed["eval_loss"]) == {4: loss[4], 6: loss[6]}
    assert dict(resumed["eval_cosine"]) == {4: cosine[4], 6: cosine[6]}


def test_decoder_separate_held_out_set_cached_every_epoch_and_prodigy_resumes_exactly(tiny, tmp_path):
    pytest.importorskip("prodigyopt")
    held_out = tmp_path / "held_out"
    shutil.copytree(tiny["images"], held_out)  # the training pictures: a set the model can fit
    cache = tmp_path / "cache"
    common = {"--optimizer": "prodigy", "--learning_rate": 1.0, "--validation_data_dir": held_out,
              "--cache_embeddings": True, "--embedding_cache_dir": cache, "--checkpointing_steps": 2,
              "--report_to": "tensorboard"}
    whole, parts = tmp_path / "whole", tmp_path / "parts"
    launch(DECODER_SCRIPT, base_args(tiny, whole, steps=6, **common))
    scalars = tensorboard_events(whole)[0]
    loss = dict(scalars["eval_loss"])
    # 8 images in batches of 2: 4 steps per epoch; the evaluation starts, ends each epoch and the run
    assert sorted(loss) == [0, 4, 6] and "eval_cosine" not in scalars
    assert loss[0] > loss[4] > loss[6]
    # training and held-out sets each have a cache entry for CLIP image embeddings and one for MoVQ latents
    assert len(list(cache.iterdir())) == 4

    text = resume_from_checkpoint_2(DECODER_SCRIPT, tiny, whole, parts, 6, common)
    assert text.count("Reusing cached CLIP image embeddings") == text.count("Reusing cached frozen outputs") == 2
    assert_same_state(state_of(whole / "checkpoint-6", "unet"), state_of(parts / "checkpoint-6", "unet"), ema=False)
    groups = optimizer_groups(whole / "checkpoint-6")
    assert groups[0]["d"] > groups[0]["d0"]  # Prodigy has grown its step-size estimate...
    assert groups == optimizer_groups(parts / "checkpoint-6")  # ...and the resumed run has the same one
    assert dict(tensorboard_events(parts)[0]["eval_loss"]) == {4: loss[4], 6: loss[6]}
