"""--cache_embeddings: the frozen encoders' outputs computed once give bit-identical training on CPU in fp32, and
the cache is rebuilt when the frozen model, the data or the resolution change."""

import shutil

import pytest
import torch
from safetensors.torch import load_file

from conftest import DECODER_SCRIPT, PRIOR_SCRIPT, base_args, launch


def final_weights(output, sub):
    return load_file(next((output / sub).glob("*.safetensors")))


@pytest.mark.parametrize("script,sub", [(PRIOR_SCRIPT, "prior"), (DECODER_SCRIPT, "unet")])
def test_cached_training_is_bit_identical(script, sub, tiny, tmp_path):
    plain, cached = tmp_path / "plain", tmp_path / "cached"
    launch(script, base_args(tiny, plain, steps=5, **{"--conditioning_dropout_prob": 0.3}))
    proc = launch(script, base_args(tiny, cached, steps=5, **{"--conditioning_dropout_prob": 0.3,
                                                               "--cache_embeddings": True}))
    assert "frozen outputs cached" in proc.stdout + proc.stderr
    a, b = final_weights(plain, sub), final_weights(cached, sub)
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_cache_is_reused_and_invalidated(tiny, tmp_path):
    import tiny_kandinsky

    cache = tmp_path / "cache"

    def run(name, **overrides):
        args = {"--cache_embeddings": True, "--embedding_cache_dir": cache, **overrides}
        proc = launch(DECODER_SCRIPT, base_args(tiny, tmp_path / name, steps=1, **args))
        text = proc.stdout + proc.stderr
        return "Reusing cached frozen outputs" in text, sorted(p.name for p in cache.iterdir())

    reused, first = run("a")
    assert not reused and len(first) == 1
    reused, again = run("b")
    assert reused and again == first  # same model, data, resolution: reused across runs
    reused, folders = run("c", **{"--resolution": 128})
    assert not reused and len(folders) == 2  # resolution changed
    data = tmp_path / "data"
    shutil.copytree(tiny["images"], data)
    from PIL import Image

    Image.new("RGB", (64, 64), (1, 2, 3)).save(data / "000.jpg")  # same name, new content
    reused, folders = run("d", **{"--train_data_dir": data})
    assert not reused and len(folders) == 3  # data changed
    other_prior = tiny_kandinsky.build_tiny_prior(tmp_path / "other_prior", seed=7)
    reused, folders = run("e", **{"--pretrained_prior_model_name_or_path": other_prior})
    assert not reused and len(folders) == 4  # frozen CLIP image encoder changed


# In-process checks of the cache's pieces (the tests above run the scripts end to end).

def test_fingerprint_changes_with_any_weight_and_the_config():
    from kandinsky_train.cache import model_fingerprint

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
    from kandinsky_train.cache import EmbeddingCache

    counts, shapes = [1, 3, 1, 2, 1], [(2,), (3,), (2,), (3,), (3,)]
    samples = VersionedSamples(counts, shapes)
    cache = EmbeddingCache(tmp_path, "f" * 64)
    assert not cache.complete()
    # two processes, each encoding its share of each shape, as the DDP run does
    for rank in (1, 0):
        cache.build(FakeAccelerator(rank, 2), samples, lambda batch: {"y": batch["x"] * 10}, batch_size=2)
    assert cache.complete()
    assert len(list(cache.folder.glob("part-*-of-00002.safetensors"))) == 4  # 2 processes x 2 shapes
    loaded = cache.load(samples)
    assert len(loaded) == 5 and loaded.keys == ["y"] and len(loaded.location) == sum(counts)
    drawn = set()
    for epoch in range(20):
        loaded.set_epoch(epoch)
        for index in range(5):
            variant = samples.variants.pick(index)
            assert loaded[index]["y"].tolist() == [100.0 * index + 10 * variant] * shapes[index][0]
            drawn.add((index, variant))
    assert drawn == set(loaded.location)  # over a few epochs every version is trained on
    copy = pickle.loads(pickle.dumps(loaded))  # as a data-loader worker started with "spawn" receives it
    assert copy[2]["y"].tolist() == [200.0, 200.0]
    assert not EmbeddingCache(tmp_path, "f" * 24 + "0" * 40).complete()  # same folder, other fingerprint
