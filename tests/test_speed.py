"""training/speed.py: the AdamW kernel choice, channels_last, loss read-back every N steps, and their flags."""
import pytest
import torch

from latent_diffusion.training.speed import LossMeter, adamw_options
from test_training import cache_dir, data_dir, train, weights  # noqa: F401 (fixtures)


def test_loss_meter_reads_the_mean_every_n_steps_and_at_the_end():
    meter = LossMeter(every=3)
    seen = []
    for step, loss in enumerate([1.0, 2.0, 3.0, 4.0, 6.0], start=1):
        meter.add(torch.tensor(loss))
        if meter.due(step, last_step=5):
            seen.append((step, meter.read()))
    assert seen == [(3, 2.0), (5, 5.0)]


def test_adamw_options_pick_the_kernel():
    assert adamw_options("auto", torch.device("cpu")) == {"fused": True}
    assert adamw_options("auto", torch.device("meta")) == {}
    assert adamw_options("foreach", torch.device("cpu")) == {"foreach": True}
    assert adamw_options("for-loop", torch.device("cuda")) == {"foreach": False}


def test_fused_adamw_and_channels_last_train_the_same_weights(sd_folder, data_dir, cache_dir, tmp_path):
    """The default (fused AdamW) and --channels_last give the weights of the plain for-loop AdamW run."""
    common = ["--max_train_steps", 2, "--checkpointing_steps", 2, "--loss_log_steps", 1]
    train(sd_folder, data_dir, tmp_path / "loop", *common, "--adamw_implementation", "for-loop", cache_dir=cache_dir)
    train(sd_folder, data_dir, tmp_path / "fused", *common, cache_dir=cache_dir)
    train(sd_folder, data_dir, tmp_path / "nhwc", *common, "--channels_last", cache_dir=cache_dir)
    loop = weights(tmp_path / "loop" / "checkpoint-2")
    for run in ("fused", "nhwc"):
        other = weights(tmp_path / run / "checkpoint-2")
        assert other.keys() == loop.keys()
        for name in loop:
            torch.testing.assert_close(other[name], loop[name], atol=1e-4, rtol=1e-3)  # an Adam step moves ~lr=1e-3
    assert (tmp_path / "nhwc" / "unet" / "diffusion_pytorch_model.safetensors").is_file()


def test_bad_loss_log_steps_names_the_flag(sd_folder, data_dir, tmp_path, capsys):
    with pytest.raises(SystemExit):
        train(sd_folder, data_dir, tmp_path, "--loss_log_steps", 0)
    assert "--loss_log_steps must be >= 1" in capsys.readouterr().err
