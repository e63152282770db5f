# Copyright 2026 The Kandinsky 2.2 fine-tuning authors. Licensed under the Apache License, Version 2.0.
"""What a checkpoint holds of the model and its optimizer: the trained model and its EMA in diffusers format (through
accelerate's save/load hooks), and optimizer states of diffusers' reference prior script mapped onto ours."""

import contextlib
import logging
import os

from .errors import fail


class ModelStateHooks:
    """accelerate's save_state / load_state hooks: the trained model (and its EMA) go into a checkpoint in diffusers
    format instead of accelerate's anonymous model.safetensors, so a checkpoint loads with `from_pretrained`."""

    def __init__(self, accelerator, stage, ema=None, lora=False, ema_device="cpu"):
        self.accelerator, self.stage, self.ema, self.lora, self.ema_device = accelerator, stage, ema, lora, ema_device

    def register(self):
        self.accelerator.register_save_state_pre_hook(self.save)
        self.accelerator.register_load_state_pre_hook(self.load)

    def _ours(self, model):
        return isinstance(self.accelerator.unwrap_model(model), self.stage.model_cls)

    def save(self, models, weights, output_dir):
        # Every rank pops the weights it handles (DeepSpeed-safe); only the main process writes.
        sub = self.stage.subfolder
        for i, model in enumerate(models):
            if not self._ours(model):
                continue
            if self.accelerator.is_main_process:
                unwrapped = self.accelerator.unwrap_model(model)
                if self.lora:
                    unwrapped.save_lora_adapter(os.path.join(output_dir, f"{sub}_lora"))
                else:
                    unwrapped.save_pretrained(os.path.join(output_dir, sub))
                if self.ema is not None:
                    self.ema.save_pretrained(os.path.join(output_dir, f"{sub}_ema"))
            if weights:
                weights.pop(i)

    def load(self, models, input_dir):
        sub, model_cls = self.stage.subfolder, self.stage.model_cls
        for i in reversed(range(len(models))):
            if not self._ours(models[i]):
                continue
            unwrapped = self.accelerator.unwrap_model(models[i])
            if self.lora:
                from peft.utils import set_peft_model_state_dict
                from safetensors.torch import load_file

                adapter = os.path.join(input_dir, f"{sub}_lora", "pytorch_lora_weights.safetensors")
                result = set_peft_model_state_dict(unwrapped, load_file(adapter))
                # peft reports what did not fit instead of raising: a silently restarted adapter is worse.
                missing = [k for k in result.missing_keys if "lora_" in k]
                if result.unexpected_keys or missing:
                    fail(f"The LoRA adapter {adapter} does not fit the model ({len(result.unexpected_keys)} "
                         f"unexpected, {len(missing)} missing weights): resume with the --rank and --lora_alpha "
                         "of the run that wrote it.")
            else:
                unwrapped.load_state_dict(model_cls.from_pretrained(os.path.join(input_dir, sub)).state_dict())
            if self.ema is not None:
                self._load_ema(os.path.join(input_dir, f"{sub}_ema"))
            models.pop(i)

    def _load_ema(self, folder):
        """The EMA as diffusers saves it: the averaged weights as a model whose config also holds the EMA's own
        settings (decay, step count...). Loaded here without EMAModel.from_pretrained, which goes through a
        deprecated call, and without the model class's warning about those settings, which are expected."""
        model_cls = self.stage.model_cls
        config = model_cls.load_config(folder)
        with _quiet("diffusers.configuration_utils"):
            averaged = model_cls.from_pretrained(folder)
        settings = {k: config[k] for k in self.ema.state_dict() if k in config and k != "shadow_params"}
        self.ema.load_state_dict({**settings, "shadow_params": [p.detach() for p in averaged.parameters()]})
        self.ema.to(self.ema_device)


@contextlib.contextmanager
def _quiet(logger_name):
    """Errors only from one library logger for a while."""
    quieted = logging.getLogger(logger_name)
    level = quieted.level
    quieted.setLevel(logging.ERROR)
    try:
        yield
    finally:
        quieted.setLevel(level)


def accept_whole_model_optimizer_states(optimizer, model):
    """Diffusers' reference prior script gives AdamW every parameter of the prior, the frozen clip_mean / clip_std
    too (they never get a gradient, so they hold no state); ours gives it the trained ones only. An optimizer state
    of the first kind is mapped onto ours by the trained parameters' places in model.parameters(); our own
    optimizer's implementation flags (fused, foreach) stay."""
    everything = list(model.parameters())
    trained = [i for i, p in enumerate(everything) if p.requires_grad]

    def adopt(optimizer, saved):
        groups = saved["param_groups"]
        if len(groups) != 1 or len(groups[0]["params"]) != len(everything) or len(trained) == len(everything):
            return None  # ours, or something else: torch's own checks decide
        ids = groups[0]["params"]
        ours = optimizer.param_groups[0]
        flags = {k: ours[k] for k in ("fused", "foreach", "capturable", "differentiable") if k in ours}
        state = {new: saved["state"][ids[old]] for new, old in enumerate(trained) if ids[old] in saved["state"]}
        return {"state": state, "param_groups": [{**groups[0], **flags, "params": list(range(len(trained)))}]}

    optimizer.register_load_state_dict_pre_hook(adopt)
