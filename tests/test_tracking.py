"""kandinsky_train.tracking and .ema in-process: a step's figures, logged one step late; EMA weights swapped in for
validation and back."""

import pytest
import torch

from fakes import FakeAccelerator
from kandinsky_train.ema import ema_weights
from kandinsky_train.tracking import LaggedLogger, StepMeter


class Progress:
    def __init__(self):
        self.postfix = None

    def set_postfix(self, **values):
        self.postfix = values


def test_step_figures_average_the_micro_batches_and_are_logged_one_step_late():
    accelerator = FakeAccelerator()
    meter, progress = StepMeter(accelerator, batch_size=2), Progress()
    logger = LaggedLogger(accelerator, progress)
    meter.add(torch.tensor(1.0))
    meter.add(torch.tensor(3.0))
    logger.push(1, meter.figures(lr=0.5, grad_norm=torch.tensor(0.25)))
    assert accelerator.logged == []  # nothing read from the device while the next step may be queued
    meter.add(torch.tensor(5.0))
    logger.push(2, meter.figures(lr=0.25, grad_norm=None))
    step, values = accelerator.logged[0]
    assert step == 1 and values["train_loss"] == 2.0 and values["lr"] == 0.5 and values["grad_norm"] == 0.25
    assert values["samples_per_second"] > 0
    logger.flush()
    assert accelerator.logged[1][0] == 2 and accelerator.logged[1][1]["train_loss"] == 5.0
    assert "grad_norm" not in accelerator.logged[1][1] and progress.postfix["loss"] == "5"


def test_ema_weights_are_swapped_in_and_the_trained_ones_come_back():
    from diffusers.training_utils import EMAModel

    model = torch.nn.Linear(2, 2)
    ema = EMAModel(model.parameters(), decay=0.5)
    for _ in range(3):  # the first update copies the weights (decay 0); the later ones average
        with torch.no_grad():
            model.weight.add_(2.0)
        ema.step(model.parameters())
    trained = model.weight.detach().clone()
    with ema_weights(ema, model) as shown:
        assert shown is model and torch.equal(model.weight, ema.shadow_params[0])
        assert not torch.equal(model.weight, trained)
    assert torch.equal(model.weight, trained)
    with ema_weights(None, model) as shown:
        assert torch.equal(shown.weight, trained)
    with pytest.raises(RuntimeError), ema_weights(ema, model):
        raise RuntimeError("validation failed")
    assert torch.equal(model.weight, trained)  # restored on errors too
