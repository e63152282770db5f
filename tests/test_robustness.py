"""Runs that survive (issue: exact resume, multi-process, safe checkpoints, clear errors). Each test injects a
fault the reference scripts do not survive: KANDINSKY_TRAIN_FAULT makes the script send itself a real signal at
a given micro-batch ("micro:N") or in the middle of writing a checkpoint ("save:STEP")."""

import json
import math
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from kandinsky_train.errors import UserError, main_guard

from conftest import (DECODER_SCRIPT, PRIOR_SCRIPT, REPO, base_args, checkpoints, launch, launch_command, offline_env,
                      read_state)
from fakes import FakeAccelerator, fake_checkpoint, fake_reference_checkpoint


def state_of(checkpoint, sub):
    """Everything that defines where a run is: weights, EMA, optimizer state and settings, LR schedule, step."""
    optimizer = torch.load(checkpoint / "optimizer.bin", weights_only=False)
    ema = checkpoint / f"{sub}_ema"
    return {"model": load_file(next((checkpoint / sub).glob("*.safetensors"))),
            "ema": load_file(next(ema.glob("*.safetensors"))) if ema.is_dir() else None,
            "optimizer": optimizer["state"], "param_groups": optimizer["param_groups"],
            "scheduler": torch.load(checkpoint / "scheduler.bin", weights_only=False),
            "step": read_state(checkpoint)["global_step"]}


def assert_same_state(a, b, ema):
    """ema: whether both checkpoints must hold EMA weights (a run that lost them must not pass)."""
    assert (a["ema"] is not None, b["ema"] is not None) == (ema, ema)
    assert a["step"] == b["step"]
    assert a["scheduler"]["last_epoch"] == b["scheduler"]["last_epoch"]
    assert a["scheduler"]["_last_lr"] == b["scheduler"]["_last_lr"]
    assert a["param_groups"] == b["param_groups"]  # learning rate, betas, ... of every group
    for key in ("model", "ema") if ema else ("model",):
        assert set(a[key]) == set(b[key])
        for name, tensor in a[key].items():
            assert torch.equal(tensor, b[key][name]), f"{key}.{name} differs"
    assert set(a["optimizer"]) == set(b["optimizer"]) and a["optimizer"]
    for index, slots in a["optimizer"].items():
        assert set(slots) == set(b["optimizer"][index])
        for slot, tensor in slots.items():
            assert torch.equal(torch.as_tensor(tensor), torch.as_tensor(b["optimizer"][index][slot])), slot


def trace(path):
    return [json.loads(line) for line in Path(path).read_text().splitlines()]


# The decoder's interrupted run also reads the cache through two persistent data-loader workers (memory-mapped files
# in forked processes, skip_first_batches on resume): its result must still equal the plain uninterrupted run's.
@pytest.mark.parametrize("script,sub,fault,resumed_from,parts_extra", [
    (DECODER_SCRIPT, "unet", "micro:5:TERM", 3,    # SIGTERM between the two micro-batches of step 3
     {"--cache_embeddings": True, "--dataloader_num_workers": 2}),
    (PRIOR_SCRIPT, "prior", "micro:9:KILL", 4, {}),    # SIGKILL in the second epoch; resume from checkpoint-4
])
def test_stopped_and_resumed_run_equals_the_uninterrupted_run(script, sub, fault, resumed_from, parts_extra, tiny,
                                                              tmp_path):
    # 8 images, batch 1, accumulation 2: 4 optimizer steps per epoch, shuffled; 6 steps cross an epoch boundary.
    common = {"--train_batch_size": 1, "--gradient_accumulation_steps": 2, "--use_ema": True,
              "--checkpointing_steps": 2, "--lr_scheduler": "cosine", "--lr_warmup_steps": 1}
    whole, parts = tmp_path / "whole", tmp_path / "parts"
    launch(script, base_args(tiny, whole, steps=6, **common),
           env=offline_env(KANDINSKY_TRAIN_TRACE=str(tmp_path / "whole.jsonl")))
    common.update(parts_extra)
    stopped = launch(script, base_args(tiny, parts, steps=6, **common), check=False,
                     env=offline_env(KANDINSKY_TRAIN_FAULT=fault, KANDINSKY_TRAIN_TRACE=str(tmp_path / "p1.jsonl")))
    if fault.endswith("TERM"):
        assert stopped.returncode == 0, stopped.stderr[-3000:]
        assert "Received SIGTERM: saved checkpoint-3" in stopped.stdout + stopped.stderr
        assert checkpoints(parts) == ["checkpoint-2", "checkpoint-3"]
    else:
        assert stopped.returncode != 0
        assert checkpoints(parts) == ["checkpoint-2", "checkpoint-4"]
    launch(script, base_args(tiny, parts, steps=6, **common, **{"--resume_from_checkpoint": "latest"}),
           env=offline_env(KANDINSKY_TRAIN_TRACE=str(tmp_path / "p2.jsonl")))
    assert_same_state(state_of(whole / "checkpoint-6", sub), state_of(parts / "checkpoint-6", sub), ema=True)
    # The resumed run saw exactly the micro-batches the checkpoint had not consumed, in the same order.
    seen = {name: [(r["epoch"], r["micro"], r["index"]) for r in trace(tmp_path / f"{name}.jsonl")]
            for name in ("whole", "p1", "p2")}
    assert len(seen["whole"]) == 12
    assert seen["p2"] == seen["whole"][2 * resumed_from:]
    assert seen["p1"][:2 * resumed_from] == seen["whole"][:2 * resumed_from]
    first_epoch = sorted(i for _, _, idx in seen["whole"][:8] for i in idx)
    assert first_epoch == list(range(8))
    assert [r[2] for r in seen["whole"][:4]] != [r[2] for r in seen["whole"][8:12]]  # reshuffled per epoch


