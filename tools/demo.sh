#!/usr/bin/env bash
# The built-in demo: tiny random Kandinsky 2.2 models and a small captioned image set, both stages trained a few
# steps on the CPU, offline. Leaves checkpoints, TensorBoard logs, validation images and a final sample under
# ${1:-demo-output}. About a minute on 2 cores.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-demo-output}
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1
LAUNCH=(python -m accelerate.commands.launch --num_processes 1 --num_machines 1 --mixed_precision no
        --dynamo_backend no)
COMMON=(--pretrained_prior_model_name_or_path "$OUT/tiny/prior"
        --pretrained_decoder_model_name_or_path "$OUT/tiny/decoder"
        --train_data_dir "$OUT/tiny/images" --resolution 64 --train_batch_size 2 --max_train_steps 16
        --learning_rate 1e-3 --lr_warmup_steps 0 --checkpointing_steps 4 --checkpoints_total_limit 2 --seed 0
        --validation_prompts "a red circle on a blue background" "a yellow square on a black background"
        --validation_epochs 1 --validation_inference_steps 10 --report_to tensorboard
        --validation_split 0.125 --cache_embeddings --embedding_cache_dir "$OUT/embedding_cache")

# a fresh demo each time (only what it writes)
rm -rf "$OUT/tiny" "$OUT/prior" "$OUT/decoder" "$OUT/embedding_cache" "$OUT/sample.png"
python tools/tiny_kandinsky.py "$OUT/tiny" --num_images 16
"${LAUNCH[@]}" train_text_to_image_prior.py "${COMMON[@]}" --output_dir "$OUT/prior"
"${LAUNCH[@]}" train_text_to_image_decoder.py "${COMMON[@]}" --output_dir "$OUT/decoder"
python - "$OUT" <<'PY'
import sys

import torch
from diffusers import AutoPipelineForText2Image, DiffusionPipeline

out = sys.argv[1]
prior = DiffusionPipeline.from_pretrained(f"{out}/prior")
pipe = AutoPipelineForText2Image.from_pretrained(f"{out}/decoder",
                                                 **{"prior_" + k: v for k, v in prior.components.items()})
image = pipe("a red circle on a blue background", height=64, width=64, num_inference_steps=10,
             prior_num_inference_steps=10, generator=torch.Generator().manual_seed(0)).images[0]
image.save(f"{out}/sample.png")
print(f"""
Done. Look at:
  {out}/prior/checkpoint-*, {out}/decoder/checkpoint-*   checkpoints (resume with --resume_from_checkpoint latest)
  {out}/prior/validation, {out}/decoder/validation      validation images per step
  {out}/sample.png                                      the fine-tuned prior + decoder, loaded as one pipeline
  tensorboard --logdir {out}                            loss, held-out eval_loss (and the prior's eval_cosine),
                                                        learning rate, gradient norm, samples/s, images
(the decoder reused the prior's CLIP image embeddings from {out}/embedding_cache)""")
PY
