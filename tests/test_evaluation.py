"""kandinsky_train.evaluation and the held-out data in-process: the split is disjoint from training, drawn alike on
every process and on resume, and a resume with another split is refused; a separate held-out set gets the training
data's checks; eval_loss is the same number whenever the weights are the same, whatever the batching and the number
of processes; the optimizer choice and its errors."""

from pathlib import Path
from types import SimpleNamespace

import datasets
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from fakes import FakeAccelerator
from kandinsky_train import checks
from kandinsky_train.checkpoint import TrainState
from kandinsky_train.holdout import held_out_data
from kandinsky_train.errors import UserError
from kandinsky_train.evaluation import HeldOutEvaluation, fixed_noise, fixed_timesteps
from kandinsky_train.runtime import make_optimizer
from kandinsky_train.stage import HeldOutHooks


def data_args(**overrides):
    args = dict(validation_split=None, validation_data_dir=None, validation_dataset_name=None, dataset_name=None,
                dataset_config_name=None, train_data_dir=None, cache_dir=None, image_column="image",
                max_train_samples=None, skip_image_check=False)
    return SimpleNamespace(**{**args, **overrides})


def test_split_is_disjoint_the_same_on_every_process_and_a_resume_with_another_is_refused():
    rows = datasets.Dataset.from_dict({"image": [f"{i}.png" for i in range(40)], "row": list(range(40))})

    def split(share, rank=0):
        train, held = held_out_data(data_args(validation_split=share), FakeAccelerator(rank, 2), rows)
        return list(train["row"]), list(held.dataset["row"]), held.split

    train, held, description = split(0.1)
    assert split(0.1, rank=1) == (train, held, description)  # every process alike
    assert description.startswith("4 of 40 rows") and len(held) == 4
    assert not set(held) & set(train) and sorted(held + train) == list(range(40))  # never trained on
    assert held != [0, 1, 2, 3]  # drawn, not the first rows
    assert split(0.1) == (train, held, description)  # the same on resume
    other = split(0.2)[2]
    assert other != description

    TrainState(seed=0, steps_per_epoch=3, held_out=description).load_state_dict({"global_step": 2,
                                                                                  "held_out": description})
    for now in (other, None):
        with pytest.raises(UserError, match=r"The held-out split differs from the checkpoint's \(checkpoint: 4 of 40 "
                                            r"rows.*Resume with the same --validation_split"):
            TrainState(seed=0, steps_per_epoch=3, held_out=now).load_state_dict({"global_step": 2,
                                                                                  "held_out": description})
    with pytest.raises(UserError, match=r"--validation_split 0.9 of 2 sample\(s\) leaves none to train on"):
        held_out_data(data_args(validation_split=0.9), FakeAccelerator(), rows.select([0, 1]))


def test_a_separate_held_out_set_is_checked_like_the_training_data(tiny):
    train = datasets.Dataset.from_dict({"image": ["x.png"]})
    kept, held = held_out_data(data_args(validation_data_dir=str(tiny["images"])), FakeAccelerator(), train,
                               caption_column="text")
    assert kept is train and held.split is None and len(held.dataset) == 8
    with pytest.raises(UserError, match="--caption_column 'caption' is not a column of"):
        held_out_data(data_args(validation_data_dir=str(tiny["images"])), FakeAccelerator(), train,
                      caption_column="caption")
    parquet = str(tiny["parquet"])
    with pytest.raises(UserError, match="is the training data set and has no validation or test split"):
        held_out_data(data_args(dataset_name=parquet, validation_dataset_name=parquet, image_column="img"),
                      FakeAccelerator(), train)


class Toy(torch.nn.Module):
    """Dropout makes a forward pass random in training mode: the evaluation must switch it off."""

    def __init__(self):
        super().__init__()
        self.linear, self.dropout = torch.nn.Linear(6, 6), torch.nn.Dropout(0.5)

    def forward(self, x):
        return self.dropout(self.linear(x))


def toy_predict(model, features, noise, timesteps):
    target = features["x"]
    return model(target + noise * timesteps[:, None] / 1000), target


def toy_cosine(model, features, generators):
    return F.cosine_similarity(model(fixed_noise(generators, features["x"].shape[1:])), features["x"], dim=-1)


