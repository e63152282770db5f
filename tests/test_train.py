"""Both scripts end to end on tiny models (issue: the training-script pair): checkpoints, final pipelines that
load and generate, resume (from a checkpoint of diffusers' reference script too), rotation, EMA / Min-SNR /
accumulation / validation / --dataset_name, the README's recipe for the pair, and truthful model cards."""

import json
import re
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import (DECODER_SCRIPT, PRIOR_SCRIPT, REPO, base_args, checkpoints, launch, read_state,
                      warnings_seen)

SCRIPTS = {"prior": PRIOR_SCRIPT, "decoder": DECODER_SCRIPT}
SUBFOLDER = {"prior": "prior", "decoder": "unet"}


def weights(folder):
    files = sorted(Path(folder).glob("*.safetensors"))
    assert files, f"no weights in {folder}"
    return {k: v for f in files for k, v in load_file(f).items()}


def max_change(a, b):
    return max((a[k].float() - b[k].float()).abs().max().item() for k in a)


@pytest.fixture(scope="module")
def trained(tiny, tmp_path_factory):
    """Each stage trained 4 steps with a checkpoint every 2 (shared by the tests below)."""
    out = {}
    for stage, script in SCRIPTS.items():
        output = tmp_path_factory.mktemp(f"{stage}-run")
        launch(script, base_args(tiny, output, steps=4, **{"--checkpointing_steps": 2, "--report_to": "tensorboard"}))
        out[stage] = output
    return out


@pytest.mark.parametrize("stage", ["prior", "decoder"])
def test_four_steps_write_two_checkpoints_and_a_loadable_pipeline(stage, trained, tiny):
    from diffusers import KandinskyV22Pipeline, KandinskyV22PriorPipeline

    output = trained[stage]
    assert checkpoints(output) == ["checkpoint-2", "checkpoint-4"]
    assert read_state(output / "checkpoint-4")["global_step"] == 4
    sub = SUBFOLDER[stage]
    start = weights(tiny[stage] / sub)
    assert max_change(weights(output / sub), start) > 0, "the trained weights did not change"
    assert max_change(weights(output / "checkpoint-4" / sub), weights(output / sub)) == 0
    generator = torch.Generator().manual_seed(0)
    if stage == "prior":
        pipe = KandinskyV22PriorPipeline.from_pretrained(output)
        embeds = pipe("a red circle", num_inference_steps=2, generator=generator).image_embeds
        assert embeds.shape == (1, 32) and torch.isfinite(embeds).all()
        # frozen parts are saved unchanged, in their stored precision
        assert max_change(weights(output / "text_encoder"), weights(tiny["prior"] / "text_encoder")) == 0
    else:
        pipe = KandinskyV22Pipeline.from_pretrained(output)
        image = pipe(image_embeds=torch.randn(1, 32), negative_image_embeds=torch.zeros(1, 32), height=64, width=64,
                     num_inference_steps=2, generator=generator).images[0]
        assert image.size == (64, 64)
    assert (output / "README.md").is_file()


def readme_recipe():
    """The README's inference code for the fine-tuned pair (its first Python block after "**Inference**")."""
    readme = (REPO / "README.md").read_text()
    return re.search(r"```python\n(.*?)```", readme[readme.index("**Inference**"):], re.S).group(1)


def test_readme_recipe_generates_with_the_fine_tuned_pair_without_a_warning(trained):
    """The README's recipe as a user runs it, on the CPU, at a tiny size, with the tiny outputs for the models."""
    from diffusers import AutoPipelineForText2Image

    code = readme_recipe()
    for name, stage in (("kandi2-prior-naruto-model", "prior"), ("kandi2-decoder-naruto-model", "decoder")):
        assert f'"{name}"' in code
        code = code.replace(f'"{name}"', f'"{trained[stage]}"')
    code = re.sub(r"num_inference_steps=\d+", "num_inference_steps=2", code.replace('"cuda"', '"cpu"').replace(
        "torch.float16", "torch.float32").replace("768", "64"))
    scope = {}
    with warnings_seen() as seen:
        exec(compile(code, "README.md", "exec"), scope)
    assert seen == []  # nothing printed (torchvision serves transformers' CLIP image processor: no fallback warning)
    assert scope["image"].size == (64, 64)
    assert max_change(weights(trained["prior"] / "prior"), scope["prior"].prior.state_dict()) == 0  # the fine-tuned
    # The decoder was trained with a local prior folder, which its card describes but no longer names: a path leaks
    # on the Hub and loads nowhere else (the folder may move, or be uploaded later with `hf upload`). So the folder
    # alone is no text-to-image pipeline for AutoPipelineForText2Image (it needs the prior, as the README's recipe
    # gives it); with a prior from the Hub the card names it (test_hub_ids_load_offline_from_the_cache).
    with pytest.raises(ValueError, match="prior_prior"):
        AutoPipelineForText2Image.from_pretrained(trained["decoder"])


