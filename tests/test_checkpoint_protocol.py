"""Checkpoints under two processes: back-to-back runs that checkpoint every step, and a kill -9 mid-save.

Both launch `accelerate launch --multi_gpu --num_processes 2` on CPU (gloo), like the two-process test
of test_training.py, and are marked `distributed` and `slow`. Under load a rank can be seconds behind
the other, which is when an unsynchronised save or rename would break (issue 13).
"""
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from latent_diffusion.training.checkpointing import discard_partial_checkpoints, list_checkpoints
from test_data import make_imagefolder

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "training" / "train_text2img.py"
STALLED = ROOT / "tests" / "train_with_stalled_save.py"


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return str(make_imagefolder(tmp_path_factory.mktemp("data") / "images", 6))


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def launch_command(script, sd_folder, data_dir, out, steps, *flags):
    return [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
            "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port",
            str(free_port()), str(script), "--pretrained_model_name_or_path", str(sd_folder),
            "--train_data_dir", data_dir, "--output_dir", str(out), "--resolution", "32", "--train_batch_size", "1",
            "--max_train_steps", str(steps), "--checkpointing_steps", "1", "--report_to", "none", "--use_ema",
            "--learning_rate", "1e-3", "--lr_warmup_steps", "0", "--sample_index_log", str(out) + "-rows",
            *map(str, flags)]


def launch_env(**extra):
    return dict(os.environ, ACCELERATE_USE_CPU="1", HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1", **extra)


def run(command, **extra):
    done = subprocess.run(command, env=launch_env(**extra), cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    return done


def checkpoint_tensors(path):
    tensors = load_file(os.path.join(path, "model.safetensors"))
    tensors.update({f"ema.{k}": v for k, v in load_file(os.path.join(path, "ema.safetensors")).items()})
    return tensors


def rows_by_step(out, rank):
    lines = Path(f"{out}-rows.rank{rank}").read_text().splitlines()
    return {int(line.split()[0]): line.split()[1:] for line in lines if not line.startswith("weights")}


@pytest.mark.distributed
@pytest.mark.slow
def test_back_to_back_runs_checkpointing_every_step(sd_folder, data_dir, tmp_path):
    """Three 2-process runs in a row on one output folder, each resuming and saving at every step."""
    out = tmp_path / "out"
    for run_index, steps in enumerate((2, 4, 6)):
        run(launch_command(SCRIPT, sd_folder, data_dir, out, steps, "--resume_from_checkpoint", "latest",
                           "--checkpoints_total_limit", 2))
        assert [Path(p).name for p in list_checkpoints(str(out))] == [f"checkpoint-{steps - 1}", f"checkpoint-{steps}"]
        assert not list(out.glob(".checkpoint-*"))
        names = set(os.listdir(out / f"checkpoint-{steps}"))
        assert {"random_states_0.pkl", "random_states_1.pkl", "model.safetensors", "ema.safetensors",
                "training_state.json"} <= names, (run_index, names)
    state = json.loads((out / "checkpoint-6" / "training_state.json").read_text())
    assert state["global_step"] == 6
    assert sorted(rows_by_step(out, 0)) == [1, 2, 3, 4, 5, 6]  # every step trained exactly once


@pytest.mark.distributed
@pytest.mark.slow
def test_kill_9_of_a_rank_mid_save_resumes_with_nothing_lost(sd_folder, data_dir, tmp_path):
    """Rank 1 is killed inside the save of checkpoint-3; `latest` resumes from checkpoint-2 and ends as a straight run."""
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    run(launch_command(SCRIPT, sd_folder, data_dir, straight, 4))

    launcher = subprocess.Popen(launch_command(STALLED, sd_folder, data_dir, killed, 4), cwd=ROOT,
                                env=launch_env(STALL_RANK="1", STALL_FROM_STEP="3"),
                                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    marker = killed / "stalled.pid"
    deadline = time.monotonic() + 600
    while not marker.exists() and launcher.poll() is None and time.monotonic() < deadline:
        time.sleep(0.2)
    assert marker.exists(), launcher.communicate(timeout=60)[1][-3000:] if launcher.poll() is not None else "timeout"
    assert (killed / ".checkpoint-3.tmp").is_dir()  # mid-save: written into, not yet renamed
    os.kill(int(marker.read_text()), signal.SIGKILL)
    launcher.communicate(timeout=300)
    assert launcher.returncode != 0
    assert [Path(p).name for p in list_checkpoints(str(killed))] == ["checkpoint-1", "checkpoint-2"]
    assert (killed / ".checkpoint-3.tmp").is_dir()  # the leftover the resume must neither use nor keep

    run(launch_command(SCRIPT, sd_folder, data_dir, killed, 4, "--resume_from_checkpoint", "latest"))
    assert not list(killed.glob(".checkpoint-*"))
    expected, resumed = checkpoint_tensors(straight / "checkpoint-4"), checkpoint_tensors(killed / "checkpoint-4")
    assert expected.keys() == resumed.keys()
    for name in expected:
        torch.testing.assert_close(resumed[name], expected[name], atol=1e-6, rtol=0)
    for rank in (0, 1):  # steps 3 and 4 saw the rows the straight run saw: no data lost or repeated
        assert {s: r for s, r in rows_by_step(killed, rank).items() if s > 2} == \
               {s: r for s, r in rows_by_step(straight, rank).items() if s > 2}


def test_partial_checkpoints_are_cleared_and_old_ones_restored(tmp_path):
    """What a kill leaves: a .tmp is deleted; a .old whose new copy never arrived is put back."""
    for name in ("checkpoint-1", ".checkpoint-2.tmp", ".checkpoint-3.old", "checkpoint-4", ".checkpoint-4.old"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "training_state.json").write_text("{}")
    (tmp_path / "checkpoint-5").mkdir()  # no training_state.json: never finished, never resumed from
    assert [Path(p).name for p in list_checkpoints(str(tmp_path))] == ["checkpoint-1", "checkpoint-4"]
    discard_partial_checkpoints(str(tmp_path))
    assert sorted(os.listdir(tmp_path)) == ["checkpoint-1", "checkpoint-3", "checkpoint-4", "checkpoint-5"]
    assert [Path(p).name for p in list_checkpoints(str(tmp_path))] == ["checkpoint-1", "checkpoint-3", "checkpoint-4"]
