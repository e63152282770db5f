"""The options a real run combines: --use_ema, --snr_gamma, gradient accumulation, validation images in
TensorBoard, --max_train_samples and --dataset_name on a local dataset."""

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import DECODER_SCRIPT, PRIOR_SCRIPT, base_args, checkpoints, launch


def tensorboard_events(output_dir):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    files = sorted(Path(output_dir, "logs").rglob("events.out.tfevents.*"))
    assert files, "no TensorBoard event file"
    accumulators = []
    for f in files:
        acc = EventAccumulator(str(f), size_guidance={"images": 0, "scalars": 0})
        acc.Reload()
        accumulators.append(acc)
    scalars = {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for acc in accumulators
               for tag in acc.Tags()["scalars"]}
    images = {tag: [e.step for e in acc.Images(tag)] for acc in accumulators for tag in acc.Tags()["images"]}
    return scalars, images


@pytest.mark.parametrize("script,sub", [(PRIOR_SCRIPT, "prior"), (DECODER_SCRIPT, "unet")])
def test_ema_snr_accumulation_validation_and_local_dataset(script, sub, tiny, tmp_path):
    args = base_args(tiny, tmp_path, steps=5, **{
        "--train_data_dir": None, "--dataset_name": tiny["parquet"], "--image_column": "img",
        "--max_train_samples": 6, "--use_ema": True, "--snr_gamma": 5.0, "--gradient_accumulation_steps": 2,
        "--validation_prompts": ["a red circle", "a blue square"], "--validation_epochs": 2,
        "--checkpointing_steps": 5, "--report_to": "tensorboard"})
    if script == PRIOR_SCRIPT:
        args += ["--caption_column", "caption"]
    proc = launch(script, args)
    assert "6 examples" in proc.stdout + proc.stderr  # --max_train_samples of 8
    # 6 samples / batch 2 = 3 micro-batches, accumulation 2 -> 2 optimizer steps per epoch: 5 steps = 3 epochs
    scalars, images = tensorboard_events(tmp_path)
    assert [s for s, _ in scalars["train_loss"]] == [1, 2, 3, 4, 5]
    assert {"lr", "grad_norm", "samples_per_second"} <= set(scalars)
    assert len(images) == 2, images  # one tag per prompt
    # --validation_epochs 2: after epoch 0 (step 2), not after epoch 1 (step 4); the final render ends epoch 2 (step 5)
    assert all(steps == [2, 5] for steps in images.values()), images
    assert sorted(p.name for p in (tmp_path / "validation").glob("*.png")) == [
        f"step-{step:06d}-{i:02d}.png" for step in (2, 5) for i in range(2)]
    assert (tmp_path / "val_imgs_grid.png").is_file()
    # EMA weights are saved in the checkpoint and are what the final folder holds
    assert checkpoints(tmp_path) == ["checkpoint-5"]
    ema = load_file(next((tmp_path / "checkpoint-5" / f"{sub}_ema").glob("*.safetensors")))
    raw = load_file(next((tmp_path / "checkpoint-5" / sub).glob("*.safetensors")))
    final = load_file(next((tmp_path / sub).glob("*.safetensors")))
    assert all((final[k] == ema[k]).all() for k in ema)
    assert any((raw[k] != ema[k]).any() for k in ema)


def test_prior_gradient_checkpointing_and_torch_compile_give_the_same_training(tiny, tmp_path):
    """The reference prior script has no gradient checkpointing; ours recomputes each block and must not change
    the result. --torch_compile fuses kernels (float rounding may differ) and still checkpoints in diffusers
    format."""
    runs = {}
    for name, extra in [("plain", {}), ("checkpointed", {"--gradient_checkpointing": True}),
                        ("compiled", {"--torch_compile": True, "--checkpointing_steps": 3})]:
        launch(PRIOR_SCRIPT, base_args(tiny, tmp_path / name, steps=3, **extra))
        runs[name] = load_file(next((tmp_path / name / "prior").glob("*.safetensors")))
    assert all((runs["plain"][k] == runs["checkpointed"][k]).all() for k in runs["plain"])
    # Softmax ignores a bias added to every key, so to_k.bias gets a gradient of pure rounding noise, which Adam
    # scales up to full steps: compiled kernels round differently there. Every other weight must agree.
    compared = [k for k in runs["plain"] if not k.endswith("to_k.bias")]
    assert len(compared) > 20
    assert all(torch.allclose(runs["plain"][k], runs["compiled"][k], atol=1e-5) for k in compared)
    start = load_file(next((tiny["prior"] / "prior").glob("*.safetensors")))
    assert any(not torch.equal(start[k], runs["compiled"][k]) for k in start)
    from diffusers import PriorTransformer

    PriorTransformer.from_pretrained(tmp_path / "compiled" / "checkpoint-3", subfolder="prior")


def test_offloaded_foreach_ema_matches_the_default_ema(tiny, tmp_path):
    runs = {}
    for name, extra in [("default", {}), ("offload", {"--offload_ema": True, "--foreach_ema": True})]:
        launch(DECODER_SCRIPT, base_args(tiny, tmp_path / name, steps=3, **{"--use_ema": True, **extra}))
        runs[name] = load_file(next((tmp_path / name / "unet").glob("*.safetensors")))
    assert all(torch.allclose(runs["default"][k], runs["offload"][k], atol=1e-7) for k in runs["default"])


@pytest.mark.parametrize("script,sub,frozen", [(PRIOR_SCRIPT, "prior", "text_encoder"),
                                               (DECODER_SCRIPT, "unet", "movq")])
def test_bf16_mixed_precision_with_cache_and_validation(script, sub, frozen, tiny, tmp_path):
    """Frozen models run in bf16, the trained model keeps fp32 master weights, and the saved pipeline holds the
    frozen models as they were stored (fp32), not in the training's half precision."""
    launcher = ["--num_processes", "1", "--num_machines", "1", "--mixed_precision", "bf16", "--dynamo_backend", "no"]
    launch(script, base_args(tiny, tmp_path, steps=2, **{
        "--mixed_precision": "bf16", "--cache_embeddings": True, "--validation_prompts": ["a cat"],
        "--snr_gamma": 5.0, "--conditioning_dropout_prob": 0.5}), launcher=launcher)
    trained = load_file(next((tmp_path / sub).glob("*.safetensors")))
    stored = load_file(next((tmp_path / frozen).glob("*.safetensors")))
    assert {t.dtype for t in trained.values()} == {torch.float32}
    assert all(torch.isfinite(t).all() for t in trained.values())
    start = load_file(next((tiny["prior" if sub == "prior" else "decoder"] / sub).glob("*.safetensors")))
    assert any(not torch.equal(start[k], trained[k]) for k in start), "bf16 training changed no weight"
    assert {t.dtype for t in stored.values()} == {torch.float32}
    assert len(list((tmp_path / "validation").glob("*.png"))) == 1
