#!/usr/bin/env bash
# LoRA fine-tuning of the embedded default model on a new colour word: "cobalt", drawn in the palette's blue.
# The base model does not know the word and draws its usual red; the LoRA teaches it. Then a before/after grid,
# the Shapes scorer's verdict on both models, and one image. Run from the repository root:
#     bash examples/train_lora.sh [WORK_DIR] [STEPS]          (defaults lora-run, 400)
#
# Expected result (measured with `bash examples/train_lora.sh /tmp/lw 400`, 2-core CPU, 5 min of training):
#   before_after.png: top row (the embedded default) red shapes for the "cobalt" prompts, bottom row (with the
#   LoRA) the same prompts in blue; the last column, "a red square", stays red in both rows.
#   score.json, the Shapes scorer's fraction correct over 24 images ("cobalt" judged as blue):
#     cobalt prompts: base 0.04, with the LoRA 1.00; known colour words (red, green, yellow): base 1.00, LoRA 0.96.
#   The step-100 validation images (out/validation/step-000100.png) are already blue shapes; a 100-step run
#   (`bash examples/train_lora.sh /tmp/lw100 100`) scores cobalt 0.04 base, 0.96 LoRA; known words 1.00, 0.96.
# Why not a new colour such as pink: the embedded VAE decodes only the nine Shapes palette colours (pink comes back
# orange), so a UNet LoRA can change what a word draws, not add a colour. Checked at 100 steps by
# tests/test_example_outcomes.py::test_train_lora_example_teaches_cobalt (docs/expectations.md).
set -euo pipefail
work=${1:-lora-run}
steps=${2:-400}
model=$(python -c "from latent_diffusion.formats.assets import default_model_path; print(default_model_path())")
python examples/lora_new_word.py data "$work/data" --n 64
accelerate launch --config_file training/configs/cpu.yaml training/train_text2img.py \
    --pretrained_model_name_or_path "$model" --train_data_dir "$work/data" --resolution 64 \
    --lora_rank 8 --learning_rate 1e-3 --lr_warmup_steps 0 --train_batch_size 8 --max_train_steps "$steps" \
    --random_flip --checkpointing_steps 100 --validation_prompts "a cobalt circle" "a cobalt square" \
    --validation_steps 100 --num_validation_inference_steps 20 --validation_guidance_scale 4 \
    --report_to none --output_dir "$work/out"
python examples/lora_new_word.py grid "$work/out" "$work/before_after.png"
python examples/lora_new_word.py score "$work/out" "$work/score.json"
latent-diffusion generate "a cobalt triangle" --model default-20-step --lora "$work/out" -o "$work/cobalt_triangle.png" --quiet
