"""train_text2img.py with one rank stalled inside a checkpoint save, so a test can kill -9 it mid-save.

STALL_RANK and STALL_FROM_STEP (environment) pick the rank and the first checkpoint step: after that
rank's `save_state` wrote into `.checkpoint-N.tmp` (and before the barrier that lets the main rank
rename it), it writes its pid to OUTPUT_DIR/stalled.pid and sleeps until killed.
"""
import os
import re
import sys
import time

from accelerate import Accelerator

from latent_diffusion.training.train_text2img import cli

original_save_state = Accelerator.save_state


def stalling_save_state(self, output_dir=None, **kwargs):
    written = original_save_state(self, output_dir, **kwargs)
    step = int(re.search(r"\.checkpoint-(\d+)\.tmp$", str(output_dir)).group(1))
    if self.process_index == int(os.environ["STALL_RANK"]) and step >= int(os.environ["STALL_FROM_STEP"]):
        marker = os.path.join(os.path.dirname(output_dir), "stalled.pid")
        with open(marker + ".part", "w") as f:
            f.write(str(os.getpid()))
        os.replace(marker + ".part", marker)
        time.sleep(3600)
    return written


Accelerator.save_state = stalling_save_state

if __name__ == "__main__":
    sys.exit(cli())
