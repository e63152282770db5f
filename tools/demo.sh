#!/usr/bin/env bash
# The built-in demo, offline on the CPU in about five minutes: tiny random Kandinsky 2.2 models (with a hand-set MoVQ,
# see tools/demo_set.py) and six coloured-shape pictures; the prior and the three decoders (text-to-image, inpainting,
# depth ControlNet) are fine-tuned on them, then tools/demo_report.py draws ${1:-demo-output}/report.png: the loss
# curves and learning rates, and each picture beside what each decoder renders for it before and after fine-tuning.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-demo-output}
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1
LAUNCH=(python -m accelerate.commands.launch --num_processes 1 --num_machines 1 --mixed_precision no
        --dynamo_backend no)
# Six pictures in batches of six: an epoch is one step, so validation and checkpoints are counted in steps.
COMMON=(--pretrained_prior_model_name_or_path "$OUT/tiny/prior" --train_batch_size 6 --seed 0
        --lr_scheduler cosine --lr_warmup_steps 20 --checkpoints_total_limit 2 --report_to tensorboard
        --cache_embeddings --embedding_cache_dir "$OUT/embedding_cache")
PAIR=(--pretrained_decoder_model_name_or_path "$OUT/tiny/decoder" --train_data_dir "$OUT/tiny/images" --resolution 128
      --validation_prompts "a red circle on a blue background" "a white circle on a purple background"
      --validation_inference_steps 25)
# The two other decoders from the same start, trained alike: the inpainting decoder with masks drawn per sample and
# epoch, the ControlNet at 64x64 (its hint block is costly on a CPU) with each picture's depth hint (tiny/hints).
OTHER=(--learning_rate 3e-3 --snr_gamma 5 --prediction_type v_prediction)

# a fresh demo each time (only what it writes)
rm -rf "$OUT/tiny" "$OUT/prior" "$OUT/decoder" "$OUT/inpaint" "$OUT/controlnet" "$OUT/embedding_cache" \
       "$OUT/sample.png" "$OUT/report.png" "$OUT/report.json"
python tools/demo_set.py "$OUT/tiny"
"${LAUNCH[@]}" train_text_to_image_prior.py "${COMMON[@]}" "${PAIR[@]}" --output_dir "$OUT/prior" \
  --max_train_steps 300 --learning_rate 1e-3 --checkpointing_steps 100 --validation_steps 150
"${LAUNCH[@]}" train_text_to_image_decoder.py "${COMMON[@]}" "${PAIR[@]}" --output_dir "$OUT/decoder" \
  --max_train_steps 800 --learning_rate 3e-3 --snr_gamma 5 --prediction_type v_prediction \
  --checkpointing_steps 200 --validation_steps 400
"${LAUNCH[@]}" train_text_to_image_decoder.py "${COMMON[@]}" "${OTHER[@]}" --output_dir "$OUT/inpaint" \
  --pretrained_decoder_model_name_or_path "$OUT/tiny/inpaint" --decoder_type inpaint \
  --train_data_dir "$OUT/tiny/images" --resolution 128 --max_train_steps 400 --checkpointing_steps 200
"${LAUNCH[@]}" train_text_to_image_decoder.py "${COMMON[@]}" "${OTHER[@]}" --output_dir "$OUT/controlnet" \
  --pretrained_decoder_model_name_or_path "$OUT/tiny/controlnet" --decoder_type controlnet \
  --train_data_dir "$OUT/tiny/hints" --resolution 64 --max_train_steps 300 --checkpointing_steps 150
python tools/demo_report.py "$OUT"