def test_learning_rate_schedule_is_counted_in_optimizer_steps(tiny, tmp_path):
    from kandinsky_train.tracking import read_scalars

    # Two epochs and no --max_train_steps: 8 samples, batch 1, accumulation 3 = 3 optimizer steps an epoch, 6 in all.
    launch(PRIOR_SCRIPT, base_args(tiny, tmp_path, steps=None, **{
        "--num_train_epochs": 2, "--gradient_accumulation_steps": 3, "--train_batch_size": 1,
        "--lr_scheduler": "linear", "--lr_warmup_steps": 2, "--learning_rate": 1e-3, "--report_to": "tensorboard"}))
    logged = {step: value for step, (_, value) in read_scalars(tmp_path / "logs")["lr"].items()}

    def expected(k, warmup=2, total=6):
        return 1e-3 * (k / warmup if k < warmup else max(0.0, (total - k) / (total - warmup)))

    assert sorted(logged) == [1, 2, 3, 4, 5, 6]
    for step, value in logged.items():
        assert math.isclose(value, expected(step), abs_tol=1e-9), (step, value, expected(step))


DDP = ["--multi_gpu", "--num_processes", "2", "--num_machines", "1", "--mixed_precision", "no",
       "--dynamo_backend", "no", "--main_process_port", "0"]


def lr_by_step(output_dir):
    from kandinsky_train.tracking import read_scalars

    return {step: value for step, (_, value) in read_scalars(Path(output_dir) / "logs")["lr"].items()}


def test_two_process_prior_stops_mid_epoch_resumes_exactly_and_on_one_process(tiny, tmp_path):
    """Two processes, no --seed: SIGTERM to rank 0 alone in the middle of epoch 1; both ranks stop together, the
    resumed run (which finds the seed in the checkpoint) ends bit-identical to an uninterrupted run with that seed,
    and a resume on one process keeps the learning-rate schedule where the optimizer step puts it."""
    env = offline_env(ACCELERATE_USE_CPU="true", KANDINSKY_TRAIN_TRACE=str(tmp_path / "trace.jsonl"))
    # 8 images, 2 processes, batch 2: 2 optimizer steps an epoch; warm-up 1 then linear decay to 0 at step 6.
    common = {"--lr_scheduler": "linear", "--lr_warmup_steps": 1, "--checkpointing_steps": 2, "--seed": None,
              "--report_to": "tensorboard"}
    parts, whole, moved = tmp_path / "parts", tmp_path / "whole", tmp_path / "one-process"
    # Signalled before its second micro-batch, rank 0 finishes step 2; the ranks agree one step later (step 3).
    fault = {"KANDINSKY_TRAIN_FAULT": "micro:1:TERM", "KANDINSKY_TRAIN_FAULT_RANK": "0"}
    first = launch(PRIOR_SCRIPT, base_args(tiny, parts, steps=6, **{**common, "--checkpointing_steps": 100}),
                   launcher=DDP, env={**env, **fault})
    text = first.stdout + first.stderr
    assert "2 process(es)" in text and "Received SIGTERM: saved checkpoint-3" in text
    assert checkpoints(parts) == ["checkpoint-3"]
    seed = read_state(parts / "checkpoint-3")["seed"]
    expected = {k: pytest.approx(1e-3 * (6 - k) / 5, rel=1e-6, abs=1e-12) for k in range(1, 7)}  # float32 logs
    assert lr_by_step(parts) == {k: expected[k] for k in (1, 2, 3)}
    shutil.copytree(parts, moved)

    proc = launch(PRIOR_SCRIPT, base_args(tiny, parts, steps=6, **{**common, "--resume_from_checkpoint": "latest"}),
                  launcher=DDP, env=env)
    text = proc.stdout + proc.stderr
    assert re.search(r"Resuming from \S*checkpoint-3\b", text) and f"seed {seed} " in text
    assert "identical on all 2 processes" in text
    assert checkpoints(parts) == ["checkpoint-3", "checkpoint-4", "checkpoint-6"]
    records = trace(tmp_path / "trace.jsonl")
    by_rank = {r: [i for x in records if x["rank"] == r and x["epoch"] == 0 for i in x["index"]] for r in (0, 1)}
    assert by_rank[0] and by_rank[1] and not set(by_rank[0]) & set(by_rank[1])  # different shards
    launch(PRIOR_SCRIPT, base_args(tiny, whole, steps=6, **{**common, "--seed": seed}), launcher=DDP,
           env=offline_env(ACCELERATE_USE_CPU="true"))
    assert_same_state(state_of(whole / "checkpoint-6", "prior"), state_of(parts / "checkpoint-6", "prior"), ema=False)
    assert (parts / "prior" / "config.json").is_file() and (parts / "model_index.json").is_file()

    # The same checkpoint resumed by one process: accelerate steps the schedule once per process, so the state
    # written by two counts double; the schedule must still continue at optimizer step 4.
    proc = launch(PRIOR_SCRIPT, base_args(tiny, moved, steps=6, **{**common, "--resume_from_checkpoint": "latest"}))
    assert "will not match an uninterrupted run" in proc.stdout + proc.stderr  # the data order, not the schedule
    assert lr_by_step(moved) == expected


