#!/usr/bin/env bash
# Draw a Shapes outline, generate the same prompt with and without a ControlNet, and write the side-by-side grid.
# Usage: examples/controlnet.sh [CONTROLNET] [MODEL] [OUT_DIR]
# CONTROLNET: a diffusers ControlNet folder for MODEL, default "default-outline", the Shapes outline ControlNet
# shipped for the embedded model (MODEL's default; docs/controlnet.md).
set -euo pipefail
controlnet=${1:-default-outline}
model=${2:-}
out=${3:-controlnet-example}
mkdir -p "$out"
python - "$out/outline.png" <<'PY'
import sys
from latent_diffusion.shapes.outline import outline_image
from latent_diffusion.shapes.world import Scene, SceneObject
scene = Scene(objects=(SceneObject("red", "circle", 0.37, 0.62, 0.3),), background="gray")  # a place no caption names
outline_image(scene, 64).save(sys.argv[1])
PY
model_flag=()
if [ -n "$model" ]; then model_flag=(--model "$model"); fi
latent-diffusion generate "a red circle" "${model_flag[@]}" --seed 0 --quiet -o "$out/without.png"
latent-diffusion generate "a red circle" "${model_flag[@]}" --seed 0 --quiet -o "$out/with.png" \
    --controlnet "$controlnet" --control-image "$out/outline.png"
python - "$out" <<'PY'
import sys
from pathlib import Path
from PIL import Image
folder = Path(sys.argv[1])
tiles = [Image.open(folder / f"{name}.png").convert("RGB") for name in ("outline", "without", "with")]
grid = Image.new("RGB", (sum(t.width for t in tiles), max(t.height for t in tiles)))
x = 0
for tile in tiles:
    grid.paste(tile.resize((tile.width, grid.height)), (x, 0))
    x += tile.width
grid.save(folder / "grid.png")
print(folder / "grid.png")
PY
