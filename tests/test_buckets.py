"""Aspect-ratio buckets (issue 13): the shapes, the bucket each picture goes to, what MoVQ and the UNet need of a
shape, and the seeded order of one-shape micro-batches per epoch and process, in-process; end to end, bucketed runs
on mixed shapes that, resumed mid-epoch, end with the weights of an uninterrupted run, on one and two processes."""

import collections
import json
import math
import shutil
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from PIL import Image

from kandinsky_train.buckets import Buckets, epoch_order, render_multiple, size_multiple
from kandinsky_train.errors import UserError

from conftest import DECODER_SCRIPT, REPO, base_args, checkpoints, launch, offline_env

REAL_CONFIGS = REPO / "benchmarks" / "configs" / "decoder"


def bucket_args(resolution, **flags):
    return SimpleNamespace(resolution=resolution, **{"min_bucket_reso": None, "max_bucket_reso": None,
                                                     "bucket_reso_steps": None, **flags})


def test_real_decoder_needs_multiples_of_64_and_buckets_fit_the_resolution():
    movq, unet = (json.loads((REAL_CONFIGS / f"{name}.json").read_text()) for name in ("movq", "unet"))
    assert size_multiple(movq, unet) == 64 and render_multiple(movq) == 64
    buckets = Buckets.from_args(bucket_args(512), 64)
    assert (buckets.min_side, buckets.max_side, buckets.step) == (256, 1024, 64)  # kohya's defaults at 512
    assert (512, 512) in buckets.shapes and len(buckets.shapes) == 17
    for width, height in buckets.shapes:
        assert width % 64 == 0 and height % 64 == 0 and 256 <= min(width, height) <= max(width, height) <= 1024
        assert width * height <= 512 * 512 and (height, width) in buckets.shapes
    assert max(w * h for w, h in Buckets.from_args(bucket_args(768), 64).shapes) == 768 * 768


def test_landscape_portrait_and_square_pictures_go_to_the_bucket_nearest_their_aspect_ratio():
    buckets = Buckets(512, 256, 1024, 64)
    assert buckets.nearest((1000, 1000)) == (512, 512)
    assert buckets.nearest((1920, 1080)) == (640, 384)  # 16:9 -> 5:3
    assert buckets.nearest((1080, 1920)) == (384, 640)
    assert buckets.nearest((4000, 1000)) == (1024, 256)  # a panorama: the widest bucket
    for width, height in [(1500, 1000), (1000, 800), (333, 1000), (2000, 1100), (640, 641)]:
        landscape = buckets.nearest((width, height))
        assert buckets.nearest((height, width)) == landscape[::-1]  # portrait and landscape alike
        assert abs(math.log(landscape[0] / landscape[1]) - math.log(width / height)) < 0.15


@pytest.mark.parametrize("flags,message", [
    ({"bucket_reso_steps": 8}, "--bucket_reso_steps must be a multiple of 16, got 8: the decoder's MoVQ and UNet"),
    ({"min_bucket_reso": 40}, "--min_bucket_reso must be a multiple of --bucket_reso_steps 16, got 40"),
    ({"min_bucket_reso": 80}, "--resolution 64 must lie between --min_bucket_reso 80 and --max_bucket_reso 128"),
])
def test_bucket_flags_are_checked_against_the_model(flags, message):
    with pytest.raises(UserError, match=message):
        Buckets.from_args(bucket_args(64, **flags), 16)


