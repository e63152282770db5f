"""Push to the Hub against a local fake Hub (real huggingface_hub client, real HTTP), W&B offline runs, and the
run summary a person reads (issue: Hub push, tracking, LoRA)."""

import json
import os
from pathlib import Path

import pytest

from conftest import DECODER_SCRIPT, PRIOR_SCRIPT, base_args, checkpoints, launch, offline_env
from fake_hub import FakeHub


def hub_env(hub, tmp_path):
    # huggingface_hub must talk to the fake: online, no Xet protocol, a token, a private HF_HOME.
    return offline_env(HF_ENDPOINT=hub.endpoint, HF_HUB_OFFLINE="0", HF_HUB_DISABLE_XET="1", HF_TOKEN="hf_fake",
                       HF_HOME=str(tmp_path / "hf_home"))


@pytest.mark.parametrize("script,stage", [(PRIOR_SCRIPT, "prior"), (DECODER_SCRIPT, "unet")])
def test_push_to_hub_uploads_the_pipeline_and_a_card_but_no_checkpoints_or_logs(script, stage, tiny, tmp_path):
    from huggingface_hub import ModelCard

    output = tmp_path / "out"
    with FakeHub() as hub:
        launch(script, base_args(tiny, output, steps=2, **{
            "--checkpointing_steps": 1, "--push_to_hub": True, "--hub_model_id": "tester/kandi-test",
            "--hub_push_checkpoints": True, "--report_to": "tensorboard",
            "--validation_prompts": ["a red circle"]}), env=hub_env(hub, tmp_path))
        files = hub.repos["tester/kandi-test"]["files"]
    local = {p.relative_to(output).as_posix(): p.read_bytes() for p in output.rglob("*") if p.is_file()}
    expected = {k: v for k, v in local.items()
                if not k.startswith(("checkpoint-", "logs/", "validation/", "embedding_cache/"))}
    final = {k: v for k, v in files.items() if not k.startswith("checkpoint-")}
    assert set(final) == set(expected)
    assert all(final[k] == expected[k] for k in expected), "a file changed on the way"
    assert any(k.startswith(f"{stage}/") and k.endswith(".safetensors") for k in final)
    assert not any(k.startswith(("logs/", "validation/")) for k in files)
    # --hub_push_checkpoints: only the model weights of each checkpoint, never optimizer or RNG state
    pushed = {k for k in files if k.startswith("checkpoint-")}
    assert {k.split("/")[0] for k in pushed} == {"checkpoint-1", "checkpoint-2"}
    assert all(k.split("/")[1] == stage for k in pushed), pushed
    card = ModelCard.load(output / "README.md")
    assert {"kandinsky", "text-to-image", "diffusers", "diffusers-training"} <= set(card.data.tags)
    assert card.data.license == "apache-2.0"
    assert card.data.base_model is None  # a local base model is named in the text, not as a Hub id
    assert not card.data.datasets  # trained from a local folder: no `datasets: [None]`
    assert "val_imgs_grid.png" in card.text and "from_pretrained" in card.text
    assert "wandb" not in card.text.lower()


def test_model_card_without_validation_prompts_or_wandb(tiny, tmp_path):
    from huggingface_hub import ModelCard

    launch(PRIOR_SCRIPT, base_args(tiny, tmp_path, steps=1))
    card = ModelCard.load(tmp_path / "README.md")
    assert "val_imgs_grid" not in card.text and not (tmp_path / "val_imgs_grid.png").exists()


def test_wandb_offline_run_gets_metrics_config_and_images(tiny, tmp_path):
    pytest.importorskip("wandb")
    env = offline_env(WANDB_MODE="offline", WANDB_DIR=str(tmp_path), WANDB_SILENT="true")
    proc = launch(DECODER_SCRIPT, base_args(tiny, tmp_path / "out", steps=2, **{
        "--report_to": "wandb", "--validation_prompts": ["a red circle"], "--tracker_project_name": "k22-test"}),
        env=env)
    runs = list((tmp_path / "wandb").glob("offline-run-*"))
    assert len(runs) == 1, proc.stderr[-2000:]
    files = runs[0] / "files"
    summary = json.loads((files / "wandb-summary.json").read_text()) if (files / "wandb-summary.json").exists() \
        else {}
    config = (files / "config.yaml").read_text() if (files / "config.yaml").exists() else ""
    data = (runs[0] / f"run-{runs[0].name.split('-')[-1]}.wandb").read_bytes()
    assert b"train_loss" in data and b"samples_per_second" in data and b"grad_norm" in data
    assert b"validation" in data and b"image-file" in data or b"validation" in data and b".png" in data
    assert b"learning_rate" in data  # the run configuration (every argument) is logged
    assert summary or config or data


def test_start_line_summarises_the_run(tiny, tmp_path):
    proc = launch(DECODER_SCRIPT, base_args(tiny, tmp_path, steps=1, **{"--gradient_accumulation_steps": 2}))
    text = proc.stdout + proc.stderr
    assert "8 examples" in text and "1 optimizer steps" in text and "accumulation = 4" in text
    assert "trainable parameters" in text and "precision no" in text


def test_model_card_fields_for_hub_models_and_datasets(tmp_path):
    from huggingface_hub import ModelCard

    import train_text_to_image_prior as prior

    args = prior.parse_args(["--dataset_name", "lambdalabs/naruto-blip-captions", "--output_dir", str(tmp_path)])
    card_path = tmp_path / "README.md"
    import train_common

    train_common.write_model_card(args, "Kandinsky 2.2 prior", "kandinsky-community/kandinsky-2-2-prior",
                                  "print('hi')", images=None, wandb_url="https://wandb.ai/me/run/1")
    card = ModelCard.load(card_path)
    assert card.data.base_model == "kandinsky-community/kandinsky-2-2-prior"
    assert card.data.datasets == ["lambdalabs/naruto-blip-captions"]
    assert "https://wandb.ai/me/run/1" in card.text and "print('hi')" in card.text
