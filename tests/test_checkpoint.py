"""kandinsky_train.checkpoint and checkpoint_folders in-process: which folders count as checkpoints (ours, the
reference scripts', incomplete ones), atomic save and rotation that never delete an incomplete folder, the run's
position as one object, the model hooks that write a checkpoint in diffusers format and load it back quietly, and
the reference prior script's optimizer state."""

import json
import os

import pytest
import torch

from conftest import warnings_seen
from fakes import FakeAccelerator, fake_checkpoint, fake_reference_checkpoint
from kandinsky_train import checkpoint, checkpoint_folders, model_state
from kandinsky_train.checkpoint_folders import Layout
from kandinsky_train.errors import UserError
from kandinsky_train.output_dir import check_output_dir

PRIOR = Layout("prior")


def test_latest_ignores_foreign_and_incomplete_folders(tmp_path):
    for name, complete in [("checkpoint-2", True), ("checkpoint-10", True), ("checkpoint-12", False),
                           ("checkpoint-old", True), (".tmp-checkpoint-14", True), ("checkpoint-3-copy", True)]:
        (tmp_path / name).mkdir()
        if complete:
            fake_checkpoint(tmp_path / name, "prior", 1)
    # ours, complete when saved (training_state.json is written last), since damaged: not resumable either
    fake_checkpoint(tmp_path / "checkpoint-16", "prior", 16, leave_out=["optimizer.bin"])
    assert [s for s, _ in checkpoint_folders.list_checkpoints(str(tmp_path), PRIOR)] == [2, 10]
    assert PRIOR.missing(tmp_path / "checkpoint-16") == ["optimizer.bin"]

    class Args:
        output_dir, resume_from_checkpoint = str(tmp_path), "latest"

    assert checkpoint_folders.resolve_resume(Args, PRIOR).endswith("checkpoint-10")
    Args.resume_from_checkpoint = "checkpoint-12"
    with pytest.raises(UserError, match="does not exist or is incomplete.*checkpoint-2, checkpoint-10"):
        checkpoint_folders.resolve_resume(Args, PRIOR)


def test_reference_script_checkpoints_count_when_complete(tmp_path):
    """diffusers' reference scripts write accelerate's files and the model folders, no training_state.json."""
    with_ema = Layout("unet", ema=True)
    fake_reference_checkpoint(tmp_path / "checkpoint-3", "unet", ema=True)
    fake_reference_checkpoint(tmp_path / "checkpoint-5", "unet")  # trained without --use_ema
    fake_reference_checkpoint(tmp_path / "checkpoint-7", "unet", ema=True, leave_out=["optimizer.bin", "unet/"])
    assert Layout("unet").missing(tmp_path / "checkpoint-5") == []
    assert with_ema.missing(tmp_path / "checkpoint-5") == ["unet_ema/"]
    assert with_ema.missing(tmp_path / "checkpoint-7") == ["optimizer.bin", "unet/"]
    assert Layout("prior").missing(tmp_path / "checkpoint-3") == ["prior/"]  # a decoder's is not a prior's
    complete, incomplete = checkpoint_folders.scan(str(tmp_path), with_ema)
    assert [s for s, _ in complete] == [3]
    assert [(s, missing) for s, _, missing in incomplete] == [(5, ["unet_ema/"]), (7, ["optimizer.bin", "unet/"])]

    class Args:
        output_dir, resume_from_checkpoint, use_ema, use_lora, mixed_precision = (str(tmp_path), "latest", False,
                                                                                  False, None)

    assert checkpoint_folders.resolve_resume(Args, Layout.of(Args, "decoder")).endswith("checkpoint-5")
    Args.resume_from_checkpoint = "checkpoint-7"
    with pytest.raises(UserError, match=r"'checkpoint-7' does not exist or is incomplete .*\(complete checkpoints: "
                                        r"checkpoint-3, checkpoint-5\); it lacks optimizer.bin, unet/\."):
        checkpoint_folders.resolve_resume(Args, Layout.of(Args, "decoder"))


