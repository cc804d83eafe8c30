"""training/train_text2img.py end to end on tiny components: output folder, resume exactness, errors, two processes.

Runs call `main(argv)` in this process (a fresh accelerate state each time);
the two-process test launches `accelerate launch` with gloo on CPU and is
marked `distributed` so it can be selected (`-m distributed`) or skipped.
"""
import json
import os
import subprocess
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from latent_diffusion.tiny import tiny_unet_config
from conftest import two_cpu_processes
from test_data import make_imagefolder

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "training" / "train_text2img.py"


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    """8 images (row 5 unreadable), 7 usable: batch 2 gives 3 steps per epoch."""
    captions = ["a red circle above a blue square", "a small green square at the top", "a cat on a sofa"]
    return str(make_imagefolder(tmp_path_factory.mktemp("data") / "images", 8, captions=captions, broken=(5,)))


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    return str(tmp_path_factory.mktemp("cache"))


def train(sd_folder, data_dir, output_dir, *flags, cache_dir=None):
    """Run the training script's main() in-process with tiny, fast defaults."""
    from accelerate.state import AcceleratorState, GradientState

    from latent_diffusion.training.train_text2img import main

    AcceleratorState._reset_state(True)
    GradientState._reset_state()
    argv = ["--pretrained_model_name_or_path", str(sd_folder), "--train_data_dir", data_dir,
            "--output_dir", str(output_dir), "--resolution", "32", "--train_batch_size", "2",
            "--learning_rate", "1e-3", "--lr_warmup_steps", "0", "--report_to", "none", "--seed", "3"]
    if cache_dir:
        argv += ["--cache_dir", cache_dir]
    main(argv + [str(f) for f in flags])


def weights(checkpoint):
    tensors = load_file(os.path.join(checkpoint, "model.safetensors"))
    ema = os.path.join(checkpoint, "ema.safetensors")
    if os.path.exists(ema):
        tensors.update({f"ema.{k}": v for k, v in load_file(ema).items()})
    return tensors


@pytest.mark.slow  # over 30 s on a loaded 2-core box
def test_end_to_end_output_folder(sd_folder, data_dir, cache_dir, tmp_path, caplog):
    from diffusers import StableDiffusionPipeline

    from latent_diffusion.pipelines import LatentDiffusionPipeline

    import importlib.util

    has_tensorboard = importlib.util.find_spec("tensorboard") is not None  # CI has it ([test] extra)
    out = tmp_path / "out"
    with caplog.at_level("WARNING"):
        train(sd_folder, data_dir, out, "--max_train_steps", 2, "--checkpointing_steps", 1,
              "--checkpoints_total_limit", 1, "--use_ema", "--prediction_type", "v_prediction",
              "--validation_prompts", "a cat on a sofa", "a red circle", "--validation_steps", 2,
              "--num_validation_inference_steps", 2, "--validation_metrics", "pixel_std",
              "--caption_dropout", "0.5", "--random_flip", "--report_to", "tensorboard" if has_tensorboard else "none",
              cache_dir=cache_dir)
    assert "skipped 1 unreadable image(s) of 8" in caplog.text
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-2"]  # pruned to the limit
    assert not list(out.glob(".checkpoint-*"))  # no half-written checkpoint left
    assert (out / "validation" / "step-000002.png").is_file()
    assert json.loads((out / "scheduler" / "scheduler_config.json").read_text())["prediction_type"] == "v_prediction"
    # the saved UNet is the EMA one
    ema = load_file(str(out / "checkpoint-2" / "ema.safetensors"))
    unet = load_file(str(out / "unet" / "diffusion_pytorch_model.safetensors"))
    assert all(torch.equal(unet[k], v) for k, v in ema.items())
    assert (out / "README.md").is_file() and (out / "validation_grid.png").is_file()
    ours = LatentDiffusionPipeline.from_pretrained(str(out))
    ours.set_progress_bar_config(disable=True)
    assert ours("a cat", num_inference_steps=2, output_type="np").images.shape == (1, 32, 32, 3)
    theirs = StableDiffusionPipeline.from_pretrained(str(out), safety_checker=None)
    assert theirs.scheduler.config.prediction_type == "v_prediction"
    if not has_tensorboard:
        pytest.skip("tensorboard is not installed (pip install -e '.[test]'): every check but the event files passed")
    assert list((out / "logs").rglob("events.out.tfevents.*"))  # loss, lr, samples/s and images went to TensorBoard


