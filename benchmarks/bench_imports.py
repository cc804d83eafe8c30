"""What an import costs, in a form a loaded machine disturbs little: modules loaded and CPU seconds.

    python benchmarks/bench_imports.py [MODULE ...]

Each module is imported in a fresh process; prints the number of entries in sys.modules after it and the
CPU seconds (time.process_time) the import took. Default: the imports of `latent-diffusion generate` and
the diffusers/transformers modules it builds on.
"""
from __future__ import annotations

import os
import subprocess
import sys

DEFAULT = ("torch", "diffusers", "transformers.models.clip.modeling_clip", "diffusers.models.unets.unet_2d_condition",
           "diffusers.pipelines.pipeline_utils", "latent_diffusion.pipelines")
CHILD = ("import importlib, sys, time; t = time.process_time(); importlib.import_module(sys.argv[1]); "
         "print(len(sys.modules), round(time.process_time() - t, 2))")


def main() -> None:
    print("| `import ...` | modules in sys.modules | CPU s |\n|---|---|---|")
    for module in sys.argv[1:] or DEFAULT:
        done = subprocess.run([sys.executable, "-c", CHILD, module], capture_output=True, text=True,
                              env=dict(os.environ, HF_HUB_OFFLINE="1"))
        if done.returncode != 0:
            raise SystemExit(f"import {module} failed:\n{done.stderr[-2000:]}")
        count, seconds = done.stdout.split()
        print(f"| {module} | {count} | {seconds} |")


if __name__ == "__main__":
    main()