def test_an_fp16_run_needs_the_gradient_scalers_file(tmp_path, monkeypatch):
    """accelerate saves fp16's loss scale as scaler.pt and its load_state reads it back (only) with fp16: an fp16
    run's checkpoint without it is damaged, and another precision's run does not need it."""
    fake_checkpoint(tmp_path / "checkpoint-2", "unet", 2)
    fake_checkpoint(tmp_path / "checkpoint-4", "unet", 4)
    (tmp_path / "checkpoint-2" / "scaler.pt").write_bytes(b"{}")

    class Args:
        output_dir, resume_from_checkpoint, use_ema, use_lora, mixed_precision = (str(tmp_path), "checkpoint-4",
                                                                                  False, False, "fp16")

    fp16 = Layout.of(Args, "decoder")
    assert fp16.missing(tmp_path / "checkpoint-4") == ["scaler.pt"]
    assert [s for s, _ in checkpoint_folders.list_checkpoints(str(tmp_path), fp16)] == [2]
    with pytest.raises(UserError, match=r"\(complete checkpoints: checkpoint-2\); it lacks scaler.pt\."):
        checkpoint_folders.resolve_resume(Args, fp16)
    Args.mixed_precision = None  # then `accelerate launch --mixed_precision` (or its config file) decides
    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "fp16")
    assert Layout.of(Args, "decoder").missing(tmp_path / "checkpoint-4") == ["scaler.pt"]
    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "bf16")
    assert Layout.of(Args, "decoder").missing(tmp_path / "checkpoint-4") == []
    # resumed with `latest` in fp16, a bf16 run's checkpoint is refused with what to do, before anything loads
    Args.mixed_precision, Args.resume_from_checkpoint = "fp16", "latest"
    for flag in ("pretrained_prior_model_name_or_path", "pretrained_decoder_model_name_or_path", "train_data_dir",
                 "dataset_name", "validation_data_dir"):
        setattr(Args, flag, None)
    with pytest.raises(UserError, match=r"holds checkpoint-4, which has no scaler.pt \(fp16's loss scale\) that this "
                                        r"fp16 run needs to resume: it was saved in another precision \(resume with "
                                        r"that --mixed_precision\) or lost the file"):
        check_output_dir(Args, "decoder")


def test_train_state_round_trips_and_derives_the_epoch():
    state = checkpoint.TrainState(seed=7, steps_per_epoch=4, stage="prior", global_step=9, epoch=2,
                                  skipped_images=["a.png"], samples_seen=36, train_seconds=5.5)
    restored = checkpoint.TrainState(seed=7, steps_per_epoch=4)
    restored.load_state_dict(json.loads(json.dumps(state.state_dict())))
    assert restored.global_step == 9 and restored.epoch == 2  # step 10 is the second step of epoch 2
    assert (restored.samples_seen, restored.train_seconds, restored.counted_from_step) == (36, 5.5, 0)
    assert state.state_dict() == {"seed": 7, "steps_per_epoch": 4, "stage": "prior", "decoder_type": None,
                                  "global_step": 9, "epoch": 2,
                                  "skipped_images": ["a.png"], "samples_seen": 36, "train_seconds": 5.5,
                                  "counted_from_step": 0, "held_out": None, "stream": None, "step_offset": 0,
                                  "validation_due": [], "changes": []}
    # A checkpoint that recorded no figures (a reference script's): they count from its step on.
    restored.load_state_dict({"global_step": 6})
    assert (restored.samples_seen, restored.train_seconds, restored.counted_from_step) == (0, 0.0, 6)
    # Another batch geometry since (here 2 steps an epoch, not 4): the epoch and its share done carry over, so step
    # 9 at 4 an epoch (2 epochs and a quarter) is the start of epoch 2 at 2 an epoch (a quarter of 2 steps is none):
    # 4 steps counted in epochs, from an offset of 5.
    regrouped = checkpoint.TrainState(seed=7, steps_per_epoch=2)
    regrouped.load_state_dict(state.state_dict())
    assert (regrouped.global_step, regrouped.step_offset, regrouped.epoch_steps, regrouped.epoch) == (9, 5, 4, 2)
    # --streaming: no length, so the epoch is the one the stream's recorded position names
    position = {"epoch": 3, "micro": 1, "total_micro": 13, "workers": 0, "consumed": [{"0": 2}]}
    streamed = checkpoint.TrainState(seed=7, steps_per_epoch=None)
    streamed.load_state_dict({"global_step": 13, "stream": position})
    assert (streamed.epoch, streamed.stream) == (3, position)


def test_save_is_atomic_rotates_after_and_waits_for_uploads(tmp_path):
    accelerator = FakeAccelerator()
    (tmp_path / ".tmp-checkpoint-1").mkdir()  # a save that was killed
    waited = []
    state = checkpoint.TrainState(seed=0, steps_per_epoch=10)
    for step in (1, 2, 3):
        state.global_step = step
        path = checkpoint.save(accelerator, str(tmp_path), state, total_limit=2, before_remove=waited.append,
                               layout=PRIOR)
        assert path == str(tmp_path / f"checkpoint-{step}")
        assert checkpoint_folders.read_state(path)["global_step"] == step
    assert accelerator.saved == [str(tmp_path / f".tmp-checkpoint-{s}") for s in (1, 2, 3)]  # written aside first
    assert sorted(os.listdir(tmp_path)) == ["checkpoint-2", "checkpoint-3"]
    assert waited == [str(tmp_path / "checkpoint-1")]  # its upload finished before it was removed