def test_every_bucket_shape_runs_through_movq_and_the_unet_level_by_level(tiny):
    """The multiple is what the models need: on each bucket of the tiny decoder, MoVQ gives a latent of 1/8 of each
    side and every UNet level halves it exactly. A side off the multiple breaks the UNet's skip connections."""
    from diffusers import UNet2DConditionModel, VQModel

    movq = VQModel.from_pretrained(tiny["decoder"], subfolder="movq").eval()
    unet = UNet2DConditionModel.from_pretrained(tiny["decoder"], subfolder="unet").eval()
    multiple = size_multiple(movq.config, unet.config)
    assert multiple == 16  # MoVQ 8 x UNet 2 (two down blocks)
    levels = []
    for block in unet.down_blocks:
        block.register_forward_hook(lambda module, inputs, output: levels.append(tuple(output[0].shape[-2:])))

    def run(width, height):
        levels.clear()
        with torch.no_grad():
            latents = movq.encode(torch.randn(1, 3, height, width)).latents
            out = unet(latents, torch.tensor([10]), None, added_cond_kwargs={"image_embeds": torch.randn(1, 32)})
        assert out.sample.shape[-2:] == latents.shape[-2:]
        return tuple(latents.shape[-2:]), levels[:]

    shapes = Buckets.from_args(bucket_args(64), multiple).shapes
    assert len(shapes) == 9
    for width, height in shapes:
        latent, sizes = run(width, height)
        assert latent == (height // 8, width // 8)
        assert sizes == [(height // 8 // 2 ** k, width // 8 // 2 ** k) for k in range(1, len(unet.down_blocks))] + [
            (height // 16, width // 16)]  # the last block keeps its size
    with pytest.raises(RuntimeError, match="Sizes of tensors must match"):
        run(72, 64)  # 72 is a multiple of MoVQ's 8 only: 9 latents come back from the level below as 10


MIXED = [(64, 64)] * 5 + [(80, 48)] * 3 + [(48, 80)] * 3


@pytest.mark.parametrize("num_processes", [1, 2, 3])
def test_epoch_order_is_seeded_one_shape_a_batch_and_even_across_processes(num_processes):
    shapes = [MIXED[i] for i in (0, 5, 8, 1, 6, 9, 2, 7, 10, 3, 4)]  # shapes interleaved in index order
    order = epoch_order(shapes, 2, seed=0, epoch=0, num_processes=num_processes)
    assert order == epoch_order(shapes, 2, seed=0, epoch=0, num_processes=num_processes)  # a pure function
    batches = [order[i % num_processes][i // num_processes] for i in range(len(order[0]) * num_processes)]
    assert len({len(share) for share in order}) == 1  # every process has as many micro-batches
    assert len(batches) == math.ceil(7 / num_processes) * num_processes  # 3 + 2 + 2 batches, padded
    assert all(len({shapes[i] for i in batch}) == 1 for batch in batches)  # one shape a batch
    assert sorted(i for batch in batches[:7] for i in batch) == list(range(11))  # no image dropped
    assert batches[7:] == batches[:len(batches) - 7]  # padded with the epoch's first batches
    for other in (epoch_order(shapes, 2, seed=0, epoch=1, num_processes=num_processes),
                  epoch_order(shapes, 2, seed=1, epoch=0, num_processes=num_processes)):
        assert other != order


def test_bucket_batches_serve_this_process_share_and_resume_at_a_micro_batch():
    from kandinsky_train.batches import BucketBatches, make_batches
    from kandinsky_train.data import Variants

    class Samples(torch.utils.data.Dataset):
        shapes, variants = MIXED, Variants()

        def __len__(self):
            return len(self.shapes)

        def __getitem__(self, index):
            width, height = self.shapes[index]
            return {"index": index, "pixels": torch.zeros(3, height, width)}

        def set_epoch(self, epoch):
            pass

    args = SimpleNamespace(train_batch_size=2, dataloader_num_workers=0)
    for rank in (0, 1):
        accelerator = SimpleNamespace(device=torch.device("cpu"), num_processes=2, process_index=rank,
                                      dataloader_config=SimpleNamespace(data_seed=5, non_blocking=False))
        batches = make_batches(args, accelerator, Samples())
        assert isinstance(batches, BucketBatches) and len(batches) == 4
        for epoch in (0, 3):
            expected = epoch_order(MIXED, 2, seed=5, epoch=epoch, num_processes=2)[rank]
            whole = [(i, batch["index"].tolist(), tuple(batch["pixels"].shape)) for i, batch in batches.epoch(epoch)]
            assert [indices for _, indices, _ in whole] == expected
            assert all(shape[2:] == MIXED[indices[0]][::-1] for _, indices, shape in whole)
            resumed = [(i, batch["index"].tolist(), tuple(batch["pixels"].shape))
                       for i, batch in batches.epoch(epoch, start=3)]
            assert resumed == whole[3:]


# ---------------------------------------------------------------------------------------------------------------
# End to end: the decoder script on mixed shapes
# ---------------------------------------------------------------------------------------------------------------

def mixed_folder(tiny, folder):
    """The tiny image set (64x64, 64x48 and 80x64 pictures) plus its 64x48 ones turned upright: 11 pictures, which
    fall into three buckets at --resolution 64: 64x64 (5), 80x48 (3) and 48x80 (3)."""
    shutil.copytree(tiny["images"], folder)
    rows = [json.loads(line) for line in (folder / "metadata.jsonl").read_text().splitlines()]
    for row in list(rows):
        image = Image.open(folder / row["file_name"])
        if image.size == (64, 48):
            name = "upright-" + Path(row["file_name"]).with_suffix(".png").name
            image.transpose(Image.Transpose.ROTATE_90).save(folder / name)
            rows.append({"file_name": name, "text": row["text"]})
    (folder / "metadata.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    return folder


def shapes_of(folder):
    """Each sample's bucket at --resolution 64, in the data set's order, from the files themselves."""
    import datasets

    dataset = datasets.load_dataset("imagefolder", data_dir=str(folder))["train"]
    buckets = Buckets(64, 32, 128, 16)
    return [buckets.nearest(Image.open(cell["path"]).size)
            for cell in dataset.cast_column("image", datasets.Image(decode=False))["image"]]


def micro_batches(path):
    records = map(json.loads, Path(path).read_text().splitlines())
    return [(r["rank"], r["epoch"], r["micro"], r["index"]) for r in records]


OPTIONS = {"--enable_bucket": True, "--random_flip": True, "--noise_offset": 0.1, "--input_perturbation": 0.1,
           "--prediction_type": "v_prediction", "--image_interpolation_mode": "lanczos"}


def resume_from(run, checkpoint, folder, *keep):
    """A new output folder holding only `checkpoint` of `run` (and `keep`): what a run stopped there leaves."""
    for name in (checkpoint, *keep):
        shutil.copytree(run / name, folder / name)
    return folder


def test_bucketed_run_with_the_options_resumed_mid_epoch_equals_the_uninterrupted_run(tiny, tmp_path):
    """One process, batch 2, accumulation 2: 7 one-shape micro-batches an epoch (3 + 2 + 2), so 4 optimizer steps,
    the last of a single micro-batch. checkpoint-3 lies in the middle of the first epoch: a run resumed from it
    (flips, noise offset, input perturbation, v-prediction, lanczos resizes) must see the same micro-batches and end
    with the same weights, and the saved pipeline renders with v-prediction at any multiple of 64."""
    from diffusers import KandinskyV22Pipeline
    from test_robustness import assert_same_state, state_of

    data = mixed_folder(tiny, tmp_path / "data")
    common = {"--train_data_dir": data, "--train_batch_size": 2, "--gradient_accumulation_steps": 2,
              "--checkpointing_steps": 3, "--lr_scheduler": "cosine", "--lr_warmup_steps": 1, **OPTIONS}
    whole = tmp_path / "whole"
    proc = launch(DECODER_SCRIPT, base_args(tiny, whole, steps=6, **common, **{
        "--validation_prompts": "a red circle", "--validation_resolutions": "64x128,128x64",
        "--validation_epochs": 10}), env=offline_env(KANDINSKY_TRAIN_TRACE=str(tmp_path / "whole.jsonl")))
    text = proc.stdout + proc.stderr
    assert "Aspect-ratio buckets: 3 of 9 in use" in text
    for line in ("bucket 48x80 (aspect 0.60): 3 image(s)", "bucket 64x64 (aspect 1.00): 5 image(s)",
                 "bucket 80x48 (aspect 1.67): 3 image(s)"):
        assert line in text
    parts = resume_from(whole, "checkpoint-3", tmp_path / "parts")
    launch(DECODER_SCRIPT, base_args(tiny, parts, steps=6, **common, **{"--resume_from_checkpoint": "latest"}),
           env=offline_env(KANDINSKY_TRAIN_TRACE=str(tmp_path / "parts.jsonl")))
    assert checkpoints(parts) == ["checkpoint-3", "checkpoint-6"]
    assert_same_state(state_of(whole / "checkpoint-6", "unet"), state_of(parts / "checkpoint-6", "unet"), ema=False)

    seen = micro_batches(tmp_path / "whole.jsonl")
    assert [(epoch, micro) for _, epoch, micro, _ in seen] == [(0, m) for m in range(7)] + [(1, m) for m in range(4)]
    assert micro_batches(tmp_path / "parts.jsonl") == seen[6:]  # from the first epoch's last micro-batch on
    shapes = shapes_of(data)
    assert all(len({shapes[i] for i in indices}) == 1 for *_, indices in seen)  # one bucket a batch
    assert sorted(i for _, epoch, _, indices in seen if epoch == 0 for i in indices) == list(range(11))

    # --prediction_type is in the saved scheduler, and the pipeline renders with it, at any multiple of 64
    pipe = KandinskyV22Pipeline.from_pretrained(whole)
    assert pipe.scheduler.config.prediction_type == "v_prediction"
    image = pipe(image_embeds=torch.randn(1, 32), negative_image_embeds=torch.zeros(1, 32), height=64, width=128,
                 num_inference_steps=2, generator=torch.Generator().manual_seed(0)).images[0]
    assert image.size == (128, 64)
    # validation at --resolution, then at each of --validation_resolutions
    assert [Image.open(whole / "validation" / f"step-000006-0{i}.png").size for i in range(3)] == [
        (64, 64), (64, 128), (128, 64)]


def test_two_process_bucketed_run_resumed_mid_epoch_ends_with_the_uninterrupted_weights(tiny, tmp_path):
    """Two processes, batch 2: 7 micro-batches padded to 8, 4 per process and epoch. The uninterrupted run writes
    checkpoint-2 in the middle of the first epoch, as a stopped run would; a run resumed from it (the cache built by
    both processes, per bucket shape, reused) must see the same micro-batches and end with the same weights."""
    from test_robustness import DDP, assert_same_state, state_of

    data = mixed_folder(tiny, tmp_path / "data")
    common = {"--train_data_dir": data, "--enable_bucket": True, "--random_flip": True, "--cache_embeddings": True,
              "--checkpointing_steps": 2, "--lr_scheduler": "linear", "--lr_warmup_steps": 1}
    whole, resumed = tmp_path / "whole", tmp_path / "resumed"
    launch(DECODER_SCRIPT, base_args(tiny, whole, steps=6, **common), launcher=DDP,
           env=offline_env(ACCELERATE_USE_CPU="true", KANDINSKY_TRAIN_TRACE=str(tmp_path / "whole.jsonl")))
    # two entries (CLIP image embeddings, MoVQ latents) x 3 shapes x 2 processes
    entries = {path.parent for path in (whole / "embedding_cache").glob("*/part-*-of-00002.safetensors")}
    assert len(entries) == 2 and len(list((whole / "embedding_cache").glob("*/part-*-of-00002.safetensors"))) == 12
    resume_from(whole, "checkpoint-2", resumed, "embedding_cache")
    proc = launch(DECODER_SCRIPT, base_args(tiny, resumed, steps=6, **common, **{
        "--resume_from_checkpoint": "latest"}), launcher=DDP,
        env=offline_env(ACCELERATE_USE_CPU="true", KANDINSKY_TRAIN_TRACE=str(tmp_path / "resumed.jsonl")))
    text = proc.stdout + proc.stderr
    assert "Reusing cached frozen outputs" in text and "identical on all 2 processes" in text
    assert_same_state(state_of(whole / "checkpoint-6", "unet"), state_of(resumed / "checkpoint-6", "unet"), ema=False)

    seen = micro_batches(tmp_path / "whole.jsonl")
    for rank in (0, 1):
        mine = [(epoch, micro, indices) for r, epoch, micro, indices in seen if r == rank]
        assert [(epoch, micro) for epoch, micro, _ in mine] == [(0, m) for m in range(4)] + [(1, 0), (1, 1)]
        again = [(epoch, micro, indices) for r, epoch, micro, indices in micro_batches(tmp_path / "resumed.jsonl")
                 if r == rank]
        assert again == mine[2:]
    shapes = shapes_of(data)
    first_epoch = [indices for _, epoch, _, indices in seen if epoch == 0]
    assert all(len({shapes[i] for i in indices}) == 1 for indices in first_epoch)
    assert sorted({i for indices in first_epoch for i in indices}) == list(range(11))  # both shards: every picture


def test_compiled_bucketed_run_compiles_once_per_shape_and_resumes_exactly(tiny, tmp_path):
    """--torch_compile with buckets. Batch 2 over the tiny set's two buckets of 5 and 3 pictures trains at four
    (batch size, shape) pairs in the first epoch (64x64 and 80x48, each at 2 and 1): each gets one static graph,
    three recompiles (left to guess, torch.compile made the sizes symbolic at the second shape, and Inductor failed
    on them). A run resumed from checkpoint-2 (mid-epoch) compiles its shapes again and ends with the uninterrupted
    weights. Compiled with aot_eager (faults.py): Inductor's C++ builds take minutes a graph on a small CPU; each
    graph, even so, takes seconds: two buckets rather than mixed_folder's three."""
    from test_robustness import assert_same_state, state_of

    data = tiny["images"]
    assert sorted(collections.Counter(shapes_of(data)).values()) == [3, 5]
    common = {"--train_data_dir": data, "--enable_bucket": True, "--torch_compile": True,
              "--gradient_accumulation_steps": 2, "--checkpointing_steps": 2}
    env = offline_env(TORCH_LOGS="recompiles", KANDINSKY_TRAIN_COMPILE_BACKEND="aot_eager")
    whole, resumed = tmp_path / "whole", tmp_path / "resumed"
    proc = launch(DECODER_SCRIPT, base_args(tiny, whole, steps=4, **common), env=env)
    recompiles = [line for line in proc.stderr.splitlines() if "Recompiling function" in line]
    assert len(recompiles) == 3, "\n".join(recompiles)
    assert "recompile_limit" not in proc.stderr
    resume_from(whole, "checkpoint-2", resumed)
    launch(DECODER_SCRIPT, base_args(tiny, resumed, steps=4, **common, **{"--resume_from_checkpoint": "latest"}),
           env=env)
    assert_same_state(state_of(whole / "checkpoint-4", "unet"), state_of(resumed / "checkpoint-4", "unet"), ema=False)
