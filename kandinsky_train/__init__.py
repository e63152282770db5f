# Copyright 2026 The Kandinsky 2.2 fine-tuning authors. Licensed under the Apache License, Version 2.0.
"""What the two Kandinsky 2.2 training scripts share, one concern per module.

The scripts keep their stage's models, loss, validation and final save, and hand the rest to these modules, in the
order a run meets them:

    cli         the command line (the reference scripts' flags, then ours)
    checks      errors that need nothing loaded: flags, model folders, output folder
      output_dir  --output_dir: writable, none of the run's inputs, one stage's, no checkpoint overwritten
    runtime     the Accelerator, dtypes, optimizer (AdamW, Adafactor, Prodigy, 4-bit AdamW) and schedule, LoRA,
                models that wait on the CPU, the console through the progress bar
    hub         the Hub repository, background checkpoint uploads, the final upload (alone, when only it is missing)
    data        the training data set, checked; the held-out set; samples and batches  (images: PIL decoding, crops)
    stage       what a script plugs into the loop; the CLIP image embedding both stages compute alike
    decoders    the three decoders (text-to-image, inpainting, depth ControlNet): the UNet's extra inputs,
                their data columns, their pipeline
      inpainting  the inpainting decoder's masks: read as the pipeline reads them, drawn per sample and epoch,
                  grown by a latent pixel as the pipeline grows them
      paired_pictures  masks and hints paired with the training pictures (a column, checked and cropped with
                  them), the validation pictures paired with the prompts
    loop        the training loop: restore, step, log, checkpoint, validate and evaluate, finish
      cache       --cache_embeddings: the frozen models' outputs, computed once (CLIP image embeddings: for both stages)
      fingerprints  what a cache entry is keyed on: the frozen weights, the picture files as they are now
      batches     the order of micro-batches per epoch and process, and where a resumed epoch starts
      buckets     --enable_bucket: aspect-ratio bucket shapes, each picture's bucket, a bucketed epoch's order
      checkpoint  save, rotate and restore checkpoints; the run's position (TrainState)
      checkpoint_folders  which folders are complete checkpoints (ours, the reference scripts'), which to resume
      ema         --use_ema
      flag_changes  flags whose values a checkpoint holds too (learning rate, optimizer, EMA decay): on resume
                  the command line's win, said in one line and noted in the model card
      memory      the weights' dtypes; --fused_backward_pass, --full_bf16: the optimizer steps one tensor at a time
      optimizers  small optimizer states: Adafactor factored per matrix, torchao's 4-bit AdamW; states' sizes
      tracking    TensorBoard / W&B figures and images
      validation  validation images; when they and the held-out evaluation are due (and owed after a stop)
      evaluation  the held-out set's eval_loss (and the prior's eval_cosine), at fixed timesteps and noise
      diffusion   the loss (Min-SNR); the seeds per micro-batch and per sample
      preemption  a clean stop on SIGTERM / Ctrl-C
      storage     a full disk: free space checked before large writes, ENOSPC as one line
      faults      for testing only: fault injection, a trace of the data order, torch.compile's backend
    model_card  OUTPUT_DIR/README.md
    errors      UserError: one line on stderr, exit code 2

Imports flow one way (no module imports one above it in this list's dependency order), and the heavy libraries
(diffusers, transformers, datasets, huggingface_hub) are imported inside functions, so that `--help` and the
command-line checks answer before they load.
"""

import logging as _logging

# torchao, where installed (--optimizer adamw4bit), is imported by diffusers' model classes whatever the run uses,
# and its import logs torch's deprecation of how it registers its Enums and diffusers' note that torchao's
# quantized tensor types are missing: neither concerns a run, which loads no torchao-quantized checkpoint.
for _noisy in ("torch.utils._pytree", "diffusers.quantizers.torchao.torchao_quantizer"):
    _logging.getLogger(_noisy).setLevel(_logging.ERROR)