def test_two_process_decoder_caches_its_shares_checkpoints_resumes_and_agrees(tiny, tmp_path):
    env = offline_env(ACCELERATE_USE_CPU="true", KANDINSKY_TRAIN_TRACE=str(tmp_path / "trace.jsonl"))
    # each process encodes its share of the cache, and evaluates its share of the held-out set (half of the 8
    # images: 4 left to train on, one batch per process, so the shards need no padding and stay disjoint)
    common = {"--lr_scheduler": "linear", "--lr_warmup_steps": 1, "--checkpointing_steps": 100,
              "--cache_embeddings": True, "--validation_split": 0.5}
    # SIGTERM reaches rank 0 alone, before its first step: both ranks agree to stop together one step later.
    fault = {"KANDINSKY_TRAIN_FAULT": "micro:0:TERM", "KANDINSKY_TRAIN_FAULT_RANK": "0"}
    first = launch(DECODER_SCRIPT, base_args(tiny, tmp_path, steps=4, **common, **{"--report_to": "tensorboard"}),
                   launcher=DDP, env={**env, **fault})
    text = first.stdout + first.stderr
    assert "2 process(es)" in text and "Received SIGTERM: saved checkpoint-2" in text
    assert checkpoints(tmp_path) == ["checkpoint-2"]
    # warm-up 1 then linear decay to 0 at step 4, counted in optimizer steps whatever the number of processes
    assert lr_by_step(tmp_path) == {1: pytest.approx(1e-3), 2: pytest.approx(2e-3 / 3)}
    proc = launch(DECODER_SCRIPT, base_args(tiny, tmp_path, steps=4, **{
        **common, "--checkpointing_steps": 2, "--resume_from_checkpoint": "latest"}), launcher=DDP, env=env)
    text = proc.stdout + proc.stderr
    assert re.search(r"Resuming from \S*checkpoint-2\b", text) and "identical on all 2 processes" in text
    # CLIP image embeddings and MoVQ latents, of the training and the held-out set, one part per process
    assert len(list((tmp_path / "embedding_cache").glob("*/part-*-of-00002.safetensors"))) == 8
    assert "Reusing cached frozen outputs" in text and "Reusing cached CLIP image embeddings" in text
    # the reduced figures; step 2 ended epoch 1, whose evaluation the stop there left to the resumed run
    assert re.search(r"Held-out evaluation at step 2: eval_loss \S+ \(4 samples", text)
    assert "Held-out evaluation at step 3: eval_loss" in text and "Held-out evaluation at step 4: eval_loss" in text
    assert checkpoints(tmp_path) == ["checkpoint-2", "checkpoint-4"]
    assert (tmp_path / "unet" / "config.json").is_file() and (tmp_path / "model_index.json").is_file()
    records = trace(tmp_path / "trace.jsonl")
    by_rank = {r: [i for x in records if x["rank"] == r and x["epoch"] == 0 for i in x["index"]] for r in (0, 1)}
    assert by_rank[0] and by_rank[1] and not set(by_rank[0]) & set(by_rank[1])  # different shards
    # the resumed run: steps 3 and 4 on each of 2 ranks (4 images left to train on: one step an epoch)
    assert sorted(x["epoch"] for x in records if x["epoch"] >= 2) == [2, 2, 3, 3]


@pytest.mark.parametrize("limit", [None, 1])
def test_kill_during_save_keeps_the_previous_checkpoint(limit, tiny, tmp_path):
    args = base_args(tiny, tmp_path, steps=4, **{"--checkpointing_steps": 2, "--checkpoints_total_limit": limit})
    killed = launch(PRIOR_SCRIPT, args, check=False, env=offline_env(KANDINSKY_TRAIN_FAULT="save:4:KILL"))
    assert killed.returncode != 0
    assert checkpoints(tmp_path) == ["checkpoint-2"]  # rotation never ran before the new one was complete
    assert (tmp_path / ".tmp-checkpoint-4").is_dir()  # the half-written one is set apart...
    proc = launch(PRIOR_SCRIPT, base_args(tiny, tmp_path, steps=4, **{
        "--checkpointing_steps": 2, "--checkpoints_total_limit": limit, "--resume_from_checkpoint": "latest"}),
        env=offline_env(KANDINSKY_TRAIN_TRACE=str(tmp_path / "resumed.jsonl")))
    assert re.search(r"Resuming from \S*checkpoint-2\b", proc.stdout + proc.stderr)  # ...and `latest` ignores it
    assert len(trace(tmp_path / "resumed.jsonl")) == 2  # steps 3 and 4 only: it did resume
    assert checkpoints(tmp_path) == (["checkpoint-4"] if limit else ["checkpoint-2", "checkpoint-4"])
    assert not (tmp_path / ".tmp-checkpoint-4").exists()


