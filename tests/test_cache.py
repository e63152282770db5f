"""--cache_embeddings: the frozen encoders' outputs computed once give bit-identical training on CPU in fp32, the
second stage reuses the first one's CLIP image embeddings, and each cache entry is rebuilt when what it depends on
(frozen model, data, resolution) changes."""

import os
import shutil

import torch
from safetensors.torch import load_file

from conftest import DECODER_SCRIPT, PRIOR_SCRIPT, base_args, launch


def final_weights(output, sub):
    return load_file(next((output / sub).glob("*.safetensors")))


def test_cached_training_is_bit_identical_and_the_second_stage_reuses_the_image_embeddings(tiny, tmp_path):
    """Each stage trains alike with and without the cache, on an odd number of pictures (the last batch of an epoch
    is smaller; the decoder's buckets have short last batches too) with several captions each; the prior, trained
    second on the same data with the same cache folder, takes the CLIP image embeddings the decoder's run computed
    (the decoder's condition is the prior's target: one per picture, whichever caption an epoch draws) and still
    trains exactly as without any cache."""
    from test_data import caption_lists

    cache = tmp_path / "cache"
    data = caption_lists(tiny, tmp_path / "data", [[f"caption {i}", f"another {i}", "a third"][:1 + i % 3]
                                                   for i in range(8)])
    common = {"--conditioning_dropout_prob": 0.3, "--train_data_dir": data, "--max_train_samples": 7}
    for script, sub, own in [(DECODER_SCRIPT, "unet", {"--enable_bucket": True}), (PRIOR_SCRIPT, "prior", {})]:
        plain, cached = tmp_path / f"{sub}-plain", tmp_path / f"{sub}-cached"
        launch(script, base_args(tiny, plain, steps=5, **common, **own))  # the prior's second epoch draws anew
        proc = launch(script, base_args(tiny, cached, steps=5, **common, **own, **{"--cache_embeddings": True,
                                                                                   "--embedding_cache_dir": cache}))
        text = proc.stdout + proc.stderr
        assert "frozen outputs cached" in text
        a, b = final_weights(plain, sub), final_weights(cached, sub)
        assert all(torch.equal(a[k], b[k]) for k in a)
        if script == DECODER_SCRIPT:
            assert "Reusing cached" not in text and len(list(cache.iterdir())) == 2  # image embeddings, latents
        else:
            assert f"Reusing cached CLIP image embeddings from {cache}" in text
            assert "Reusing cached frozen outputs" not in text  # the text encoder's outputs are the prior's own
            assert len(list(cache.iterdir())) == 3  # no second entry of image embeddings


def test_cache_is_reused_and_invalidated(tiny, tmp_path):
    import tiny_kandinsky

    cache = tmp_path / "cache"

    def run(name, **overrides):
        """Which of the decoder's two cache entries (CLIP image embeddings, MoVQ latents) were reused, and the
        entries in the cache folder after the run."""
        args = {"--cache_embeddings": True, "--embedding_cache_dir": cache, **overrides}
        proc = launch(DECODER_SCRIPT, base_args(tiny, tmp_path / name, steps=1, **args))
        text = proc.stdout + proc.stderr
        reused = ("Reusing cached CLIP image embeddings" in text, "Reusing cached frozen outputs" in text)
        return reused, sorted(p.name for p in cache.iterdir())

    reused, first = run("a")
    assert reused == (False, False) and len(first) == 2
    reused, again = run("b")
    assert reused == (True, True) and again == first  # same model, data, resolution: reused across runs
    reused, folders = run("c", **{"--resolution": 128})
    assert reused == (True, False) and len(folders) == 3  # resolution changed: new latents, same CLIP input
    data = tmp_path / "data"
    shutil.copytree(tiny["images"], data)
    from PIL import Image

    Image.new("RGB", (64, 64), (1, 2, 3)).save(data / "000.jpg")  # same name, new content
    reused, folders = run("d", **{"--train_data_dir": data})
    assert reused == (False, False) and len(folders) == 5  # data changed
    replaced = data / "001.png"  # another picture under the same name, with the old modification time
    times = os.stat(replaced)
    Image.new("RGB", (64, 64), (200, 10, 10)).save(replaced)
    os.utime(replaced, ns=(times.st_atime_ns, times.st_mtime_ns))
    reused, folders = run("f", **{"--train_data_dir": data})
    assert reused == (False, False) and len(folders) == 7
    other_prior = tiny_kandinsky.build_tiny_prior(tmp_path / "other_prior", seed=7)
    reused, folders = run("e", **{"--pretrained_prior_model_name_or_path": other_prior})
    assert reused == (False, True) and len(folders) == 8  # frozen CLIP image encoder changed, MoVQ did not


