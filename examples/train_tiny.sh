#!/usr/bin/env bash
# End to end in a few minutes on a CPU: a tiny random SD folder, 64 Shapes images, 20 training steps
# (from a fresh UNet), then an image from the trained folder. Run from the repository root.
# Expected result: $work/sample.png is NOISE (coloured static). Twenty steps from a random UNet prove that data,
# training, checkpoints, EMA, validation and saving work end to end; they do not teach shapes. For an image you
# can recognise, generate with the embedded default (latent-diffusion generate "a red circle" -o out.png).
# Checked by tests/test_example_outcomes.py::test_train_tiny_example_ends_as_its_header_says (5 min on a loaded
# 2-core CPU: `time bash examples/train_tiny.sh /tmp/tt`).
set -euo pipefail
work=${1:-tiny-run}
python examples/make_tiny_model.py "$work/base"
latent-diffusion shapes-export "$work/data" --n 64 --size 32 --overwrite
python -c "import json; from latent_diffusion.tiny import tiny_unet_config; json.dump(tiny_unet_config(), open('$work/unet.json', 'w'))"
accelerate launch --config_file training/configs/cpu.yaml training/train_text2img.py \
    --pretrained_model_name_or_path "$work/base" --unet_config "$work/unet.json" \
    --train_data_dir "$work/data" --resolution 32 --train_batch_size 8 --max_train_steps 20 \
    --learning_rate 1e-3 --use_ema --caption_dropout 0.1 --checkpointing_steps 10 \
    --validation_prompts "a red circle" --validation_steps 10 --output_dir "$work/out"
latent-diffusion generate "a red circle" --model "$work/out" -o "$work/sample.png" --steps 10
echo "$work/sample.png is noise by design: 20 steps from a random UNet (see the header)"
