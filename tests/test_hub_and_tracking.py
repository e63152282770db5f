"""Push to the Hub against a local fake Hub (real huggingface_hub client, real HTTP), W&B offline runs, and the
run summary a person reads (issue: Hub push, tracking, LoRA)."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import DECODER_SCRIPT, PRIOR_SCRIPT, REPO, base_args, checkpoints, launch, offline_env, read_state
from fake_hub import FakeHub


def hub_env(hub, tmp_path):
    # huggingface_hub must talk to the fake: online, no Xet protocol, a token, a private HF_HOME.
    return offline_env(HF_ENDPOINT=hub.endpoint, HF_HUB_OFFLINE="0", HF_HUB_DISABLE_XET="1", HF_TOKEN="hf_fake",
                       HF_HOME=str(tmp_path / "hf_home"))


@pytest.mark.parametrize("script,stage", [(PRIOR_SCRIPT, "prior"), (DECODER_SCRIPT, "unet")])
def test_push_to_hub_uploads_the_pipeline_and_a_card_but_no_checkpoints_or_logs(script, stage, tiny, tmp_path):
    from huggingface_hub import ModelCard

    output = tmp_path / "out"
    # A slow Hub: checkpoint-1 is still uploading when rotation wants it gone, and must arrive all the same.
    with FakeHub(preupload_delay=1.0) as hub:
        proc = launch(script, base_args(tiny, output, steps=2, **{
            "--checkpointing_steps": 1, "--checkpoints_total_limit": 1, "--push_to_hub": True,
            "--hub_model_id": "tester/kandi-test", "--hub_push_checkpoints": True, "--report_to": "tensorboard",
            "--validation_prompts": ["a red circle"]}), env=hub_env(hub, tmp_path))
        files = hub.repos["tester/kandi-test"]["files"]
    assert "HTTP Request" not in proc.stdout + proc.stderr  # Hub requests are not logged one by one
    assert checkpoints(output) == ["checkpoint-2"]
    local = {p.relative_to(output).as_posix(): p.read_bytes() for p in output.rglob("*") if p.is_file()}
    expected = {k: v for k, v in local.items()
                if not k.startswith(("checkpoint-", "logs/", "validation/", "embedding_cache/", ".final-save"))}
    final = {k: v for k, v in files.items() if not k.startswith("checkpoint-")}
    assert set(final) == set(expected)
    assert all(final[k] == expected[k] for k in expected), "a file changed on the way"
    assert any(k.startswith(f"{stage}/") and k.endswith(".safetensors") for k in final)
    assert not any(k.startswith(("logs/", "validation/")) for k in files)
    # --hub_push_checkpoints: only the model weights of each checkpoint, never optimizer or RNG state
    pushed = {k for k in files if k.startswith("checkpoint-")}
    assert {k.split("/")[0] for k in pushed} == {"checkpoint-1", "checkpoint-2"}
    assert {k.split("/", 1)[1] for k in pushed if k.startswith("checkpoint-1/")} == \
        {k.split("/", 1)[1] for k in pushed if k.startswith("checkpoint-2/")}  # complete, not cut by rotation
    assert all(k.split("/")[1] == stage for k in pushed), pushed
    card = ModelCard.load(output / "README.md")
    assert {"kandinsky", "text-to-image", "diffusers", "diffusers-training"} <= set(card.data.tags)
    assert card.data.license == "apache-2.0"
    assert card.data.base_model is None  # a local base model is named in the text, not as a Hub id
    assert not card.data.datasets  # trained from a local folder: no `datasets: [None]`
    assert "val_imgs_grid.png" in card.text and "from_pretrained" in card.text
    assert "wandb" not in card.text.lower()
    assert 'from_pretrained("tester/kandi-test"' in card.text  # the pushed repository, not the local folder
    assert str(tiny["prior"].parent) not in card.content and str(tmp_path) not in card.content  # no local paths


def test_push_to_hub_without_a_login_fails_before_training(tiny, tmp_path):
    with FakeHub() as hub:
        env = hub_env(hub, tmp_path)
        del env["HF_TOKEN"]  # not logged in: HF_HOME is empty too
        proc = subprocess.run([sys.executable, DECODER_SCRIPT, *map(str, base_args(tiny, tmp_path / "out", **{
            "--push_to_hub": True, "--hub_model_id": "tester/kandi-test"}))], cwd=REPO, env=env,
            capture_output=True, text=True, timeout=900)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert "--push_to_hub: could not create or reach the Hub repository 'tester/kandi-test'" in proc.stderr
    assert "hf auth login" in proc.stderr
    assert not (tmp_path / "out").exists()  # stopped before anything was written


def test_failed_final_upload_keeps_the_output_and_says_how_to_retry(tiny, tmp_path):
    with FakeHub(fail_commits=True) as hub:
        proc = launch(PRIOR_SCRIPT, base_args(tiny, tmp_path / "out", steps=1, **{
            "--push_to_hub": True, "--hub_model_id": "tester/kandi-test"}), env=hub_env(hub, tmp_path), check=False)
    assert proc.returncode != 0
    assert "The upload to the Hub repository 'tester/kandi-test' failed" in proc.stderr, proc.stderr[-3000:]
    assert f"upload it later with: hf upload tester/kandi-test {tmp_path / 'out'} ." in proc.stderr
    assert "Traceback" not in proc.stderr.split("error: The upload")[0]  # (accelerate's launcher adds its own after)
    from diffusers import KandinskyV22PriorPipeline

    KandinskyV22PriorPipeline.from_pretrained(tmp_path / "out")  # the output is complete


def test_model_card_without_validation_prompts_or_wandb(tiny, tmp_path):
    from huggingface_hub import ModelCard

    launch(PRIOR_SCRIPT, base_args(tiny, tmp_path, steps=1))
    card = ModelCard.load(tmp_path / "README.md")
    assert "val_imgs_grid" not in card.text and not (tmp_path / "val_imgs_grid.png").exists()


def read_wandb_run(path):
    """{step: {key: value}} of the history and the run's config, read from an offline run's .wandb file: a LevelDB
    log (32 KiB blocks of records with a 7-byte header: checksum, length, type) of W&B protobuf records."""
    from wandb.proto import wandb_internal_pb2

    data = Path(path).read_bytes()
    assert data[:4] == b":W&B"
    position, block, payload, history, config = 7, 32768, b"", {}, {}
    while position + 7 <= len(data):
        if block - position % block < 7:  # the tail of a block too short for a header is padding
            position += block - position % block
            continue
        length, kind = int.from_bytes(data[position + 4:position + 6], "little"), data[position + 6]
        payload += data[position + 7:position + 7 + length]
        position += 7 + length
        if kind not in (1, 4):  # FIRST / MIDDLE fragments: the record goes on in the next one
            continue
        record = wandb_internal_pb2.Record()
        record.ParseFromString(payload)
        payload = b""
        if record.WhichOneof("record_type") == "history":
            items = {item.key or ".".join(item.nested_key): json.loads(item.value_json) for item in record.history.item}
            history.setdefault(items["_step"], {}).update(items)
        elif record.WhichOneof("record_type") in ("run", "config"):  # the config comes with the run or after it
            updates = record.run.config.update if record.HasField("run") else record.config.update
            config.update({item.key: json.loads(item.value_json) for item in updates})
    return history, config


def test_wandb_offline_run_gets_metrics_config_and_images(tiny, tmp_path):
    pytest.importorskip("wandb")
    env = offline_env(WANDB_MODE="offline", WANDB_DIR=str(tmp_path), WANDB_SILENT="true")
    proc = launch(DECODER_SCRIPT, base_args(tiny, tmp_path / "out", steps=2, **{
        "--report_to": "wandb", "--validation_prompts": ["a red circle"], "--tracker_project_name": "k22-test"}),
        env=env)
    runs = list((tmp_path / "wandb").glob("offline-run-*"))
    assert len(runs) == 1, proc.stderr[-2000:]
    history, config = read_wandb_run(runs[0] / f"run-{runs[0].name.split('-')[-1]}.wandb")
    assert sorted(history) == [1, 2]
    for step in (1, 2):
        assert {"train_loss", "lr", "grad_norm", "samples_per_second"} <= set(history[step])
        assert history[step]["lr"] == pytest.approx(1e-3)
    images = {key.split(".", 1)[1]: value for key, value in history[2].items() if key.startswith("validation.")}
    assert images["_type"] == "images/separated" and images["count"] == 1  # nested keys come back dotted
    assert all((runs[0] / "files" / name).is_file() for name in images["filenames"])  # the PNG itself was saved
    # the run configuration: every argument, never the Hub token
    assert config["learning_rate"] == 1e-3 and config["resolution"] == 64 and "hub_token" not in config


def test_start_line_summarises_a_run_with_the_default_seed_and_schedule(tiny, tmp_path):
    """No --seed, --learning_rate, --lr_scheduler or --lr_warmup_steps: the defaults users start from (constant
    1e-4; the constant schedule has no warm-up, as in the reference scripts) and a drawn seed, recorded."""
    from test_robustness import lr_by_step

    proc = launch(DECODER_SCRIPT, base_args(tiny, tmp_path, steps=1, **{
        "--gradient_accumulation_steps": 2, "--seed": None, "--learning_rate": None, "--lr_warmup_steps": None,
        "--report_to": None, "--checkpointing_steps": 1}))
    text = proc.stdout + proc.stderr
    assert "8 examples" in text and "1 optimizer steps" in text and "accumulation = 4" in text
    assert "trainable parameters" in text and "precision no" in text
    assert f"seed {read_state(tmp_path / 'checkpoint-1')['seed']} *****" in text
    assert lr_by_step(tmp_path) == {1: pytest.approx(1e-4)}


def test_model_card_fields_for_hub_models_and_datasets(tmp_path):
    from huggingface_hub import ModelCard

    import train_text_to_image_prior as prior

    args = prior.parse_args(["--dataset_name", "lambdalabs/naruto-blip-captions", "--output_dir", str(tmp_path)])
    card_path = tmp_path / "README.md"
    from kandinsky_train.model_card import write_model_card
    from kandinsky_train.tracking import RunSummary

    summary = RunSummary(steps=1500, epochs=12.5, samples=6000, seconds=3725, counted_from_step=0, final_loss=0.0712,
                         loss_steps=10, processes=2, device="NVIDIA H100 80GB HBM3", precision="bf16")
    write_model_card(args, "Kandinsky 2.2 prior", "kandinsky-community/kandinsky-2-2-prior",
                     "print('hi')", images=None, summary=summary, wandb_url="https://wandb.ai/me/run/1")
    card = ModelCard.load(card_path)
    assert card.data.base_model == "kandinsky-community/kandinsky-2-2-prior"
    assert card.data.datasets == ["lambdalabs/naruto-blip-captions"]
    assert "https://wandb.ai/me/run/1" in card.text and "print('hi')" in card.text
    for row in ("| Optimizer steps | 1500 |", "| Epochs | 12.5 |", "| Samples seen | 6,000 |",
                "| Final training loss | 0.0712 (mean of the last 10 steps) |", "| Training time | 1 h 02 min |",
                "| Hardware | 2 x NVIDIA H100 80GB HBM3 |", "| Precision | bf16 |",
                "| Batch size | 2 (1 per device x 2 process(es) x 1 accumulation) |"):
        assert row in card.text, row


def test_a_signal_during_the_final_upload_gives_the_upload_command_and_resume_uploads_without_training(tiny,
                                                                                                     tmp_path):
    """Stopped while the complete final folder uploads: the message says only the upload is missing and gives the
    command; `--resume_from_checkpoint latest` (no checkpoint exists) then uploads that folder and trains nothing."""
    output = tmp_path / "out"
    args = base_args(tiny, output, steps=1, **{"--push_to_hub": True, "--hub_model_id": "tester/kandi-test"})
    with FakeHub() as hub:
        stopped = launch(PRIOR_SCRIPT, args, env={**hub_env(hub, tmp_path), "KANDINSKY_TRAIN_FAULT": "upload:TERM"},
                         check=False)
        assert stopped.returncode != 0 and "README.md" not in hub.repos["tester/kandi-test"]["files"]
        weights = {p: p.stat().st_mtime_ns for p in output.rglob("*.safetensors")}
        resumed = launch(PRIOR_SCRIPT, args + ["--resume_from_checkpoint", "latest"], env=hub_env(hub, tmp_path))
        files = hub.repos["tester/kandi-test"]["files"]
    assert (f"stopped: received SIGTERM during the upload to the Hub. The fine-tuned Kandinsky 2.2 prior is saved, "
            f"complete, in {output}; only its upload to the Hub is missing. Upload it with: hf upload "
            f"tester/kandi-test {output} . --exclude \"checkpoint-*\"") in stopped.stderr, stopped.stderr[-3000:]
    assert "(or run the same command with --resume_from_checkpoint latest: it uploads it and trains nothing)." \
        in stopped.stderr
    assert "only its upload to the Hub is missing: uploading it (nothing to train)" in resumed.stdout
    assert "Training the prior" not in resumed.stdout and "Steps" not in resumed.stderr
    assert {p: p.stat().st_mtime_ns for p in output.rglob("*.safetensors")} == weights  # not saved again
    assert checkpoints(output) == []
    local = {p.relative_to(output).as_posix() for p in output.rglob("*") if p.is_file()}
    assert set(files) == local - {".final-save.json"} and "README.md" in files and "prior/config.json" in files
