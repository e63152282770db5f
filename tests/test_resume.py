"""Resumed runs that change something (issue 23): another number of processes in a run measured in epochs, flags
changed on resume, a stop at a validation step; and a stream whose passes end before --max_train_steps."""

import json
import math
import re
import shutil

import pytest
import torch

from conftest import DECODER_SCRIPT, PRIOR_SCRIPT, base_args, checkpoints, launch, offline_env
from test_robustness import DDP, lr_by_step


def card_rows(output_dir):
    return dict(re.findall(r"^\| ([^|]+) \| ([^|]+) \|$", (output_dir / "README.md").read_text(), re.M))


def test_a_run_in_epochs_resumed_on_two_processes_trains_the_epochs_left(tiny, tmp_path):
    """8 pictures, batch 2: 4 steps an epoch on one process, 2 on two. Stopped after epoch 0 of 3, the run resumed on
    two processes has 2 epochs left: 4 steps, 16 samples; the linear decay goes on at a third of the run done."""
    common = {"--max_train_steps": None, "--num_train_epochs": 3, "--lr_scheduler": "linear",
              "--report_to": "tensorboard"}
    stopped = launch(PRIOR_SCRIPT, base_args(tiny, tmp_path, **common), check=False,
                     env=offline_env(KANDINSKY_TRAIN_FAULT="micro:3:TERM"))
    assert "Received SIGTERM: saved checkpoint-4" in stopped.stdout + stopped.stderr
    launch(PRIOR_SCRIPT, base_args(tiny, tmp_path, **common, **{"--resume_from_checkpoint": "latest"}),
           launcher=DDP, env=offline_env(ACCELERATE_USE_CPU="true"))
    assert checkpoints(tmp_path) == ["checkpoint-4"] and (tmp_path / "prior" / "config.json").is_file()
    rows = card_rows(tmp_path)
    assert (rows["Optimizer steps"], rows["Epochs"], rows["Samples seen"]) == ("8", "3", "24")
    lr = lr_by_step(tmp_path)
    assert sorted(lr) == list(range(1, 9))
    for step in range(1, 5):  # 12 steps of one process planned: 1e-3 down to 0
        assert math.isclose(lr[step], 1e-3 * (12 - step) / 12, abs_tol=1e-9), (step, lr[step])
    for step in range(5, 9):  # 6 steps of two processes a run: step 4 is 2 of them
        assert math.isclose(lr[step], 1e-3 * (6 - (step - 2)) / 6, abs_tol=1e-9), (step, lr[step])


def test_flags_changed_on_resume_are_applied_said_and_on_the_model_card(tiny, tmp_path):
    common = {"--use_ema": True, "--lr_scheduler": "constant", "--checkpointing_steps": 2}
    launch(PRIOR_SCRIPT, base_args(tiny, tmp_path, steps=2, **common, **{"--ema_decay": 0.99}))
    # and the fp32 weights go on in bf16 (issue 29: they were rounded without a word)
    bf16 = {"--mixed_precision": "bf16", "--full_bf16": True}
    resumed = launch(PRIOR_SCRIPT, base_args(tiny, tmp_path, steps=4, **common, **bf16, **{
        "--resume_from_checkpoint": "latest", "--learning_rate": 5e-4, "--adam_weight_decay": 0.05,
        "--ema_decay": 0.9}))
    lines = [line for line in resumed.stderr.splitlines() if "Changed since the checkpoint" in line]
    assert len(lines) == 1 and lines[0].endswith(
        "Changed since the checkpoint, applied from step 3 on (the model card notes the earlier values): "
        "--learning_rate 0.001 -> 0.0005; --adam_weight_decay 0 -> 0.05; --ema_decay 0.99 -> 0.9; "
        "--full_bf16 off -> on (the checkpoint's fp32 weights were rounded to bf16)"), lines
    group = torch.load(tmp_path / "checkpoint-4" / "optimizer.bin", weights_only=False)["param_groups"][0]
    assert (group["lr"], group["initial_lr"], group["weight_decay"]) == (5e-4, 5e-4, 0.05)
    assert json.loads((tmp_path / "checkpoint-4" / "prior_ema" / "config.json").read_text())["decay"] == 0.9
    rows = card_rows(tmp_path)
    assert rows["Learning rate"] == "0.0005 (0.001 until step 2)"
    assert rows["EMA"] == "decay 0.9 (0.99 until step 2)"
    assert rows["Full bf16"] == "on (off until step 2)"
    again = launch(PRIOR_SCRIPT, base_args(tiny, tmp_path, steps=5, **common, **bf16, **{
        "--resume_from_checkpoint": "latest", "--learning_rate": 5e-4, "--adam_weight_decay": 0.05,
        "--ema_decay": 0.9}))
    assert "Changed since the checkpoint" not in again.stderr  # the same flags again: nothing changed
    assert card_rows(tmp_path)["Learning rate"] == "0.0005 (0.001 until step 2)"


def validated_steps(output_dir):
    return sorted({int(p.name.split("-")[1]) for p in (output_dir / "validation").glob("step-*.png")})


# 8 pictures, batch 2: 4 steps an epoch. SIGTERM during step 4, which is due for validation: every 2 steps, or at
# the end of epoch 0 with --validation_epochs 1 (the evaluation then comes at every epoch's end).
@pytest.mark.parametrize("when,steps,evaluated,rendered", [
    ({"--validation_steps": 2}, 6, ["0", "2", "4", "6"], [2, 4, 6]),
    ({"--validation_epochs": 1}, 8, ["0", "4", "8"], [4, 8]),
])
def test_a_stop_at_a_validation_step_leaves_its_validation_to_the_resumed_run(when, steps, evaluated, rendered, tiny,
                                                                              tmp_path):
    held_out = tmp_path / "held_out"
    shutil.copytree(tiny["images"], held_out)
    out = tmp_path / "out"
    common = {**when, "--validation_prompts": ["a red circle"], "--validation_data_dir": held_out}
    stopped = launch(DECODER_SCRIPT, base_args(tiny, out, steps=steps, **common), check=False,
                     env=offline_env(KANDINSKY_TRAIN_FAULT="micro:3:TERM"), console=True)
    assert "Received SIGTERM: saved checkpoint-4" in stopped.stdout
    resumed = launch(DECODER_SCRIPT, base_args(tiny, out, steps=steps, **common,
                                               **{"--resume_from_checkpoint": "latest"}), console=True)
    assert re.findall(r"Held-out evaluation at step (\d+)", stopped.stdout + resumed.stdout) == evaluated
    assert validated_steps(out) == rendered


def test_a_stream_that_runs_out_of_passes_validates_its_last_step_once(tiny, tmp_path):
    held_out = tmp_path / "held_out"
    shutil.copytree(tiny["images"], held_out)
    # 8 pictures, batch 2: one pass is 4 steps, the run ends there (before --max_train_steps 10)
    proc = launch(DECODER_SCRIPT, base_args(tiny, tmp_path / "out", steps=10, **{
        "--streaming": True, "--num_train_epochs": 1, "--validation_steps": 2, "--validation_data_dir": held_out}),
                  console=True)
    assert re.findall(r"Held-out evaluation at step (\d+)", proc.stdout) == ["0", "2", "4"]
    assert card_rows(tmp_path / "out")["Optimizer steps"] == "4"
