"""Issue 30's last items for training (training/bounds.py): what a run asks for is bounded before work starts.

`--resolution 8192`, `--train_batch_size 100000` and 20000-character `--validation_prompts` once grew a probe
run past 9 GB; each is now refused in one line naming its flag, status 2, in seconds and without allocating
(the peak resident memory of the test process grows by less than 1 GiB). An `--output_dir` under /proc or
naming a file and a `--unet_config` that is not a JSON object are one line naming the flag too.
"""
import json
import resource
import time

import pytest
import torch

from test_bad_inputs import data_dir, train_cli  # noqa: F401  (data_dir: fixture)
from test_bad_inputs_more import pickle_bytes


@pytest.fixture
def budget(monkeypatch):
    """A fixed memory budget, so the refusals do not depend on this machine's free memory."""
    monkeypatch.setenv("LATENT_DIFFUSION_MEMORY_GIB", "8")


def peak_rss_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20  # KiB on Linux


SIZE_CASES = [
    (["--resolution", "8192"], "--resolution 8192 needs about "),
    (["--train_batch_size", "100000"], "--train_batch_size 100000 needs about "),
    (["--validation_prompts", "x" * 20000], "--validation_prompts must be at most 10000 characters, got 20000"),
    (["--validation_prompts", *["a red circle"] * 257], "--validation_prompts: at most 256 prompts, got 257"),
    (["--seed", str(2 ** 64)], "--seed must be an integer >= 0 and <= 18446744073709551615, got 18446744073709551616"),
    (["--seed", str(2 ** 64 - 1), "--validation_prompts", "a", "b"],  # prompt i samples with seed + i
     "--seed must be an integer >= 0 and <= 18446744073709551614, got 18446744073709551615"),
    (["--dataloader_num_workers", "100000"], "--dataloader_num_workers must be at most "),
    (["--lora_rank", "100000000"], "--lora_rank must be at most 64 for this UNet (4 × its widest 16 channels)"),
    (["--validation_prompts", "a red circle", "--num_validation_inference_steps", "5000"],
     "--num_validation_inference_steps must be at most 1000 (the scheduler's num_train_timesteps), got 5000"),
]


@pytest.mark.parametrize("flags, message", SIZE_CASES, ids=["resolution-8192", "batch-100000", "prompt-20000-chars",
                                                             "257-prompts", "seed-2^64", "seed-plus-prompt",
                                                             "100000-workers", "lora-rank-1e8", "validation-steps"])
def test_sizes_that_cannot_fit_are_refused_before_work_starts(sd_folder, data_dir, tmp_path, capsys, budget,  # noqa: F811
                                                              flags, message):
    before, start = peak_rss_gib(), time.monotonic()
    assert train_cli(sd_folder, data_dir, tmp_path / "out", *flags) == 2
    seconds, grown = time.monotonic() - start, peak_rss_gib() - before
    err = capsys.readouterr().err
    last = err.strip().splitlines()[-1]
    assert message in last and "Traceback" not in err, err[-2000:]
    assert ": error: " in last  # argparse's prog for parse-time refusals, train_text2img.py's for the memory one
    assert seconds < 30 and grown < 1.0, (seconds, grown)
    assert not (tmp_path / "out" / "latent_cache").exists()  # refused before the cache (the VAE) ran


def test_memory_refusal_message_states_the_estimate_and_the_budget(sd_folder, data_dir, tmp_path, capsys,  # noqa: F811
                                                                   budget):
    assert train_cli(sd_folder, data_dir, tmp_path / "out", "--resolution", "8192") == 2
    assert "GiB per training step for this model, more than the 8 GiB available" in capsys.readouterr().err


def test_step_estimate_grows_with_batch_and_resolution_and_the_backward(sd_folder):
    """The estimate reuses limits.py's forward estimate: ×TRAIN_BACKWARD for training, 1× with checkpointing."""
    from latent_diffusion.limits import unet_activation_elements
    from latent_diffusion.training.bounds import TRAIN_BACKWARD, estimate_step_memory

    unet = json.loads((sd_folder / "unet" / "config.json").read_text())
    vae = json.loads((sd_folder / "vae" / "config.json").read_text())

    def estimate(batch=1, resolution=256, **options):
        return estimate_step_memory(unet, vae, batch=batch, resolution=resolution, vae_factor=2, **options)

    assert estimate(batch=4) > 3.9 * estimate(batch=1)
    assert estimate(resolution=512) > 3.9 * estimate(resolution=256)
    assert estimate() > estimate(gradient_checkpointing=True)
    pixels = 3 * 256 * 256 * 4
    assert estimate() >= TRAIN_BACKWARD * unet_activation_elements(unet, 128, 128) * 4 + pixels
    assert estimate(dtype=torch.float16) < estimate()


