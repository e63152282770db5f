"""For the tests: a checkpoint as diffusers' reference Kandinsky 2.2 scripts (examples/kandinsky2_2/text_to_image)
write one, without their code: accelerate's real `save_state` into OUTPUT_DIR/checkpoint-STEP, with a save hook
that writes the trained model with `save_pretrained` into prior/ (or unet/) and its EMA into prior_ema/ (or
unet_ema/), and pops it from accelerate's weights; AdamW over every parameter of the model (the prior's frozen
clip_mean / clip_std included, as the reference prior script does); a schedule (constant unless given) whose
lengths are scaled by the accumulation steps, stepped in accelerate's accumulate as theirs. No
training_state.json. A separate process, because accelerate's state is one per process.

The weights and the EMA are moved away from the model repo's (seeded noise), and the steps use learning rate 0
(unless given), so that a test can tell restored values from fresh ones exactly.

    python tests/reference_checkpoint.py prior|decoder MODEL_REPO OUTPUT_DIR STEPS [SCHEDULER WARMUP ACCUMULATION LR]
"""

import os
import sys

import torch


def main(stage, repo, output_dir, steps, schedule="constant", warmup=0, accumulation=1, lr=0.0):
    from accelerate import Accelerator
    from diffusers import PriorTransformer, UNet2DConditionModel
    from diffusers.optimization import get_scheduler
    from diffusers.training_utils import EMAModel

    model_cls, sub = (PriorTransformer, "prior") if stage == "prior" else (UNet2DConditionModel, "unet")
    accelerator = Accelerator(cpu=True, gradient_accumulation_steps=accumulation)
    torch.manual_seed(0)
    model = model_cls.from_pretrained(repo, subfolder=sub)
    ema = EMAModel(model.parameters(), model_cls=model_cls, model_config=model.config)
    with torch.no_grad():
        for p, shadow in zip(model.parameters(), ema.shadow_params):
            p.add_(0.1 * torch.randn_like(p))
            shadow.add_(0.1 * torch.randn_like(shadow))

    def save_hook(models, weights, folder):
        if accelerator.is_main_process:
            ema.save_pretrained(os.path.join(folder, f"{sub}_ema"))
            for m in models:
                accelerator.unwrap_model(m).save_pretrained(os.path.join(folder, sub))
                weights.pop()

    accelerator.register_save_state_pre_hook(save_hook)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr)  # the run's --learning_rate: a checkpoint keeps it
    scheduler = get_scheduler(schedule, optimizer, num_warmup_steps=warmup * accumulation,
                              num_training_steps=steps * accumulation)
    model, optimizer, scheduler = accelerator.prepare(model, optimizer, scheduler)
    for _ in range(steps * accumulation):
        with accelerator.accumulate(model):
            loss = forward(stage, accelerator.unwrap_model(model)).float().pow(2).mean()
            accelerator.backward(loss)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad()
        if accelerator.sync_gradients:
            ema.step(accelerator.unwrap_model(model).parameters())
    accelerator.save_state(os.path.join(output_dir, f"checkpoint-{steps}"))


def forward(stage, model):
    """One forward pass on random inputs of the model's sizes: every trained weight gets a gradient."""
    config, batch = model.config, 2
    if stage == "prior":
        dim = config.embedding_dim
        return model(torch.randn(batch, dim), timestep=torch.randint(0, 1000, (batch,)),
                     proj_embedding=torch.randn(batch, dim),
                     encoder_hidden_states=torch.randn(batch, config.num_embeddings, dim),
                     attention_mask=torch.ones(batch, config.num_embeddings, dtype=torch.bool)
                     ).predicted_image_embedding
    size = config.sample_size
    return model(torch.randn(batch, config.in_channels, size, size), torch.randint(0, 1000, (batch,)), None,
                 added_cond_kwargs={"image_embeds": torch.randn(batch, config.encoder_hid_dim)}).sample


if __name__ == "__main__":
    stage, repo, output_dir, steps, *schedule = sys.argv[1:]  # schedule: [SCHEDULER WARMUP ACCUMULATION LR]
    main(stage, repo, output_dir, int(steps), *schedule[:1], *map(int, schedule[1:3]), *map(float, schedule[3:]))