# In-process checks of the cache's pieces (the tests above run the scripts end to end).

def test_picture_files_key_the_cache_where_the_data_sets_fingerprint_stays(tmp_path):
    """A CSV column of file paths: an edited picture leaves the data set's fingerprint as it was, not the key."""
    import datasets
    from PIL import Image

    from kandinsky_train.fingerprints import picture_files_fingerprint

    for i in range(3):
        Image.new("RGB", (8, 8), (i, 0, 0)).save(tmp_path / f"{i}.png")
    rows = "".join(f"{tmp_path / f'{i}.png'},a picture\n" for i in range(3))
    (tmp_path / "data.csv").write_text("image,text\n" + rows)

    def load():
        dataset = datasets.load_dataset("csv", data_files=str(tmp_path / "data.csv"), cache_dir=tmp_path / "hf")
        return dataset["train"]

    before = load()
    key = picture_files_fingerprint(before, "image")
    assert picture_files_fingerprint(load(), "image") == key
    Image.new("RGB", (8, 8), (9, 9, 9)).save(tmp_path / "1.png")
    after = load()
    assert after._fingerprint == before._fingerprint and picture_files_fingerprint(after, "image") != key

def test_fingerprint_changes_with_any_weight_and_the_config():
    from kandinsky_train.fingerprints import model_fingerprint

    torch.manual_seed(0)
    model = torch.nn.Linear(4, 3)
    before = model_fingerprint(model)
    assert model_fingerprint(model) == before
    with torch.no_grad():
        model.bias[2] += 1e-3
    assert model_fingerprint(model) != before


class VersionedSamples:
    """Samples as TrainingSamples serves them: versions drawn per epoch, and a training shape each."""

    def __init__(self, counts, shapes):
        from kandinsky_train.data import Variants

        self.variants, self.shapes = Variants(counts, seed=3), shapes

    def __len__(self):
        return len(self.shapes)

    def sample(self, index, variant):  # the tensor's length is the sample's shape; its value names the version
        return {"index": index, "x": torch.full(self.shapes[index], 10.0 * index + variant)}


def test_cache_holds_every_version_per_shape_and_reads_this_epochs(tmp_path):
    import pickle

    from fakes import FakeAccelerator
    from kandinsky_train.cache import EmbeddingCache, JoinedSamples, build

    counts, shapes = [1, 3, 1, 2, 1], [(2,), (3,), (2,), (3,), (3,)]
    samples = VersionedSamples(counts, shapes)
    cache, other = EmbeddingCache(tmp_path, "f" * 64), EmbeddingCache(tmp_path, "e" * 64)
    assert not cache.complete()
    # two processes, each encoding its share of each shape for both caches in one pass, as the DDP run does
    for rank in (1, 0):
        build(FakeAccelerator(rank, 2), samples, [(cache, lambda batch: {"y": batch["x"] * 10}),
                                                  (other, lambda batch: {"z": -batch["x"]})], batch_size=2)
    assert cache.complete() and other.complete()
    assert len(list(cache.folder.glob("part-*-of-00002.safetensors"))) == 4  # 2 processes x 2 shapes
    loaded = cache.load(samples)
    assert len(loaded) == 5 and loaded.keys == ["y"] and len(loaded.location) == sum(counts)
    joined = JoinedSamples([loaded, other.load(samples)])
    drawn = set()
    for epoch in range(20):
        joined.set_epoch(epoch)
        for index in range(5):
            variant = samples.variants.pick(index)
            assert loaded[index]["y"].tolist() == [100.0 * index + 10 * variant] * shapes[index][0]
            assert joined[index]["z"].tolist() == [-10.0 * index - variant] * shapes[index][0]  # the same version
            drawn.add((index, variant))
    assert drawn == set(loaded.location)  # over a few epochs every version is trained on
    copy = pickle.loads(pickle.dumps(loaded))  # as a data-loader worker started with "spawn" receives it
    assert copy[2]["y"].tolist() == [200.0, 200.0]
    # a process without a sample of a small set (one sample, two processes) writes no part; the cache is complete
    tiny_set = EmbeddingCache(tmp_path, "d" * 64)
    one = VersionedSamples([1], [(2,)])
    for rank in (1, 0):
        build(FakeAccelerator(rank, 2), one, [(tiny_set, lambda batch: {"y": batch["x"]})], batch_size=2)
    assert len(tiny_set.load(one)) == 1 and tiny_set.load(one).keys == ["y"]
    assert not EmbeddingCache(tmp_path, "f" * 24 + "0" * 40).complete()  # same folder, other fingerprint