def test_sigterm_to_the_launcher_alone_stops_with_a_checkpoint(tiny, tmp_path):
    """Kubernetes and `kill PID` signal only `accelerate launch`, which dies without passing SIGTERM on: the training
    process must still save and stop, not run on orphaned until a SIGKILL loses its progress."""
    trace, output = tmp_path / "trace.jsonl", tmp_path / "out"
    proc = subprocess.Popen(launch_command(DECODER_SCRIPT, base_args(tiny, output, steps=100000)), cwd=REPO,
                            env=offline_env(KANDINSKY_TRAIN_TRACE=str(trace)), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 600
        while not (trace.exists() and len(trace.read_text().splitlines()) >= 3):
            assert proc.poll() is None and time.monotonic() < deadline, "training did not start"
            time.sleep(0.2)
        proc.send_signal(signal.SIGTERM)  # the launcher, not the training process
        text, _ = proc.communicate(timeout=600)  # the pipe ends when the training process has exited too
    finally:
        proc.kill()
        subprocess.run(["pkill", "-f", str(output)])  # an orphan left by a failure must not outlive the test
    match = re.search(r"Received SIGTERM: saved checkpoint-(\d+)", text)
    assert match, text[-3000:]
    step = int(match.group(1))
    assert checkpoints(output) == [f"checkpoint-{step}"]
    resumed = launch(DECODER_SCRIPT, base_args(tiny, output, steps=step + 1, **{"--resume_from_checkpoint": "latest"}),
                     env=offline_env(KANDINSKY_TRAIN_TRACE=str(tmp_path / "resumed.jsonl")))
    assert re.search(rf"Resuming from \S*checkpoint-{step}\b", resumed.stdout + resumed.stderr)
    assert len((tmp_path / "resumed.jsonl").read_text().splitlines()) == 1  # the one step left
    assert read_state(output / f"checkpoint-{step}")["global_step"] == step
    assert (output / "unet" / "config.json").is_file()


def test_checkpoint_of_the_reference_prior_script_resumes_by_name(tiny, tmp_path):
    """A checkpoint written as diffusers' reference prior script writes one (tests/reference_checkpoint.py: accelerate's
    real save_state, the prior and its EMA saved with save_pretrained, AdamW over every parameter of the prior, no
    training_state.json, no seed). Learning rate 0 keeps the weights where they were, so what was restored shows."""
    from diffusers.training_utils import EMAModel

    subprocess.run([sys.executable, str(REPO / "tests" / "reference_checkpoint.py"), "prior", str(tiny["prior"]),
                    str(tmp_path), "2"], cwd=REPO, env=offline_env(), check=True, capture_output=True)
    proc = launch(PRIOR_SCRIPT, base_args(tiny, tmp_path, steps=3, **{
        "--use_ema": True, "--learning_rate": 0, "--checkpointing_steps": 3, "--seed": None,
        "--resume_from_checkpoint": "checkpoint-2"}))
    text = proc.stdout + proc.stderr
    assert "checkpoint-2 has no training_state.json" in text and "run goes on at step 2" in text
    assert "records no seed (diffusers' reference scripts do not)" in text
    assert "deprecated" not in text and "are not expected" not in text  # the EMA loads quietly
    before, after = tmp_path / "checkpoint-2", tmp_path / "checkpoint-3"
    weights = {name: {c: load_file(next((c / name).glob("*.safetensors"))) for c in (before, after)}
               for name in ("prior", "prior_ema")}
    assert all(torch.equal(weights["prior"][before][k], v) for k, v in weights["prior"][after].items())
    decay = EMAModel([torch.zeros(1)]).get_decay(3)  # the EMA's third update, counted on from the reference's two
    for k, ema in weights["prior_ema"][after].items():
        previous, model = weights["prior_ema"][before][k], weights["prior"][after][k]
        assert torch.allclose(ema, previous - (1 - decay) * (previous - model), atol=1e-7), k
    optimizer = torch.load(after / "optimizer.bin", weights_only=False)
    assert {s["step"].item() for s in optimizer["state"].values()} == {3.0}  # every trained weight's AdamW state
    assert len(optimizer["state"]) == len(torch.load(before / "optimizer.bin", weights_only=False)["state"])
    assert torch.load(after / "scheduler.bin", weights_only=False)["last_epoch"] == 3
    assert read_state(after)["global_step"] == 3 and read_state(after)["counted_from_step"] == 2


def test_a_reference_checkpoint_with_warm_up_and_accumulation_resumes_at_its_schedule_position(tiny, tmp_path):
    """The reference scripts scale the schedule's lengths by the accumulation steps and step it in accelerate's
    accumulate: resumed from their checkpoint-2 (warm-up 4, accumulation 2), the run takes the learning rate of
    optimizer step 2 of its own schedule on, as an uninterrupted run of this script would."""
    from diffusers.optimization import get_scheduler

    subprocess.run([sys.executable, str(REPO / "tests" / "reference_checkpoint.py"), "prior", str(tiny["prior"]),
                    str(tmp_path), "2", "linear", "4", "2", "1e-3"], cwd=REPO, env=offline_env(), check=True,
                   capture_output=True)
    launch(PRIOR_SCRIPT, base_args(tiny, tmp_path, steps=6, **{
        "--gradient_accumulation_steps": 2, "--lr_warmup_steps": 4, "--lr_scheduler": "linear",
        "--checkpointing_steps": 6, "--report_to": "tensorboard", "--resume_from_checkpoint": "latest"}))
    optimizer = torch.optim.SGD([torch.zeros(1)], lr=1e-3)
    schedule = get_scheduler("linear", optimizer, num_warmup_steps=4, num_training_steps=6)
    expected = {}
    for step in range(1, 7):
        optimizer.step()
        schedule.step()
        expected[step] = schedule.get_last_lr()[0]
    logged = lr_by_step(tmp_path)
    assert sorted(logged) == [3, 4, 5, 6]
    assert all(math.isclose(logged[step], expected[step], rel_tol=1e-6) for step in logged), (logged, expected)
    assert logged[3] < logged[4] > logged[5]  # the end of warm-up (at step 4), then the decay
    assert torch.load(tmp_path / "checkpoint-6" / "scheduler.bin", weights_only=False)["last_epoch"] == 6


def test_disk_full_while_writing_a_checkpoint_stops_with_one_line(tiny, tmp_path):
    """An OSError(ENOSPC) injected while checkpoint-2 is written (any filesystem; tests/test_storage.py fills a real
    tmpfs)."""
    proc = launch(PRIOR_SCRIPT, base_args(tiny, tmp_path, steps=3, **{"--checkpointing_steps": 1}), check=False,
                  env=offline_env(KANDINSKY_TRAIN_FAULT="save:2:ENOSPC"))
    assert proc.returncode != 0
    error = re.search(r"error: (Not enough disk space[^\n]*)", proc.stderr)  # after the progress bar's \r
    assert error and "Traceback" not in proc.stderr[:error.start()], proc.stderr[-3000:]
    assert error.group(1).startswith(f"Not enough disk space to write checkpoint-2 in {tmp_path}: it needs about ")
    assert "(the size of checkpoint-1)" in error.group(1) and "What it had written was removed." in error.group(1)
    assert checkpoints(tmp_path) == ["checkpoint-1"] and not list(tmp_path.glob(".tmp-*"))
    assert read_state(tmp_path / "checkpoint-1")["global_step"] == 1


@pytest.mark.parametrize("disk", ["simulated", "tmpfs"])
def test_disk_full_before_a_checkpoint_stops_cleanly_and_resume_continues(disk, tiny, tmpfs, tmp_path):
    """A disk with room for one tiny prior checkpoint, not two: a real tmpfs where one can be mounted (as root), and
    everywhere a folder that the free-space checks see as such a disk (KANDINSKY_TRAIN_DISK)."""
    if disk == "tmpfs":
        small = tmpfs("700k")
        env = room_env = offline_env()
    else:
        small = tmp_path / "disk"
        env = offline_env(KANDINSKY_TRAIN_DISK=f"{small}:{700 << 10}")
        room_env = offline_env(KANDINSKY_TRAIN_DISK=f"{small}:{32 << 20}")
    args = base_args(tiny, small, steps=3, **{"--checkpointing_steps": 1})
    full = launch(PRIOR_SCRIPT, args, check=False, env=env)
    assert full.returncode != 0
    assert f"error: Not enough disk space to write checkpoint-2 in {small}: it needs about" in full.stderr
    assert "Nothing was written. checkpoint-1 and the checkpoints before it are intact." in full.stderr
    assert "Traceback" not in full.stderr.split("error: Not enough")[0], full.stderr[-3000:]
    assert sorted(p.name for p in small.iterdir()) == ["checkpoint-1"]
    if disk == "tmpfs":
        subprocess.run(["mount", "-o", "remount,size=32m", str(small)], check=True)  # room again
    launch(PRIOR_SCRIPT, args + ["--resume_from_checkpoint", "latest"], env=room_env)
    assert checkpoints(small) == ["checkpoint-1", "checkpoint-2", "checkpoint-3"]
    assert (small / "prior" / "config.json").is_file()


def test_ctrl_c_in_a_terminal_reaches_launcher_and_training_and_the_launcher_exits_130(tiny, tmp_path):
    """A terminal's Ctrl-C sends SIGINT to the whole foreground process group: `accelerate launch` and the training
    process at once. The training process saves a checkpoint and exits 130; the launcher, interrupted in its wait,
    exits at once as a Ctrl-C'd program does, while the training process saves its checkpoint and ends. What the
    user sees is 130: accelerate before 1.16 dies of the SIGINT (the shell shows 128 + 2), 1.16 on exits 130."""
    trace, output = tmp_path / "trace.jsonl", tmp_path / "out"
    proc = subprocess.Popen(launch_command(DECODER_SCRIPT, base_args(tiny, output, steps=100000)), cwd=REPO,
                            env=offline_env(KANDINSKY_TRAIN_TRACE=str(trace)), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)  # its own group
    try:
        deadline = time.monotonic() + 600
        while not (trace.exists() and len(trace.read_text().splitlines()) >= 3):
            assert proc.poll() is None and time.monotonic() < deadline, "training did not start"
            time.sleep(0.2)
        os.killpg(proc.pid, signal.SIGINT)  # the launcher's group: both processes, as a terminal does
        text, _ = proc.communicate(timeout=600)  # the pipe ends when the training process has exited too
    finally:
        proc.kill()
        subprocess.run(["pkill", "-f", str(output)])  # an orphan left by a failure must not outlive the test
    assert proc.returncode in (-signal.SIGINT, 128 + signal.SIGINT), text[-3000:]
    step = int(re.search(r"Received SIGINT: saved checkpoint-(\d+)", text).group(1))
    assert checkpoints(output) == [f"checkpoint-{step}"] and read_state(output / f"checkpoint-{step}")["global_step"] \
        == step


def test_a_real_decoder_pipeline_saved_into_a_disk_that_fills_during_the_save(tiny, tmpfs):
    """End to end on a real tmpfs (where one can be mounted): the room for the weights passes the check before the
    final save, the configs and file headers beside them do not fit, so safetensors itself runs out of space in the
    middle of KandinskyV22Pipeline.save_pretrained. One line, what the save wrote removed, exit code not 0."""
    from diffusers import UNet2DConditionModel, VQModel

    from kandinsky_train.storage import module_bytes

    weights = module_bytes(UNet2DConditionModel.from_pretrained(tiny["decoder"], subfolder="unet"),
                           VQModel.from_pretrained(tiny["decoder"], subfolder="movq"))
    disk = tmpfs(f"{(weights + 8192) // 4096 * 4096}")  # the weights and two pages, no room for six small files
    proc = launch(DECODER_SCRIPT, base_args(tiny, disk, steps=1), check=False)
    assert proc.returncode != 0
    error = re.search(r"error: (Not enough disk space[^\n]*)", proc.stderr)
    assert error and "Traceback" not in proc.stderr[:error.start()], proc.stderr[-3000:]
    assert error.group(1).startswith(f"Not enough disk space to write the fine-tuned pipeline in {disk}: ")
    assert "What it had written was removed." in error.group(1)
    assert not {"model_index.json", "unet", "movq", "scheduler", "README.md"} & {p.name for p in disk.iterdir()}


def test_sigint_saves_and_exits_with_130(tiny, tmp_path):
    proc = launch(DECODER_SCRIPT, base_args(tiny, tmp_path, steps=4), check=False,
                  env=offline_env(KANDINSKY_TRAIN_FAULT="micro:2:INT"))
    assert "Received SIGINT: saved checkpoint-3" in proc.stdout + proc.stderr
    assert checkpoints(tmp_path) == ["checkpoint-3"] and proc.returncode != 0
    # the training process exits 130, as a shell's Ctrl-C does (`accelerate launch` then reports it and exits 1)
    assert "returned non-zero exit status 130" in proc.stderr


def test_resuming_an_older_checkpoint_sets_the_newer_ones_aside(tiny, tmp_path):
    """Going back to checkpoint-3 abandons checkpoint-6. Left in place it would be overwritten at step 6 or, with
    --checkpoints_total_limit, outrank the new checkpoints in rotation (which deleted them) and in `latest`."""
    launch(PRIOR_SCRIPT, base_args(tiny, tmp_path, steps=6, **{"--checkpointing_steps": 3,
                                                                "--checkpoints_total_limit": 2}))
    assert checkpoints(tmp_path) == ["checkpoint-3", "checkpoint-6"]
    abandoned = (tmp_path / "checkpoint-6" / "prior" / "diffusion_pytorch_model.safetensors").read_bytes()
    proc = launch(PRIOR_SCRIPT, base_args(tiny, tmp_path, steps=5, **{
        "--checkpointing_steps": 1, "--checkpoints_total_limit": 2, "--resume_from_checkpoint": "checkpoint-3"}))
    aside = tmp_path / "abandoned-after-checkpoint-3"
    assert f"Resuming from checkpoint-3 abandons the newer checkpoint-6: moved to {aside}" in proc.stderr
    assert checkpoints(tmp_path) == ["checkpoint-4", "checkpoint-5"]  # the run that goes on, rotated
    assert (aside / "checkpoint-6" / "prior" / "diffusion_pytorch_model.safetensors").read_bytes() == abandoned


def test_a_signal_after_training_stops_at_once_and_says_what_did_not_finish(tiny, tmp_path):
    """SIGTERM during the final validation: nothing is left to checkpoint, so the process stops there (not after
    the final save and upload it would otherwise still run), and a resume finishes the job."""
    proc = launch(DECODER_SCRIPT, base_args(tiny, tmp_path, steps=2, **{"--checkpointing_steps": 2}), check=False,
                  env=offline_env(KANDINSKY_TRAIN_FAULT="finish:TERM"))
    assert ("stopped: received SIGTERM during the final validation. Training reached step 2; the last checkpoint is "
            "checkpoint-2. Not finished: the final validation and what follows it") in proc.stderr, proc.stderr[-3000:]
    assert "returned non-zero exit status 143" in proc.stderr
    assert checkpoints(tmp_path) == ["checkpoint-2"] and not (tmp_path / "model_index.json").exists()
    resumed = launch(DECODER_SCRIPT, base_args(tiny, tmp_path, steps=2, **{"--resume_from_checkpoint": "latest"}),
                     env=offline_env(KANDINSKY_TRAIN_TRACE=str(tmp_path / "resumed.jsonl")))
    assert "Resuming from" in resumed.stdout + resumed.stderr and not (tmp_path / "resumed.jsonl").exists()
    assert (tmp_path / "model_index.json").is_file()


# ---------------------------------------------------------------------------------------------------------------
# Clear errors, before the models are loaded where possible
# ---------------------------------------------------------------------------------------------------------------

def run_direct(script, args, env=None):
    """Plain `python script.py ...`: the error must be one line on stderr, no traceback."""
    proc = subprocess.run([sys.executable, script, *map(str, args)], cwd=REPO, env=env or offline_env(),
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 2, (proc.returncode, proc.stderr[-3000:])
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    return proc.stderr


def run_in_process(module, args, capsys):
    """The script's own main_guard(main) in this process (an import of torch and diffusers per case would cost
    minutes): exit code 2 and the one line it prints."""
    capsys.readouterr()
    with pytest.raises(SystemExit) as exited:
        main_guard(lambda: module.main(module.parse_args([str(a) for a in args])))
    assert exited.value.code == 2
    return capsys.readouterr().err


def error_line(error, context=""):
    """The one `error: ` line of a refused run's stderr: exactly one, and no traceback."""
    lines = [line for line in error.splitlines() if line.startswith("error: ")]
    assert len(lines) == 1 and "Traceback" not in error, f"{context}:\n{error[-2000:]}"
    return lines[0]


def test_errors_name_the_problem(tiny, tmp_path, capsys):
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "notes.txt").write_text("no images here")
    bad_captions = tmp_path / "bad_captions"
    shutil.copytree(tiny["images"], bad_captions)
    rows = [json.loads(line) for line in (bad_captions / "metadata.jsonl").read_text().splitlines()]
    rows[1]["text"] = None
    del rows[3]["text"]
    (bad_captions / "metadata.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    mixed = tmp_path / "mixed_captions"
    shutil.copytree(tiny["images"], mixed)
    rows[1]["text"] = 7
    (mixed / "metadata.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    earlier_run = tmp_path / "earlier_run"
    for step in (3, 12):
        fake_checkpoint(earlier_run / f"checkpoint-{step}", "unet", step)
    damaged_run = tmp_path / "damaged_run"  # the newest lost a file after it was saved (a partial copy or sync)
    fake_checkpoint(damaged_run / "checkpoint-4", "unet", 4)
    fake_checkpoint(damaged_run / "checkpoint-8", "unet", 8, leave_out=["optimizer.bin"])
    reference_run = tmp_path / "reference_run"  # diffusers' reference script: no training_state.json
    fake_reference_checkpoint(reference_run / "checkpoint-500", "unet")
    fake_reference_checkpoint(reference_run / "checkpoint-1000", "unet", leave_out=["scheduler.bin", "unet/"])
    cases = [
        (PRIOR_SCRIPT, {"--train_data_dir": None}, "Need training data: give --dataset_name"),
        (PRIOR_SCRIPT, {"--dataset_name": tiny["parquet"]}, "Conflicting flags: give either --dataset_name"),
        (DECODER_SCRIPT, {"--train_data_dir": empty}, "holds no images"),
        (DECODER_SCRIPT, {"--image_column": "picture"},
         "--image_column 'picture' is not a column of .*; its columns are: image, text"),
        (PRIOR_SCRIPT, {"--caption_column": "caption"}, "--caption_column 'caption' is not a column"),
        (PRIOR_SCRIPT, {"--train_data_dir": bad_captions},
         r"2 sample\(s\) have a missing or non-string caption in column 'text' \(rows 1, 3\)"),
        (PRIOR_SCRIPT, {"--train_data_dir": mixed},
         "Could not read the image folder --train_data_dir .* and its metadata file: .*changed from string to number"),
        (PRIOR_SCRIPT, {"--pretrained_prior_model_name_or_path": tiny["decoder"]},
         "--pretrained_prior_model_name_or_path .* has no prior, text_encoder, image_encoder, tokenizer, "
         "image_processor subfolder"),
        (DECODER_SCRIPT, {"--pretrained_decoder_model_name_or_path": tmp_path / "nowhere"},
         "is neither a model folder nor a Hub model id"),
        (DECODER_SCRIPT, {"--resolution": 60}, "--resolution must be a positive multiple of 8, got 60"),
        (PRIOR_SCRIPT, {"--report_to": "wandb", "--hub_token": "hf_x"}, "would expose your token"),
        (PRIOR_SCRIPT, {"--lr_scheduler": "warmup_cosine"}, "Unknown --lr_scheduler 'warmup_cosine'; choose one of"),
        (DECODER_SCRIPT, {"--enable_xformers_memory_efficient_attention": True}, "needs xformers: pip install"),
        (PRIOR_SCRIPT, {"--use_8bit_adam": True}, "needs bitsandbytes"),
        (PRIOR_SCRIPT, {"--use_ema": True, "--use_lora": True}, "Conflicting flags: --use_ema with --use_lora"),
        (PRIOR_SCRIPT, {"--resume_from_checkpoint": "checkpoint-old"}, "takes \"latest\" or a folder named"),
        (DECODER_SCRIPT, {"--output_dir": earlier_run},
         r"already holds checkpoints of an earlier run \(checkpoint-3, checkpoint-12\). Add "
         "--resume_from_checkpoint latest"),
        (DECODER_SCRIPT, {"--output_dir": reference_run},
         r"already holds checkpoints of an earlier run \(checkpoint-500\)"),
        (DECODER_SCRIPT, {"--output_dir": reference_run, "--resume_from_checkpoint": "latest"},
         r"holds checkpoint-1000, which is not a complete checkpoint \(it lacks scheduler.bin, unet/; perhaps the "
         r"half-written save of a run that was killed\), and this run would save its own checkpoint of that step "
         "there. Move it out of --output_dir"),
        (DECODER_SCRIPT, {"--output_dir": damaged_run, "--resume_from_checkpoint": "latest"},
         r"holds checkpoint-8, which was saved complete but now lacks optimizer.bin \(a partial copy or sync\?\), so "
         r"it cannot be resumed \(the newest complete checkpoint is checkpoint-4\), .* Restore the missing files, or "
         "move checkpoint-8 out of --output_dir to go on from checkpoint-4, then run again."),
        (DECODER_SCRIPT, {"--output_dir": reference_run, "--resume_from_checkpoint": "checkpoint-500",
                          "--use_ema": True},
         r"checkpoint-500 holds no unet_ema/ that this --use_ema run needs to resume: it was saved without "
         r"--use_ema \(resume it without --use_ema\) or lost the folder \(restore it\)\."),
        (PRIOR_SCRIPT, {"--streaming": True, "--max_train_steps": None},
         "--streaming needs --max_train_steps: a stream has no length to count the training steps from"),
        (DECODER_SCRIPT, {"--streaming": True, "--cache_embeddings": True},
         "Conflicting flags: --cache_embeddings with --streaming is not supported: the cache is built by a pass"),
        (PRIOR_SCRIPT, {"--streaming": True, "--validation_split": 0.25},
         "Conflicting flags: --validation_split with --streaming is not supported: a stream has no rows to split"),
        (PRIOR_SCRIPT, {"--streaming": True, "--caption_column": "caption"},
         "--caption_column 'caption' is not a column of .*; its columns are: image, text"),
    ]
    import train_text_to_image_decoder
    import train_text_to_image_prior

    modules = {PRIOR_SCRIPT: train_text_to_image_prior, DECODER_SCRIPT: train_text_to_image_decoder}
    for number, (script, overrides, message) in enumerate(cases):
        if overrides.get("--enable_xformers_memory_efficient_attention") and _has("xformers"):
            continue
        if overrides.get("--use_8bit_adam") and _has("bitsandbytes"):
            continue
        args = base_args(tiny, tmp_path / "out", **overrides)
        if number in (0, 3):  # as a user runs it
            error = run_direct(script, args)
        else:
            error = run_in_process(modules[script], args, capsys)
        # one line on stderr names the problem; no traceback; nothing written
        line = error_line(error, overrides)
        assert re.search(message, line), f"{overrides}: expected {message!r} in\n{line}"
        assert not (tmp_path / "out").exists(), overrides
    assert sorted(p.name for p in earlier_run.iterdir()) == ["checkpoint-12", "checkpoint-3"]  # left alone
    assert sorted(p.name for p in reference_run.iterdir()) == ["checkpoint-1000", "checkpoint-500"]
    assert sorted(p.name for p in damaged_run.iterdir()) == ["checkpoint-4", "checkpoint-8"]  # passed over, kept
    assert sorted(p.name for p in (reference_run / "checkpoint-1000").iterdir()) == [
        "optimizer.bin", "random_states_0.pkl"]


def _has(package):
    import importlib.util

    return importlib.util.find_spec(package) is not None


def write_bad_images(folder, tiny):
    folder.mkdir()
    rows = []

    def add(name, caption):
        rows.append({"file_name": name, "text": caption})

    rng = np.random.default_rng(0)
    rgb = (rng.random((64, 64, 3)) * 255).astype(np.uint8)
    Image.fromarray(rgb).save(folder / "good.png")
    add("good.png", "a good image")
    Image.fromarray(rgb).convert("CMYK").save(folder / "cmyk.jpg")
    add("cmyk.jpg", "a cmyk image")
    Image.fromarray((rng.random((64, 64)) * 65535).astype(np.uint16)).save(folder / "sixteen.png")
    add("sixteen.png", "a 16-bit image")
    Image.fromarray(rgb).convert("P").save(folder / "palette.png")
    add("palette.png", "a palette image")
    Image.fromarray(np.dstack([rgb, np.full((64, 64), 128, np.uint8)])).save(folder / "rgba.png")
    add("rgba.png", "an rgba image")
    (folder / "zero.png").write_bytes(b"")
    add("zero.png", "an empty file")
    (folder / "garbage.jpg").write_bytes(b"this is not a jpeg at all" * 10)
    add("garbage.jpg", "a corrupt file")
    Image.fromarray(rgb).save(folder / "full.jpg")
    (folder / "truncated.jpg").write_bytes((folder / "full.jpg").read_bytes()[:300])
    (folder / "full.jpg").unlink()
    add("truncated.jpg", "a truncated file")
    (folder / "metadata.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    return folder


def test_unreadable_images_are_skipped_and_reported(tiny, tmp_path):
    data = write_bad_images(tmp_path / "data", tiny)
    proc = launch(DECODER_SCRIPT, base_args(tiny, tmp_path / "out", steps=2, **{"--train_data_dir": data}))
    text = proc.stdout + proc.stderr
    skipping = [line for line in text.splitlines() if "Skipping unreadable image" in line]
    assert len(skipping) == 3
    for name in ("zero.png", "garbage.jpg", "truncated.jpg"):  # each named on a line of its own, with the reason
        assert sum(bool(re.search(rf"Skipping unreadable image \S*{re.escape(name)}: \S", line))
                   for line in skipping) == 1, (name, skipping)
    assert "5 examples (3 unreadable image(s) skipped" in text
    assert "Data: 3 unreadable image(s) skipped" in text  # and again at the end


def test_all_images_unreadable_is_an_error(tiny, tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    for i in range(3):
        (data / f"{i}.png").write_bytes(b"\x89PNG broken")
    (data / "metadata.jsonl").write_text("\n".join(json.dumps({"file_name": f"{i}.png", "text": "x"})
                                                   for i in range(3)))
    stderr = run_direct(PRIOR_SCRIPT, base_args(tiny, tmp_path / "out", **{"--train_data_dir": data}))
    assert "None of the 3 images could be read" in stderr


@pytest.mark.parametrize("flag,package", [(["--report_to", "wandb"], "wandb"),
                                          (["--report_to", "tensorboard"], "tensorboard")])
def test_tracker_package_missing_is_named(flag, package, tiny, tmp_path, monkeypatch):
    import importlib.util

    import train_text_to_image_decoder as decoder

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == package else real(name, *a))
    with pytest.raises(UserError, match=f"--report_to {package} needs the `{package}` package: pip"):
        decoder.main(decoder.parse_args([str(a) for a in base_args(tiny, tmp_path, **{"--report_to": None})] + flag))


def test_the_ranks_weight_check_compares_every_tensor_and_names_the_one_that_differs():
    """Two processes whose weights differ by a swap of two elements in one tensor (the sum of every weight, which
    the check once compared, is the same): the check must fail and name that tensor; equal weights pass."""
    from kandinsky_train.runtime import check_ranks_agree, weight_checksums

    model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.Linear(3, 2))
    other = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.Linear(3, 2))
    other.load_state_dict(model.state_dict())

    class TwoRanks(FakeAccelerator):
        def gather(self, tensor):
            return torch.cat([tensor, weight_checksums(other)])

    accelerator = TwoRanks(num_processes=2)
    check_ranks_agree(accelerator, model)
    assert accelerator.printed == ["Trained weights are identical on all 2 processes."]
    with torch.no_grad():
        weight = other[1].weight
        weight[0, 0], weight[1, 2] = weight[1, 2].item(), weight[0, 0].item()
    assert sum(p.double().sum() for p in other.parameters()) == sum(p.double().sum() for p in model.parameters())
    with pytest.raises(RuntimeError, match=r"1 tensor\(s\) differ, the first 1\.weight\."):
        check_ranks_agree(accelerator, model)
