"""Both scripts end to end on tiny models (issue: the training-script pair): checkpoints, final pipelines that
load and generate, resume, rotation, EMA / Min-SNR / accumulation / validation / --dataset_name, and the pair
combined in AutoPipelineForText2Image."""

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import DECODER_SCRIPT, PRIOR_SCRIPT, base_args, checkpoints, launch, read_state

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
        launch(script, base_args(tiny, output, steps=4, **{"--checkpointing_steps": 2}))
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


def test_prior_and_decoder_outputs_combine_in_auto_pipeline(trained):
    from diffusers import AutoPipelineForText2Image, DiffusionPipeline

    prior = DiffusionPipeline.from_pretrained(trained["prior"])
    pipe = AutoPipelineForText2Image.from_pretrained(
        trained["decoder"], **{"prior_" + k: v for k, v in prior.components.items()})
    image = pipe("a red circle", num_inference_steps=2, prior_num_inference_steps=2, height=64, width=64,
                 generator=torch.Generator().manual_seed(0)).images[0]
    assert image.size == (64, 64)
    assert pipe.prior_prior is prior.prior  # the fine-tuned prior, not the one the decoder's card names
    # The decoder's model card names the prior, so the decoder folder alone also loads as the full pipeline.
    alone = AutoPipelineForText2Image.from_pretrained(trained["decoder"])
    assert type(alone).__name__ == "KandinskyV22CombinedPipeline"


@pytest.mark.parametrize("stage", ["prior", "decoder"])
def test_resume_latest_after_losing_a_checkpoint(stage, tiny, tmp_path):
    import shutil

    launch(SCRIPTS[stage], base_args(tiny, tmp_path, steps=4, **{"--checkpointing_steps": 2}))
    shutil.rmtree(tmp_path / "checkpoint-2")
    launch(SCRIPTS[stage], base_args(tiny, tmp_path, steps=6, **{"--checkpointing_steps": 1,
                                                                  "--resume_from_checkpoint": "latest"}))
    assert checkpoints(tmp_path) == ["checkpoint-4", "checkpoint-5", "checkpoint-6"]
    model_cls = "PriorTransformer" if stage == "prior" else "UNet2DConditionModel"
    import diffusers

    getattr(diffusers, model_cls).from_pretrained(tmp_path / "checkpoint-4", subfolder=SUBFOLDER[stage])


def test_checkpoints_total_limit_keeps_the_newest(tiny, tmp_path):
    launch(DECODER_SCRIPT, base_args(tiny, tmp_path, steps=6, **{"--checkpointing_steps": 1,
                                                                  "--checkpoints_total_limit": 2}))
    assert checkpoints(tmp_path) == ["checkpoint-5", "checkpoint-6"]


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
    args = base_args(tiny, tmp_path / "out", steps=1, **{
        "--pretrained_prior_model_name_or_path": None, "--pretrained_decoder_model_name_or_path": None,
        "--cache_dir": cache, "--validation_prompts": ["a red circle"]})
    launch(DECODER_SCRIPT, args)
    assert (tmp_path / "out" / "unet" / "config.json").is_file()
    missing = launch(PRIOR_SCRIPT, args + ["--pretrained_prior_model_name_or_path", "nobody/no-such-prior"],
                     check=False)
    assert missing.returncode != 0
    assert "Could not load the prior model from --pretrained_prior_model_name_or_path 'nobody/no-such-prior'" \
        in missing.stderr
