"""Issue 30 item 6: FSDP on CPU. accelerate 1.16 drops `--use_fsdp` when the processes run on CPU (gloo, MULTI_CPU)
or gives every process its own single run (no accelerator, no ACCELERATE_USE_CPU); the training script refuses
such a launch with one line instead of silently training unsharded. The 2-machine loopback run (train, checkpoint,
resume) is `tests/test_multi_node.py`."""
import os
import subprocess
import sys
from pathlib import Path

import pytest
from accelerate.utils import DistributedType

from latent_diffusion.training.launch_checks import check_fsdp_is_active
from test_bad_inputs import data_dir  # noqa: F401  (fixture)
from test_multi_node import free_port

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "training" / "train_text2img.py"


@pytest.mark.parametrize("kind", [DistributedType.MULTI_CPU, DistributedType.NO])
def test_fsdp_launch_that_accelerate_did_not_shard_is_refused(monkeypatch, kind):
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    with pytest.raises(ValueError, match=f"--use_fsdp .* accelerate set up {kind.value}: .*not on CPU"):
        check_fsdp_is_active(kind)


def test_fsdp_that_is_active_or_not_asked_for_passes(monkeypatch):
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    check_fsdp_is_active(DistributedType.FSDP)
    monkeypatch.delenv("ACCELERATE_USE_FSDP")
    check_fsdp_is_active(DistributedType.MULTI_CPU)  # plain data parallelism over gloo


@pytest.mark.distributed
@pytest.mark.slow
def test_two_cpu_processes_with_use_fsdp_are_refused_in_one_line(sd_folder, data_dir, tmp_path):  # noqa: F811
    env = dict(os.environ, ACCELERATE_USE_CPU="1", HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
    done = subprocess.run([sys.executable, "-m", "accelerate.commands.launch", "--use_fsdp", "--fsdp_version", "2",
                           "--num_processes", "2", "--num_machines", "1", "--main_process_port", str(free_port()),
                           "--mixed_precision", "no", "--dynamo_backend", "no", str(SCRIPT),
                           "--pretrained_model_name_or_path", str(sd_folder), "--train_data_dir", data_dir,
                           "--output_dir", str(tmp_path / "out"), "--resolution", "32", "--train_batch_size", "1",
                           "--report_to", "none", "--max_train_steps", "2"],
                          capture_output=True, text=True, cwd=ROOT, env=env, timeout=300)
    assert done.returncode != 0
    lines = [line for line in done.stderr.splitlines() if line.startswith("train_text2img.py: error: ")]
    assert lines and "--use_fsdp (ACCELERATE_USE_FSDP) was asked for but accelerate set up MULTI_CPU" in lines[0]
    assert "[rank0]: Traceback" not in done.stderr and "[rank1]: Traceback" not in done.stderr  # none from the script
    assert not (tmp_path / "out" / "checkpoint-1").exists() and not (tmp_path / "out" / "model_index.json").exists()