def test_rotation_removes_reference_checkpoints_but_never_an_incomplete_folder(tmp_path):
    fake_reference_checkpoint(tmp_path / "checkpoint-1", "prior")  # resumed from: rotated like ours
    fake_reference_checkpoint(tmp_path / "checkpoint-2", "prior", leave_out=["scheduler.bin"])
    fake_reference_checkpoint(tmp_path / "checkpoint-3", "prior", leave_out=["prior/"])
    state = checkpoint.TrainState(seed=0, steps_per_epoch=10, global_step=3)
    checkpoint.save(FakeAccelerator(), str(tmp_path), state, total_limit=1, layout=PRIOR)
    # The incomplete checkpoint-3 was in the way of the new one: set aside, not deleted; checkpoint-2 left alone.
    assert sorted(os.listdir(tmp_path)) == ["checkpoint-2", "checkpoint-3", "incomplete-checkpoint-3"]
    assert sorted(os.listdir(tmp_path / "incomplete-checkpoint-3")) == ["optimizer.bin", "random_states_0.pkl",
                                                                         "scheduler.bin"]
    assert sorted(os.listdir(tmp_path / "checkpoint-2")) == ["optimizer.bin", "prior", "random_states_0.pkl"]


def test_model_hooks_write_diffusers_folders_and_load_them_back(tmp_path):
    from diffusers import PriorTransformer
    from diffusers.training_utils import EMAModel

    from kandinsky_train.stage import Stage

    torch.manual_seed(0)
    model = PriorTransformer(num_attention_heads=2, attention_head_dim=4, num_layers=1, embedding_dim=8,
                             num_embeddings=4, additional_embeddings=4)
    ema = EMAModel(model.parameters(), model_cls=PriorTransformer, model_config=model.config)
    stage = Stage(name="prior", subfolder="prior", model=model, model_cls=PriorTransformer, make_sample=None,
                  encode=None, loss=None, validate=None, frozen_models=())
    accelerator = FakeAccelerator()
    hooks = model_state.ModelStateHooks(accelerator, stage, ema)
    hooks.register()
    assert accelerator.save_hooks == [hooks.save] and accelerator.load_hooks == [hooks.load]
    weights = [model.state_dict()]
    hooks.save([model], weights, str(tmp_path))
    assert weights == []  # accelerate must not write the model a second time
    assert (tmp_path / "prior" / "config.json").is_file() and (tmp_path / "prior_ema" / "config.json").is_file()
    saved = {k: v.clone() for k, v in model.state_dict().items()}
    saved_params = [p.detach().clone() for p in model.parameters()]  # what the EMA holds: it started from them
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
    ema.shadow_params[0].add_(5.0)
    ema.optimization_step = 99
    models = [model]
    with warnings_seen() as seen:
        hooks.load(models, str(tmp_path))
    assert seen == []  # not EMAModel.from_pretrained's deprecated call, nor the config warning about the EMA's keys
    assert models == []  # handled here, not by accelerate
    assert all(torch.equal(saved[k], v) for k, v in model.state_dict().items())
    assert all(torch.equal(a, b) for a, b in zip(ema.shadow_params, saved_params))
    assert ema.optimization_step == 0 and ema.decay == 0.9999  # the EMA's own settings come back too
    assert PriorTransformer.from_pretrained(tmp_path / "prior").config.num_layers == 1


def test_reference_prior_optimizer_state_loads_onto_the_trained_parameters():
    """The reference prior script gives AdamW every parameter of the prior (clip_mean / clip_std, which get no
    gradient, included); ours only the trained ones: the saved state lands on the same parameters."""
    from diffusers import PriorTransformer

    torch.manual_seed(0)
    model = PriorTransformer(num_attention_heads=2, attention_head_dim=4, num_layers=1, embedding_dim=8,
                             num_embeddings=4, additional_embeddings=4)
    theirs = torch.optim.AdamW(model.parameters(), lr=1e-3)
    out = model(torch.randn(2, 8), timestep=torch.tensor([1, 2]), proj_embedding=torch.randn(2, 8),
                encoder_hidden_states=torch.randn(2, 4, 8)).predicted_image_embedding
    out.pow(2).mean().backward()
    theirs.step()
    model.clip_mean.requires_grad_(False)
    model.clip_std.requires_grad_(False)
    trained = [p for p in model.parameters() if p.requires_grad]
    ours = torch.optim.AdamW(trained, lr=1e-3)
    model_state.accept_whole_model_optimizer_states(ours, model)
    ours.load_state_dict(theirs.state_dict())
    assert len(ours.state) == len(trained) == len(list(model.parameters())) - 2
    for p in trained:
        assert all(torch.equal(ours.state[p][k], theirs.state[p][k]) for k in ("step", "exp_avg", "exp_avg_sq"))
    ours.load_state_dict(ours.state_dict())  # our own state still loads as it is
