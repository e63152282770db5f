"""kandinsky_train.diffusion against numbers worked out by hand."""

import pytest
import torch
from diffusers import DDPMScheduler

from kandinsky_train.diffusion import diffusion_loss, min_snr_weights, step_seed


def scheduler(prediction_type):
    # betas of 0.5: alphas_cumprod = 1/2, 1/4, 1/8, 1/16, so SNR = a / (1 - a) = 1, 1/3, 1/7, 1/15
    return DDPMScheduler(num_train_timesteps=4, trained_betas=[0.5] * 4, prediction_type=prediction_type)


@pytest.mark.parametrize("prediction_type,expected", [
    ("sample", [0.5, 1 / 3, 1 / 7, 1 / 15]),           # min(SNR, 0.5)
    ("epsilon", [0.5, 1.0, 1.0, 1.0]),                 # min(SNR, 0.5) / SNR
    ("v_prediction", [0.25, 0.25, 0.125, 0.0625]),     # min(SNR, 0.5) / (SNR + 1)
])
def test_min_snr_weights_follow_the_prediction_type(prediction_type, expected):
    weights = min_snr_weights(scheduler(prediction_type), torch.arange(4), gamma=0.5)
    assert torch.allclose(weights, torch.tensor(expected), atol=1e-6), weights


def test_loss_is_plain_mse_or_weighted_per_sample():
    pred = torch.zeros(2, 3)
    target = torch.stack([torch.ones(3), torch.full((3,), 2.0)])  # per-sample MSE 1 and 4
    timesteps = torch.tensor([0, 1])
    assert diffusion_loss(pred, target, scheduler("sample"), timesteps, None).item() == pytest.approx(2.5)
    # weights 0.5 and 1/3: (1 * 0.5 + 4 / 3) / 2
    assert diffusion_loss(pred, target, scheduler("sample"), timesteps, 0.5).item() == pytest.approx(11 / 12)


def test_step_seeds_are_fixed_functions_of_the_position():
    # Pinned values: a resumed run (even with a later version of this code) must draw the same noise.
    assert step_seed(0, 1, 1, 2) == 1454465465553964521
    assert step_seed(123, 0, 0, 0) == 2323313356866663652
    seeds = {step_seed(0, r, e, b) for r in range(2) for e in range(2) for b in range(3)}
    assert len(seeds) == 12  # every process, epoch and micro-batch draws differently
