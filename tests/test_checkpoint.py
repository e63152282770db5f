"""kandinsky_train.checkpoint in-process: which folders count as checkpoints, atomic save and rotation, the run's
position as one object, and the model hooks that write a checkpoint in diffusers format."""

import json
import os

import pytest
import torch

from fakes import FakeAccelerator
from kandinsky_train import checkpoint
from kandinsky_train.errors import UserError


def make_checkpoint(folder, step, complete=True):
    path = folder / f"checkpoint-{step}"
    path.mkdir(parents=True)
    if complete:
        (path / checkpoint.STATE_FILE).write_text(json.dumps({"global_step": step}))
    return path


def test_latest_ignores_foreign_and_incomplete_folders(tmp_path):
    for name, complete in [("checkpoint-2", True), ("checkpoint-10", True), ("checkpoint-12", False),
                           ("checkpoint-old", True), (".tmp-checkpoint-14", True), ("checkpoint-3-copy", True)]:
        (tmp_path / name).mkdir()
        if complete:
            (tmp_path / name / checkpoint.STATE_FILE).write_text(json.dumps({"global_step": 1}))
    assert [s for s, _ in checkpoint.list_checkpoints(str(tmp_path))] == [2, 10]

    class Args:
        output_dir, resume_from_checkpoint = str(tmp_path), "latest"

    assert checkpoint.resolve_resume(Args).endswith("checkpoint-10")
    Args.resume_from_checkpoint = "checkpoint-12"
    with pytest.raises(UserError, match="does not exist or is incomplete.*checkpoint-2, checkpoint-10"):
        checkpoint.resolve_resume(Args)


def test_train_state_round_trips_and_derives_the_epoch():
    state = checkpoint.TrainState(seed=7, steps_per_epoch=4, global_step=9, epoch=2, skipped_images=["a.png"])
    restored = checkpoint.TrainState(seed=7, steps_per_epoch=4)
    restored.load_state_dict(json.loads(json.dumps(state.state_dict())))
    assert restored.global_step == 9 and restored.epoch == 2  # step 10 is the second step of epoch 2
    assert state.state_dict() == {"seed": 7, "steps_per_epoch": 4, "global_step": 9, "epoch": 2,
                                  "skipped_images": ["a.png"], "held_out": None}


def test_save_is_atomic_rotates_after_and_waits_for_uploads(tmp_path):
    accelerator = FakeAccelerator()
    (tmp_path / ".tmp-checkpoint-1").mkdir()  # a save that was killed
    waited = []
    state = checkpoint.TrainState(seed=0, steps_per_epoch=10)
    for step in (1, 2, 3):
        state.global_step = step
        path = checkpoint.save(accelerator, str(tmp_path), state, total_limit=2, before_remove=waited.append)
        assert path == str(tmp_path / f"checkpoint-{step}")
        assert json.loads((tmp_path / f"checkpoint-{step}" / checkpoint.STATE_FILE).read_text())["global_step"] == step
    assert accelerator.saved == [str(tmp_path / f".tmp-checkpoint-{s}") for s in (1, 2, 3)]  # written aside first
    assert sorted(os.listdir(tmp_path)) == ["checkpoint-2", "checkpoint-3"]
    assert waited == [str(tmp_path / "checkpoint-1")]  # its upload finished before it was removed


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
    hooks = checkpoint.ModelStateHooks(accelerator, stage, ema)
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
    models = [model]
    hooks.load(models, str(tmp_path))
    assert models == []  # handled here, not by accelerate
    assert all(torch.equal(saved[k], v) for k, v in model.state_dict().items())
    assert all(torch.equal(a, b) for a, b in zip(ema.shadow_params, saved_params))
    assert PriorTransformer.from_pretrained(tmp_path / "prior").config.num_layers == 1
