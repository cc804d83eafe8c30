#!/usr/bin/env bash
# The prepared GPU run: fp16/bf16 inference ours vs diffusers (SDPA, torch.compile) and training samples/s
# ours vs diffusers' train_text_to_image.py, SD-1.5-sized, under 8 minutes; results in $OUT (or ./gpu_suite_results).
#
#   benchmarks/gpu_suite.sh             # on a GPU machine, from the repository root
#   benchmarks/gpu_suite.sh --dry-run   # the same code paths on the CPU with tiny sizes
#
# Every part is written to gpu_suite.json / gpu_suite.md as soon as it finishes; none starts after 450 s.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python )}"
OUT_DIR="${OUT:-gpu_suite_results}"
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
if [ "${1:-}" != "--dry-run" ]; then
  "$PYTHON" -c "import torch; print(torch.__version__, torch.cuda.get_device_name(0))" || true
fi
exec timeout 470 "$PYTHON" benchmarks/gpu_suite.py --out "$OUT_DIR" --budget 450 "$@"