def test_model_card_gives_the_runs_own_figures_and_no_local_path(trained, tiny):
    """4 steps of batch 2 over 8 images: one epoch, 8 samples; the defaults of --num_train_epochs (100) and
    --mixed_precision (None) are not what happened."""
    from huggingface_hub import ModelCard

    card = ModelCard.load(trained["decoder"] / "README.md")
    rows = dict(re.findall(r"^\| ([^|]+) \| ([^|]+) \|$", card.text, re.M))
    assert rows["Optimizer steps"] == "4" and rows["Epochs"] == "1" and rows["Samples seen"] == "8"
    from kandinsky_train.tracking import read_scalars

    logged = [value for _, value in read_scalars(trained["decoder"] / "logs")["train_loss"].values()]
    assert len(logged) == 4 and rows["Final training loss"] == f"{sum(logged) / 4:.4g} (mean of the last 4 steps)"
    assert re.fullmatch(r"0 min \d\d s", rows["Training time"])
    assert rows["Hardware"] == "1 x CPU" and rows["Precision"] == "fp32"
    assert "prior" not in card.data.to_dict()  # a local prior: described, not named
    assert "local model folder `prior`" in card.text
    assert str(tiny["prior"].parent) not in card.content  # no local path anywhere in what would be pushed
    # nor the output folder's own: uploaded later by hand, the card's code would load a path of this machine
    name = trained["decoder"].name
    assert str(trained["decoder"]) not in card.content and f'from_pretrained("path/to/{name}"' in card.text
    assert f"The code below loads this folder from `path/to/{name}`: give it where the folder is" in card.text


def test_a_streamed_card_counts_the_passes_made_and_a_constant_schedule_has_no_warm_up(tiny, tmp_path):
    """8 pictures in 2 parquet shards at batch 2: 4 steps a pass, so 10 steps are 2.5 passes (not the 3 begun);
    diffusers' "constant" schedule ignores --lr_warmup_steps, and so does the card."""
    import tiny_kandinsky
    from huggingface_hub import ModelCard

    shards = tiny_kandinsky.build_parquet_shards(tmp_path / "shards", sizes=(4, 4))
    out = tmp_path / "out"
    launch(PRIOR_SCRIPT, base_args(tiny, out, steps=10, **{"--train_data_dir": None, "--dataset_name": shards,
                                                          "--streaming": True, "--lr_warmup_steps": 500}))
    rows = dict(re.findall(r"^\| ([^|]+) \| ([^|]+) \|$", ModelCard.load(out / "README.md").text, re.M))
    assert rows["Optimizer steps"] == "10" and rows["Samples seen"] == "20"
    assert rows["Epochs"] == "2.5" and rows["LR schedule"] == "constant"


def test_a_checkpoint_of_the_reference_script_resumes_exactly_and_is_rotated(trained, tiny, tmp_path):
    """diffusers' reference decoder script writes what ours writes, without training_state.json: here our own
    checkpoint-2 with that file deleted is exactly the reference layout (accelerate's save_state with unet/ saved
    by save_pretrained). Resumed by `latest`, it must continue exactly as the uninterrupted run did."""
    shutil.copytree(trained["decoder"] / "checkpoint-2", tmp_path / "checkpoint-2")
    (tmp_path / "checkpoint-2" / "training_state.json").unlink()
    (tmp_path / "checkpoint-1" / "unet").mkdir(parents=True)  # a half-written save of that script: left alone
    proc = launch(DECODER_SCRIPT, base_args(tiny, tmp_path, steps=4, **{
        "--checkpointing_steps": 2, "--checkpoints_total_limit": 1, "--resume_from_checkpoint": "latest"}))
    text = proc.stdout + proc.stderr
    assert "checkpoint-2 has no training_state.json" in text and "run goes on at step 2" in text
    assert "Where it was in the data was not recorded" in text
    # checkpoint-2 was rotated away like one of ours; the incomplete checkpoint-1 was not touched
    assert checkpoints(tmp_path) == ["checkpoint-1", "checkpoint-4"] and list((tmp_path / "checkpoint-1").iterdir())
    from test_robustness import assert_same_state, state_of

    whole = state_of(trained["decoder"] / "checkpoint-4", "unet")
    assert_same_state(state_of(tmp_path / "checkpoint-4", "unet"), whole, ema=False)
    assert read_state(tmp_path / "checkpoint-4")["counted_from_step"] == 2


