"""Training survives what users do to it: resuming with a changed batch size, into another UNet, Ctrl-C, SIGTERM,
a full disk during a checkpoint. Each ends in a finished run or one line, never a hang or a traceback."""
import errno
import json
import os
import shutil
import signal

import pytest

from latent_diffusion.training.checkpointing import DataOrder, TrainingState, continue_position
from test_bad_inputs import data_dir, train_cli  # noqa: F401  (data_dir: fixture)

ORDER = dict(seed=0, rows=8, train_batch_size=1, gradient_accumulation_steps=1, num_processes=1, bucketed=False)


def saved_state(epoch, step, **order):
    return TrainingState(global_step=10, epoch=epoch, step_in_epoch=step, data_order={**ORDER, **order})


@pytest.mark.parametrize("saved, now, steps_per_epoch, expected", [
    (saved_state(0, 6), dict(train_batch_size=4), 2, (1, 0)),  # 6 samples of 8 seen; 2 steps of 4: the next epoch
    (saved_state(0, 5), dict(train_batch_size=2), 4, (0, 3)),  # 5 samples seen: on at sample 6 (step 3 of 2 each)
    (saved_state(2, 3, train_batch_size=2), dict(train_batch_size=1), 8, (2, 6)),  # smaller batch: 6 samples in
    (saved_state(2, 4, train_batch_size=2), dict(train_batch_size=1), 8, (3, 0)),  # the whole epoch was seen
    (saved_state(1, 3), dict(seed=1), 8, (2, 0)),  # another permutation: the next epoch
    (saved_state(1, 3), dict(rows=9), 9, (2, 0)),
    (saved_state(1, 3), {}, 8, (1, 3)),  # nothing changed: exactly where it stopped
    (saved_state(1, 0, num_processes=2), {}, 8, (1, 0)),
], ids=["bigger_batch_past_the_end", "bigger_batch", "smaller_batch", "smaller_batch_end", "seed", "rows", "same", "epoch_start"])
def test_continue_position(saved, now, steps_per_epoch, expected):
    state, note = continue_position(saved, DataOrder(**{**ORDER, **now}), steps_per_epoch)
    assert (state.epoch, state.step_in_epoch) == expected and state.global_step == 10
    assert state.data_order == {**ORDER, **now}
    assert (note == "") == (saved.data_order == state.data_order)


def test_resume_with_a_larger_batch_finishes(sd_folder, data_dir, tmp_path, caplog):  # noqa: F811
    """The reported hang: 4 images, batch 1 to step 3, then batch 2 (2 steps per epoch): the next epoch, no loop."""
    out = tmp_path / "out"
    assert train_cli(sd_folder, data_dir, out, "--max_train_steps", "3", "--checkpointing_steps", "3") == 0
    assert train_cli(sd_folder, data_dir, out, "--max_train_steps", "5", "--train_batch_size", "2",
                     "--resume_from_checkpoint", "latest") == 0
    saved = json.loads((out / "checkpoint-5" / "training_state.json").read_text())
    assert (saved["epoch"], saved["step_in_epoch"], saved["data_order"]["train_batch_size"]) == (2, 0, 2)
    assert "train_batch_size 1 -> 2 since the checkpoint: continuing at epoch 1, step 0" in caplog.text


def test_resume_into_another_unet_is_one_line(sd_folder, data_dir, tmp_path, capsys):  # noqa: F811
    from diffusers import UNet2DConditionModel

    from latent_diffusion.tiny import tiny_unet_config

    out = tmp_path / "out"
    assert train_cli(sd_folder, data_dir, out, "--max_train_steps", "1") == 0
    other = tmp_path / "other"
    shutil.copytree(sd_folder, other)
    shutil.rmtree(other / "unet")
    UNet2DConditionModel(**{**tiny_unet_config(), "block_out_channels": (16, 32)}).save_pretrained(other / "unet")
    capsys.readouterr()
    assert train_cli(other, data_dir, out, "--max_train_steps", "2", "--resume_from_checkpoint", "latest") == 2
    err = capsys.readouterr().err.strip()
    assert "holds weights of a different model than this run's UNet" in err and "Traceback" not in err
    assert len(err.splitlines()[-1]) < 600


@pytest.mark.parametrize("sig, status, save", [(signal.SIGINT, 130, True), (signal.SIGTERM, 143, False)],
                         ids=["ctrl_c_with_checkpoint", "sigterm"])
def test_a_signal_stops_cleanly(sd_folder, data_dir, tmp_path, capsys, monkeypatch, sig, status, save):  # noqa: F811
    from latent_diffusion.training import train_text2img

    calls, real_step = [], train_text2img.train_step

    def step_then_signal(*args, **kwargs):
        calls.append(1)
        loss = real_step(*args, **kwargs)
        if len(calls) == 2:
            os.kill(os.getpid(), sig)  # as the shell's Ctrl-C or a scheduler's pre-emption
        return loss

    monkeypatch.setattr(train_text2img, "train_step", step_then_signal)
    out = tmp_path / "out"
    flags = ["--max_train_steps", "6", "--checkpointing_steps", "100"] + (["--checkpoint_on_stop"] if save else [])
    assert train_cli(sd_folder, data_dir, out, *flags) == status
    err = capsys.readouterr().err
    assert f"stopped by {sig.name} after step 2; " in err and "Traceback" not in err
    assert len(calls) == 2 and (out / "checkpoint-2").is_dir() == save and not (out / "model_index.json").exists()
    assert signal.getsignal(sig) is not None and not [p for p in out.iterdir() if p.name.startswith(".")]


def test_full_disk_during_a_checkpoint(sd_folder, data_dir, tmp_path, capsys, monkeypatch):  # noqa: F811
    from accelerate import Accelerator

    real_save = Accelerator.save_state

    def save_until_full(self, folder, **kwargs):
        if folder.endswith("checkpoint-2.tmp"):
            (open(os.path.join(folder, "half.bin"), "wb")).close()
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), os.path.join(folder, "model.safetensors"))
        return real_save(self, folder, **kwargs)

    monkeypatch.setattr(Accelerator, "save_state", save_until_full)
    out = tmp_path / "out"
    assert train_cli(sd_folder, data_dir, out, "--max_train_steps", "3", "--checkpointing_steps", "1") == 1
    err = capsys.readouterr().err.strip()
    assert f"could not write checkpoint-2 in {str(out)!r}: No space left on device" in err and "Traceback" not in err
    assert sorted(p.name for p in out.iterdir() if "checkpoint" in p.name) == ["checkpoint-1"]