@pytest.mark.slow  # over 30 s on a loaded 2-core box
@pytest.mark.parametrize("cached", [True, False], ids=["cache", "no_cache"])
def test_resume_is_exact(sd_folder, data_dir, cache_dir, tmp_path, cached):
    """4 steps straight == 2 steps, stop, resume 2 more: mid-epoch (3 steps per epoch), EMA on, accumulation 1 and LR warm-up."""
    flags = ["--use_ema", "--random_flip", "--caption_dropout", "0.3", "--snr_gamma", "5", "--noise_offset", "0.1",
             "--lr_scheduler", "constant_with_warmup", "--lr_warmup_steps", "3", "--checkpointing_steps", 2]
    flags += [] if cached else ["--no_cache"]
    train(sd_folder, data_dir, tmp_path / "straight", "--max_train_steps", 4, *flags, cache_dir=cache_dir)
    train(sd_folder, data_dir, tmp_path / "split", "--max_train_steps", 2, *flags, cache_dir=cache_dir)
    train(sd_folder, data_dir, tmp_path / "split", "--max_train_steps", 4, "--resume_from_checkpoint", "latest",
          *flags, cache_dir=cache_dir)
    straight, split = weights(tmp_path / "straight" / "checkpoint-4"), weights(tmp_path / "split" / "checkpoint-4")
    assert straight.keys() == split.keys()
    for name in straight:
        torch.testing.assert_close(split[name], straight[name], atol=1e-6, rtol=0)
    state = json.loads((tmp_path / "split" / "checkpoint-4" / "training_state.json").read_text())
    order = state.pop("data_order")
    assert state == {"global_step": 4, "epoch": 1, "step_in_epoch": 1}
    assert order == {"seed": order["seed"], "rows": 7, "train_batch_size": 2, "gradient_accumulation_steps": 1,
                     "num_processes": 1, "bucketed": False}


def test_unet_from_config_and_accumulation(sd_folder, data_dir, cache_dir, tmp_path):
    config = tmp_path / "unet.json"
    config.write_text(json.dumps(tiny_unet_config()))
    out = tmp_path / "out"
    train(sd_folder, data_dir, out, "--unet_config", config, "--max_train_steps", 1,
          "--gradient_accumulation_steps", 2, "--train_batch_size", 1, "--checkpointing_steps", 5,
          "--sample_index_log", tmp_path / "rows", cache_dir=cache_dir)
    assert len((tmp_path / "rows.rank0").read_text().splitlines()[0].split()) == 3  # step + 2 micro-batch rows
    assert (out / "unet" / "config.json").is_file() and (out / "checkpoint-1").is_dir()


def test_training_on_from_an_fp16_folder_keeps_fp32_weights(sd_folder, data_dir, cache_dir, tmp_path):
    """The embedded default ships in fp16; training it further must not run AdamW on fp16 weights."""
    from latent_diffusion.pipelines import LatentDiffusionPipeline

    half = tmp_path / "half"
    LatentDiffusionPipeline.from_pretrained(str(sd_folder)).to(torch.float16).save_pretrained(str(half))
    out = tmp_path / "out"
    train(half, data_dir, out, "--max_train_steps", 1, "--checkpointing_steps", 1, "--use_ema", cache_dir=cache_dir)
    trained = weights(out / "checkpoint-1")
    assert trained and all(t.dtype == torch.float32 for t in trained.values())
    assert all(torch.isfinite(t).all() for t in trained.values())


def test_cache_is_reused_and_rebuilt_on_change(sd_folder, data_dir, tmp_path, caplog):
    cache = str(tmp_path / "cache")
    with caplog.at_level("INFO"):
        for resolution in (32, 32, 64):
            train(sd_folder, data_dir, tmp_path / f"out{resolution}", "--max_train_steps", 1,
                  "--resolution", resolution, cache_dir=cache)
    events = [line.split("latent cache ")[1].split(":")[0] for line in caplog.text.splitlines() if "latent cache " in line]
    assert events == ["built", "hit", "built"]
    assert len(os.listdir(os.path.join(cache, "latent_cache"))) == 2


@pytest.mark.parametrize("flags, message", [
    (["--caption_column", "caption"], r"--caption_column 'caption' is not a column.*\['image', 'text'\]"),
    (["--resolution", "34"], r"--resolution 34 must be a multiple of 4"),
])
def test_bad_data_and_sizes_name_the_flag(sd_folder, data_dir, tmp_path, flags, message):
    with pytest.raises(ValueError, match=message):
        train(sd_folder, data_dir, tmp_path / "out", "--max_train_steps", 1, *flags)


