#!/usr/bin/env bash
# The built-in demo, offline on the CPU in about two minutes: tiny random Kandinsky 2.2 models (with a hand-set MoVQ,
# see tools/demo_set.py) and six coloured-shape pictures; the prior and the decoder are fine-tuned on them, then
# tools/demo_report.py draws ${1:-demo-output}/report.png: both stages' loss curves and learning rates, and each
# picture beside what the decoder renders from its CLIP image embedding before and after fine-tuning.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-demo-output}
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1
LAUNCH=(python -m accelerate.commands.launch --num_processes 1 --num_machines 1 --mixed_precision no
        --dynamo_backend no)
# Six pictures in batches of six: an epoch is one step, so validation and checkpoints are counted in steps.
COMMON=(--pretrained_prior_model_name_or_path "$OUT/tiny/prior"
        --pretrained_decoder_model_name_or_path "$OUT/tiny/decoder"
        --train_data_dir "$OUT/tiny/images" --resolution 128 --train_batch_size 6 --seed 0
        --lr_scheduler cosine --lr_warmup_steps 20 --checkpoints_total_limit 2 --report_to tensorboard
        --validation_prompts "a red circle on a blue background" "a white circle on a purple background"
        --validation_inference_steps 25 --cache_embeddings --embedding_cache_dir "$OUT/embedding_cache")

# a fresh demo each time (only what it writes)
rm -rf "$OUT/tiny" "$OUT/prior" "$OUT/decoder" "$OUT/embedding_cache" "$OUT/sample.png" "$OUT/report.png" \
       "$OUT/report.json"
python tools/demo_set.py "$OUT/tiny"
"${LAUNCH[@]}" train_text_to_image_prior.py "${COMMON[@]}" --output_dir "$OUT/prior" \
  --max_train_steps 300 --learning_rate 1e-3 --checkpointing_steps 100 --validation_steps 150
"${LAUNCH[@]}" train_text_to_image_decoder.py "${COMMON[@]}" --output_dir "$OUT/decoder" \
  --max_train_steps 800 --learning_rate 3e-3 --snr_gamma 5 --prediction_type v_prediction \
  --checkpointing_steps 200 --validation_steps 400
python tools/demo_report.py "$OUT"