@pytest.mark.parametrize("stage", ["prior", "decoder"])
def test_resume_latest_after_losing_a_checkpoint(stage, tiny, tmp_path):
    import shutil

    from huggingface_hub import ModelCard

    # a command that always carries --resume_from_checkpoint latest starts fresh the first time
    first = launch(SCRIPTS[stage], base_args(tiny, tmp_path, steps=4, **{"--checkpointing_steps": 2,
                                                                          "--resume_from_checkpoint": "latest"}))
    assert f"No complete checkpoint in '{tmp_path}'; starting a new training run." in first.stderr
    assert "Resuming from" not in first.stdout + first.stderr and checkpoints(tmp_path) == ["checkpoint-2",
                                                                                            "checkpoint-4"]
    shutil.rmtree(tmp_path / "checkpoint-2")
    # two hours of training recorded before the stop: the model card sums the sessions' time
    recorded = read_state(tmp_path / "checkpoint-4")
    (tmp_path / "checkpoint-4" / "training_state.json").write_text(json.dumps({**recorded, "train_seconds": 7200}))
    launch(SCRIPTS[stage], base_args(tiny, tmp_path, steps=6, **{"--checkpointing_steps": 1,
                                                                  "--resume_from_checkpoint": "latest"}))
    assert checkpoints(tmp_path) == ["checkpoint-4", "checkpoint-5", "checkpoint-6"]
    rows = dict(re.findall(r"^\| ([^|]+) \| ([^|]+) \|$", ModelCard.load(tmp_path / "README.md").text, re.M))
    assert rows["Optimizer steps"] == "6" and rows["Samples seen"] == str(recorded["samples_seen"] + 4)
    assert re.fullmatch(r"2 h 0[01] min", rows["Training time"]), rows["Training time"]
    model_cls = "PriorTransformer" if stage == "prior" else "UNet2DConditionModel"
    import diffusers

    getattr(diffusers, model_cls).from_pretrained(tmp_path / "checkpoint-4", subfolder=SUBFOLDER[stage])


def test_checkpoints_total_limit_keeps_the_newest_and_the_console_keeps_the_bar_on_one_line(tiny, tmp_path):
    """Log records and printed lines go through the progress bar: each starts a line of its own, never the tail of
    `Steps: 67%|...`. A terminal merges stdout and stderr in whatever order they reach it, and accelerate's launcher
    (1.16 on) relays stderr through a pipe of its own: so while the bar shows (on stderr), every line must be
    written to stderr too, between the bar's clearing and its redrawing."""
    proc = launch(DECODER_SCRIPT, base_args(tiny, tmp_path, steps=6, **{"--checkpointing_steps": 1,
                                                                         "--checkpoints_total_limit": 2}))
    assert checkpoints(tmp_path) == ["checkpoint-5", "checkpoint-6"]
    assert not re.search(r"Saved \S*checkpoint-|Removing old checkpoint", proc.stdout)
    shown = [line.split("\r")[-1] for line in proc.stderr.split("\n")]  # what a terminal leaves of each line
    removals = [line for line in shown if "Removing old checkpoint" in line]
    saves = [line for line in shown if "Saved " in line and "checkpoint-" in line]
    assert len(removals) == 4 and len(saves) == 6
    assert all(re.match(r"\d\d:\d\d:\d\d - INFO - kandinsky_train.checkpoint - Removing", line) for line in removals)
    assert all(line.startswith("Saved ") for line in saves)


def hub_cache(tiny, root):
    """The tiny repos laid out as huggingface_hub caches Hub downloads, under the real Kandinsky 2.2 ids."""
    import shutil

    for repo, stage in [("kandinsky-community/kandinsky-2-2-prior", "prior"),
                        ("kandinsky-community/kandinsky-2-2-decoder", "decoder")]:
        folder = root / f"models--{repo.replace('/', '--')}"
        revision = "0" * 40
        shutil.copytree(tiny[stage], folder / "snapshots" / revision)
        (folder / "refs").mkdir()
        (folder / "refs" / "main").write_text(revision)
    return root


def test_hub_ids_load_offline_from_the_cache(tiny, tmp_path):
    """The default --pretrained_*_model_name_or_path (Hub ids) work offline from --cache_dir; a missing one gets a
    one-line error that names the flag."""
    cache = hub_cache(tiny, tmp_path / "cache")
    hub_ids = {"--pretrained_prior_model_name_or_path": None, "--pretrained_decoder_model_name_or_path": None,
               "--cache_dir": cache, "--validation_prompts": ["a red circle"]}
    launch(DECODER_SCRIPT, base_args(tiny, tmp_path / "out", steps=1, **hub_ids))
    assert (tmp_path / "out" / "unet" / "config.json").is_file()
    from huggingface_hub import ModelCard

    # A prior on the Hub is named on the decoder's card, so AutoPipelineForText2Image can load the pair from it.
    assert ModelCard.load(tmp_path / "out" / "README.md").data.prior == ["kandinsky-community/kandinsky-2-2-prior"]
    missing = launch(PRIOR_SCRIPT, base_args(tiny, tmp_path / "prior-out", steps=1, **hub_ids)
                     + ["--pretrained_prior_model_name_or_path", "nobody/no-such-prior"], check=False)
    assert missing.returncode != 0
    assert "Could not load the prior model from --pretrained_prior_model_name_or_path 'nobody/no-such-prior'" \
        in missing.stderr