@pytest.mark.parametrize("flags, message", [
    (["--resume_from_checkpoint", "/no/such/checkpoint"], "--resume_from_checkpoint '/no/such/checkpoint' does not exist"),
    (["--train_batch_size", "0"], "--train_batch_size must be >= 1"),
    (["--learning_rate", "nan"], "--learning_rate must be a finite number >= 0, got nan"),
    (["--validation_metrics", "nope"], "unknown metric 'nope'"),
    (["--lr_scheduler", "nope"], "invalid choice"),
])
def test_bad_flags_are_argparse_errors(sd_folder, data_dir, tmp_path, capsys, flags, message):
    with pytest.raises(SystemExit):
        train(sd_folder, data_dir, tmp_path / "out", *flags)
    assert message in capsys.readouterr().err


def test_missing_component_is_named(data_dir, tmp_path, sd_folder):
    import shutil

    broken = tmp_path / "model"
    shutil.copytree(sd_folder, broken)
    shutil.rmtree(broken / "vae")
    with pytest.raises(ValueError, match=r"missing \['vae'\]"):
        train(broken, data_dir, tmp_path / "out", "--max_train_steps", 1)


@pytest.mark.distributed
@pytest.mark.slow
def test_two_processes_see_disjoint_rows_and_agree(sd_folder, data_dir, tmp_path):
    """accelerate launch, two CPU processes over gloo: disjoint rows every step, identical final weights."""
    launch, env = two_cpu_processes(SCRIPT)
    command = launch + ["--pretrained_model_name_or_path", str(sd_folder), "--train_data_dir", data_dir,
                        "--output_dir", str(tmp_path / "out"), "--resolution", "32", "--train_batch_size", "1",
                        "--max_train_steps", "4", "--checkpointing_steps", "2", "--report_to", "none", "--use_ema",
                        "--sample_index_log", str(tmp_path / "rows")]
    done = subprocess.run(command, env=env, cwd=ROOT, capture_output=True, text=True, timeout=900)  # loaded CI boxes
    assert done.returncode == 0, done.stderr[-3000:]
    logs = [(tmp_path / f"rows.rank{r}").read_text().splitlines() for r in range(2)]
    steps = [[line.split() for line in log if not line.startswith("weights")] for log in logs]
    assert len(steps[0]) == len(steps[1]) == 4
    for a, b in zip(*steps):
        assert a[0] == b[0] and not set(a[1:]) & set(b[1:])  # same step, disjoint rows
    epoch0 = {row for log in steps for line in log[:3] for row in line[1:]}
    assert len(epoch0) == 6  # 3 steps × 2 ranks cover 6 distinct rows of the 7 usable
    assert logs[0][-1].startswith("weights") and logs[0][-1] == logs[1][-1]
    assert (tmp_path / "out" / "model_index.json").is_file()


@pytest.mark.filterwarnings("ignore:Use 'content=<...>':DeprecationWarning")
def test_push_to_hub_uploads_final_folder_and_checkpoint_weights(sd_folder, data_dir, cache_dir, tmp_path, monkeypatch):
    """--push_to_hub and --push_checkpoints_to_hub through the real huggingface_hub client, to a local stand-in Hub."""
    from huggingface_hub import constants
    from hub_server import FakeHub

    repo = "someone/trained-tiny"
    with FakeHub() as fake:
        monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)  # conftest's offline mode blocks local calls too
        monkeypatch.setattr(constants, "HF_HUB_DISABLE_TELEMETRY", True)
        monkeypatch.setattr(constants, "ENDPOINT", fake.url)  # HfApi() defaults to the stand-in
        monkeypatch.setattr(constants, "HF_HUB_DISABLE_XET", True)
        train(sd_folder, data_dir, tmp_path / "out", "--max_train_steps", 1, "--checkpointing_steps", 1,
              "--push_to_hub", "--push_checkpoints_to_hub", "--hub_model_id", repo, "--hub_token", "hf_fake",
              cache_dir=cache_dir)
        pushed = fake.files(repo)
        assert fake.unhandled == [] and fake.errors == []
    assert {"model_index.json", "README.md", "unet/diffusion_pytorch_model.safetensors",
            "scheduler/scheduler_config.json"} <= set(pushed)
    tokenizer_files = {f"tokenizer/{p.name}" for p in (tmp_path / "out" / "tokenizer").iterdir()}
    assert tokenizer_files and tokenizer_files <= set(pushed)
    assert "checkpoints/step-1/model.safetensors" in pushed
    never = ("optimizer", "random_states", "scheduler.bin", "latent_cache/", "logs/", ".pkl", ".bin")
    assert not [p for p in pushed if any(n in p for n in never)]
    local = (tmp_path / "out" / "unet" / "diffusion_pytorch_model.safetensors").read_bytes()
    assert pushed["unet/diffusion_pytorch_model.safetensors"] == local