def test_eval_loss_is_the_same_for_the_same_weights_whatever_the_batching_and_processes():
    torch.manual_seed(0)
    samples = [{"index": i, "raw": torch.randn(6)} for i in range(7)]
    stage = SimpleNamespace(held_out=HeldOutHooks(toy_predict, "x", 1000, toy_cosine), draws_per_sample=False)

    def evaluation(batch_size=3, rank=0, world=1):
        return HeldOutEvaluation(SimpleNamespace(train_batch_size=batch_size), FakeAccelerator(rank, world), stage,
                                 samples, encode=lambda batch: {"x": batch["raw"] * 2})

    assert fixed_timesteps(1000) == [125, 375, 625, 875]
    model = Toy().train()
    single = evaluation()
    figures = single.run(model, None, step=5)
    assert single.run(model, None, step=7) == figures  # the same weights, the same number
    assert single.accelerator.logged == [(5, figures), (7, figures)]
    assert "Held-out evaluation at step 5: eval_loss" in single.accelerator.printed[0]
    assert "per evaluation" in single.accelerator.printed[0] and "per evaluation" not in single.accelerator.printed[1]
    assert model.training and -1 <= figures["eval_cosine"] <= 1
    assert evaluation(batch_size=1).run(model, None, step=5) == pytest.approx(figures, rel=1e-6)
    # two processes evaluate disjoint shares whose sums are the single process's
    with torch.no_grad():
        shares = [evaluation(rank=rank, world=2).totals(model.eval()) for rank in (0, 1)]
        whole = single.totals(model)
    assert [int(s[3]) for s in shares] == [4, 3]
    assert torch.allclose(shares[0] + shares[1], whole)
    # other weights, other figures; with EMA, the EMA weights are evaluated and the trained ones come back
    from diffusers.training_utils import EMAModel

    ema = EMAModel(model.parameters())
    with torch.no_grad():
        model.linear.weight.add_(0.5)
    trained = model.linear.weight.clone()
    assert single.run(model, None, step=8)["eval_loss"] != figures["eval_loss"]
    assert single.run(model, ema, step=9) == figures
    assert torch.equal(model.linear.weight, trained)


@pytest.mark.parametrize("name", ["adamw", "adafactor", "prodigy", "adamw4bit"])
def test_optimizer_choice(name):
    if name in ("prodigy", "adamw4bit"):
        pytest.importorskip({"prodigy": "prodigyopt", "adamw4bit": "torchao"}[name])
    lr = 1.0 if name == "prodigy" else 1e-3
    args = SimpleNamespace(optimizer=name, use_8bit_adam=False, learning_rate=lr, adam_beta1=0.8, adam_beta2=0.99,
                           adam_weight_decay=0.01, adam_epsilon=1e-7)
    optimizer = make_optimizer(args, torch.nn.Linear(3, 2).parameters(), torch.device("cpu"))
    group = optimizer.param_groups[0]
    assert type(optimizer).__mro__[1 if name in ("adafactor", "adamw4bit") else 0].__name__ == {
        "adamw": "AdamW", "adafactor": "Adafactor", "prodigy": "Prodigy", "adamw4bit": "AdamW4bit"}[name]
    assert group["lr"] == lr and group["weight_decay"] == 0.01
    if name == "adafactor":  # our learning rate and schedule, not Adafactor's own
        assert not group["relative_step"] and not group["scale_parameter"] and not group["warmup_init"]
    else:
        assert group["betas"] == (0.8, 0.99) and group["eps"] == 1e-7


def test_held_out_and_optimizer_flags_are_checked_before_anything_loads(tmp_path, monkeypatch):
    import train_text_to_image_prior as prior

    data = tmp_path / "data"
    data.mkdir()
    Image.new("RGB", (8, 8)).save(data / "a.png")
    cases = [
        ({"--use_8bit_adam": True, "--optimizer": "adafactor"},
         "Conflicting flags: --use_8bit_adam is an AdamW; drop it or --optimizer adafactor."),
        ({"--validation_split": "1.5"}, r"--validation_split is the share of the data set held out, in \(0, 1\)"),
        ({"--validation_split": "0.1", "--validation_data_dir": str(data)},
         "Conflicting flags: give one held-out set, not --validation_split and --validation_data_dir."),
        ({"--validation_data_dir": str(data)}, "--validation_data_dir is the training folder"),
        ({"--validation_data_dir": str(tmp_path / "nowhere")}, "--validation_data_dir .* is not a folder"),
        ({"--validation_steps": "0"}, "--validation_steps must be at least 1, got 0"),
        ({"--optimizer": "prodigy"}, r"--optimizer prodigy needs the `prodigyopt` package: pip install prodigyopt"),
    ]
    monkeypatch.setattr(checks, "installed", lambda package: package != "prodigyopt")
    for overrides, message in cases:
        argv = ["--train_data_dir", str(data), "--output_dir", str(tmp_path / "out")]
        for flag, value in overrides.items():
            argv += [flag] if value is True else [flag, value]
        with pytest.raises(UserError, match=message):
            checks.check_args(prior.parse_args(argv), "prior")
    assert not Path(tmp_path / "out").exists()
