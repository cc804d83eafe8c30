#!/usr/bin/env bash
# DreamBooth with prior preservation on a few images: teach "sks" to the base model, keep "a shape" as it was.
# Usage: examples/train_dreambooth.sh BASE_MODEL_FOLDER INSTANCE_IMAGES_FOLDER [OUTPUT_DIR]
set -euo pipefail
BASE=${1:?base model folder}; INSTANCE=${2:?folder of instance images}; OUT=${3:-out/dreambooth}
python training/train_text2img.py \
  --pretrained_model_name_or_path "$BASE" \
  --instance_data_dir "$INSTANCE" --instance_prompt "a sks shape" \
  --with_prior_preservation --class_data_dir "$OUT/class_images" --class_prompt "a shape" \
  --num_class_images 50 --prior_loss_weight 1.0 \
  --lora_rank 8 --learning_rate 1e-4 --resolution 64 --train_batch_size 4 --max_train_steps 400 \
  --validation_split 0.1 --validation_steps 100 --checkpointing_steps 100 \
  --validation_prompts "a sks shape" "a shape" --output_dir "$OUT"