def test_a_run_that_fits_the_budget_is_not_refused(sd_folder, tmp_path):
    from types import SimpleNamespace

    from latent_diffusion.training.bounds import check_step_memory

    unet = json.loads((sd_folder / "unet" / "config.json").read_text())
    vae = json.loads((sd_folder / "vae" / "config.json").read_text())
    settings = SimpleNamespace(optim=SimpleNamespace(train_batch_size=4, gradient_checkpointing=False),
                               data=SimpleNamespace(resolution=32), validation=SimpleNamespace(validation_prompts=["x"]))
    need = check_step_memory(settings, unet, vae, 2, torch.float32, budget=8 * 2 ** 30)
    assert 0 < need < 2 ** 30
    with pytest.raises(ValueError, match="--train_batch_size 4 needs about"):
        check_step_memory(settings, unet, vae, 2, torch.float32,
                          budget=(need + check_step_memory(settings, unet, vae, 2, torch.float32)) // 8)


# ----------------------------------------------------------------------------- --output_dir, --unet_config


def unet_config_file(tmp_path, kind: str) -> str:
    path = tmp_path / f"unet-{kind}.json"
    if kind == "pickle":
        path.write_bytes(pickle_bytes())
    elif kind == "text":
        path.write_text("this is not json {")
    elif kind == "list":
        path.write_text("[1, 2, 3]")
    elif kind == "huge_channels":
        path.write_text(json.dumps({"block_out_channels": [10 ** 9], "sample_size": 16}))
    elif kind == "bad_types":  # a JSON object diffusers cannot build a UNet from
        path.write_text(json.dumps({"down_block_types": 5, "block_out_channels": [8, 16]}))
    return str(path)


@pytest.mark.parametrize("kind, message", [
    ("pickle", "is not a JSON file ("),
    ("text", "is not a JSON file (Expecting value"),
    ("list", "must hold a JSON object, got list"),
    ("huge_channels", "block_out_channels must be a list of integers from 1 to 8192, got [1000000000]"),
    ("bad_types", "diffusers cannot build a UNet from it ("),
])
def test_unet_config_that_is_not_a_config_is_one_line_naming_the_flag(sd_folder, data_dir, tmp_path, capsys,  # noqa: F811
                                                                      kind, message):
    path = unet_config_file(tmp_path, kind)
    assert train_cli(sd_folder, data_dir, tmp_path / "out", "--unet_config", path) == 2
    err = capsys.readouterr().err
    last = err.strip().splitlines()[-1]
    assert f": error: --unet_config {path!r}" in last and message in last, err[-2000:]
    assert "Traceback" not in err


@pytest.mark.parametrize("output_dir, message", [
    ("/proc/out", "--output_dir '/proc/out' cannot be written: no file can be created in '/proc'"),
    ("/proc/self/out/deeper", "--output_dir '/proc/self/out/deeper' cannot be written: no file can be created in"),
    ("FILE", "is a file; give a folder (it is created when missing)"),
    ("FILE/sub", "is a file, not a folder"),
])
def test_output_dir_that_cannot_hold_the_run_is_refused_naming_the_flag(sd_folder, data_dir, tmp_path, capsys,  # noqa: F811
                                                                        output_dir, message):
    (tmp_path / "file").write_text("not a folder")
    output_dir = output_dir.replace("FILE", str(tmp_path / "file"))
    assert train_cli(sd_folder, data_dir, output_dir) == 2
    err = capsys.readouterr().err
    assert "--output_dir" in err and message in err and "Traceback" not in err, err[-2000:]
    assert (tmp_path / "file").read_text() == "not a folder"


def test_output_write_errors_name_the_flag():
    """At write time (the disk filled or the folder went away after the check) the error names --output_dir."""
    from latent_diffusion.training.bounds import naming_output_dir

    with pytest.raises(OSError) as error:
        with naming_output_dir("/proc/out"):
            open("/proc/out/.unet.tmp-1", "w")
    assert str(error.value).startswith("--output_dir '/proc/out': could not write the run's output: No such file")
    assert ".unet.tmp-1" in str(error.value) and "\n" not in str(error.value)


@pytest.mark.parametrize("error, line", [
    (KeyError("unet"), "train_text2img.py: error: KeyError: 'unet'"),
    (TypeError("bad operand\nsecond line"), "train_text2img.py: error: TypeError: bad operand"),
    (MemoryError(), "train_text2img.py: error: MemoryError"),
    (OSError(28, "No space left on device", "/out/x"), "train_text2img.py: error: No space left on device: /out/x"),
])
def test_any_failure_of_a_training_script_is_one_line_status_1(capsys, monkeypatch, error, line):
    """Not only the expected failures: an exception of any type is one line, never a traceback."""
    from latent_diffusion.training.train_text2img import run_as_command

    def failing(argv):
        raise error

    monkeypatch.delenv("LATENT_DIFFUSION_TRACEBACK", raising=False)
    assert run_as_command(failing, "train_text2img.py", []) == 1
    assert capsys.readouterr().err.strip() == line
    monkeypatch.setenv("LATENT_DIFFUSION_TRACEBACK", "1")
    with pytest.raises(type(error)):
        run_as_command(failing, "train_text2img.py", [])
