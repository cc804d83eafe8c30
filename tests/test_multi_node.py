"""A simulated 2-machine run on one host: two `accelerate launch` commands (--num_machines 2, --machine_rank 0/1)
meeting on loopback with gloo on CPU. They train, checkpoint, and resume from that checkpoint."""
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from test_bad_inputs import data_dir  # noqa: F401  (fixture)

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "training" / "train_text2img.py"


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def launch_two_machines(model, data, out, rows_log, *flags):
    """Start machine 0 and machine 1 (one process each) and wait for both; their (status, stderr)."""
    port = free_port()
    env = dict(os.environ, ACCELERATE_USE_CPU="1", HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
    runs = []
    for rank in (0, 1):
        command = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_machines", "2",
                   "--machine_rank", str(rank), "--num_processes", "2", "--main_process_ip", "127.0.0.1",
                   "--main_process_port", str(port), "--mixed_precision", "no", "--dynamo_backend", "no",
                   str(SCRIPT), "--pretrained_model_name_or_path", str(model), "--train_data_dir", str(data),
                   "--output_dir", str(out), "--resolution", "32", "--train_batch_size", "1", "--report_to", "none",
                   "--sample_index_log", str(rows_log), *flags]
        runs.append(subprocess.Popen(command, env=env, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                     text=True))
    return [(run.wait(timeout=900), run.stderr.read()) for run in runs]


@pytest.mark.distributed
@pytest.mark.slow
def test_two_machines_on_loopback_train_checkpoint_and_resume(sd_folder, data_dir, tmp_path):  # noqa: F811
    out, rows = tmp_path / "out", tmp_path / "rows"
    first = launch_two_machines(sd_folder, data_dir, out, rows, "--max_train_steps", "2", "--checkpointing_steps", "2")
    assert all(status == 0 for status, _ in first), [err[-2000:] for _, err in first]
    assert (out / "checkpoint-2" / "training_state.json").is_file()
    assert (out / "checkpoint-2" / "random_states_1.pkl").is_file()  # machine 1's process wrote its own state
    second = launch_two_machines(sd_folder, data_dir, out, rows, "--max_train_steps", "4", "--checkpointing_steps", "2",
                                 "--resume_from_checkpoint", "latest")
    assert all(status == 0 for status, _ in second), [err[-2000:] for _, err in second]
    logs = [(tmp_path / f"rows.rank{r}").read_text().splitlines() for r in (0, 1)]  # one log per global rank
    steps = [[line.split() for line in log if not line.startswith("weights")] for log in logs]
    assert [s[0] for s in steps[0]] == [s[0] for s in steps[1]] == ["1", "2", "3", "4"]  # resumed at 3, not again
    for a, b in zip(*steps):
        assert not set(a[1:]) & set(b[1:])  # world size 2: the two ranks share each step's rows, never repeat them
    weights = [[line for line in log if line.startswith("weights")] for log in logs]
    assert weights[0][-1] == weights[1][-1]  # data parallel: both machines end with the same UNet
    assert (out / "checkpoint-4").is_dir() and (out / "model_index.json").is_file()
