"""LoRA training and aspect-ratio bucketing in training/train_text2img.py, on tiny components."""
import json
import os

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from latent_diffusion.training.buckets import make_buckets, nearest_bucket, resize_to_cover
from latent_diffusion.training.bucketing import bucket_epoch_batches, bucket_steps_per_epoch
from test_pipeline import generate, load_ours, load_theirs
from test_training import cache_dir, data_dir, train  # noqa: F401  (fixtures)

LORA = ["--lora_rank", "4", "--learning_rate", "1e-2"]


def adapter_weights(checkpoint):
    tensors = load_file(os.path.join(checkpoint, "lora_model_0.safetensors"))
    ema = os.path.join(checkpoint, "ema.safetensors")
    if os.path.exists(ema):
        tensors.update({f"ema.{k}": v for k, v in load_file(ema).items()})
    return tensors


def test_lora_run_writes_an_adapter_that_diffusers_and_we_load_alike(sd_folder, data_dir, cache_dir, tmp_path,  # noqa: F811
                                                                      caplog):
    out = tmp_path / "out"
    with caplog.at_level("INFO"):
        train(sd_folder, data_dir, out, *LORA, "--lora_alpha", "8", "--max_train_steps", 3, "--checkpointing_steps",
              2, "--use_ema", "--ema_decay", "0.5", "--validation_prompts", "a cat on a sofa", "--validation_steps", 2,
              "--num_validation_inference_steps", 2, cache_dir=cache_dir)
    assert "LoRA: 4608 of 71452 UNet parameters train" in caplog.text
    checkpoint = sorted(os.listdir(out / "checkpoint-3"))
    assert "lora_model_0.safetensors" in checkpoint and "model.safetensors" not in checkpoint  # adapter, not the base
    assert all("lora" in k for k in load_file(str(out / "checkpoint-3" / "lora_model_0.safetensors")))
    lora = load_file(str(out / "pytorch_lora_weights.safetensors"))
    assert lora and all(k.startswith("unet.") and ".lora." in k for k in lora)
    assert not (out / "unet").exists()  # no base model in the output
    card = (out / "README.md").read_text()
    assert "lora" in card and "load_lora_weights" in card and (out / "validation_grid.png").is_file()
    # the EMA adapter is what was saved
    ema = load_file(str(out / "checkpoint-3" / "ema.safetensors"))
    some = "down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q.lora_B.default.weight"
    torch.testing.assert_close(lora["unet." + some.replace("lora_B.default", "lora.up")], ema[some])

    ours, theirs = load_ours(sd_folder), load_theirs(sd_folder, "dpm++")
    base = generate(ours, sampler="dpm++", guidance_scale=3.0)
    ours.load_lora_weights(str(out))
    theirs.load_lora_weights(str(out))
    a, b = generate(ours, sampler="dpm++", guidance_scale=3.0), generate(theirs, guidance_scale=3.0)
    assert np.abs(a - base).max() > 1 / 255  # training moved the adapter
    assert np.abs(a - b).max() <= 1 / 255


def test_lora_resume_is_exact(sd_folder, data_dir, cache_dir, tmp_path):  # noqa: F811
    """4 steps straight == 2, stop, 2 more: the adapter, its EMA and the optimizer come back from the checkpoint."""
    flags = [*LORA, "--use_ema", "--random_flip", "--lr_scheduler", "constant_with_warmup", "--lr_warmup_steps", "3",
             "--checkpointing_steps", 2]
    train(sd_folder, data_dir, tmp_path / "straight", "--max_train_steps", 4, *flags, cache_dir=cache_dir)
    train(sd_folder, data_dir, tmp_path / "split", "--max_train_steps", 2, *flags, cache_dir=cache_dir)
    train(sd_folder, data_dir, tmp_path / "split", "--max_train_steps", 4, "--resume_from_checkpoint", "latest",
          *flags, cache_dir=cache_dir)
    straight = adapter_weights(tmp_path / "straight" / "checkpoint-4")
    split = adapter_weights(tmp_path / "split" / "checkpoint-4")
    assert straight.keys() == split.keys() and any(k.startswith("ema.") for k in straight)
    for name in straight:
        torch.testing.assert_close(split[name], straight[name], atol=1e-6, rtol=0)


@pytest.mark.parametrize("flags, message", [
    (["--lora_rank", "0"], "--lora_rank must be >= 1"),
    (["--train_text_encoder_lora"], "--train_text_encoder_lora needs --lora_rank"),
    (["--enable_bucket", "--min_bucket_reso", "48", "--bucket_reso_steps", "32"], "--min_bucket_reso 48 must be a multiple"),
])
def test_bad_lora_and_bucket_flags(sd_folder, data_dir, tmp_path, capsys, flags, message):  # noqa: F811
    with pytest.raises(SystemExit):
        train(sd_folder, data_dir, tmp_path / "out", *flags)
    assert message in capsys.readouterr().err


def test_unknown_lora_target_names_the_flag(sd_folder, data_dir, tmp_path):  # noqa: F811
    with pytest.raises(ValueError, match="--lora_target_modules 'nope'"):
        train(sd_folder, data_dir, tmp_path / "out", "--lora_rank", "2", "--lora_target_modules", "nope",
              "--max_train_steps", 1)


# ----------------------------------------------------------------------------- buckets


def test_buckets_follow_kohya_defaults():
    buckets = make_buckets(512, 256, 1024, 64)
    assert (512, 512) in buckets and (256, 1024) in buckets and (1024, 256) in buckets
    assert all(w % 64 == 0 and h % 64 == 0 and w * h <= 512 * 512 for w, h in buckets)
    assert all((h, w) in buckets for w, h in buckets)
    assert nearest_bucket(640, 480, buckets) == (576, 448)
    assert nearest_bucket(1000, 1000, buckets) == (512, 512)
    image = Image.new("RGB", (640, 480))
    assert resize_to_cover(image, (576, 448)).size == (576, 448)


def test_bucket_batches_one_bucket_each_disjoint_and_deterministic():
    row_buckets = {r: ((32, 32) if r < 7 else (48, 16) if r < 12 else (16, 48)) for r in range(15)}
    rows = sorted(row_buckets)
    kw = dict(epoch=1, seed=3, world_size=2, batch_size=2, accumulation=1)
    ranks = [bucket_epoch_batches(row_buckets, rows, rank=r, **kw) for r in range(2)]
    steps = bucket_steps_per_epoch(row_buckets, world_size=2, batch_size=2, accumulation=1)
    assert steps == 2 and len(ranks[0]) == len(ranks[1]) == steps  # 7 // 4 + 5 // 4 + 3 // 4 global batches
    for a, b in zip(*ranks):
        assert len({row_buckets[r] for r, _ in a + b}) == 1  # one bucket per step, on every rank
        assert not {r for r, _ in a} & {r for r, _ in b}
    assert ranks[0] == bucket_epoch_batches(row_buckets, rows, rank=0, **kw)  # a pure function: resumable


@pytest.fixture(scope="module")
def mixed_dir(tmp_path_factory):
    """12 images: 6 square (40×40), 3 wide (60×24), 3 tall (24×60)."""
    folder = tmp_path_factory.mktemp("mixed")
    rng = np.random.default_rng(0)
    sizes = [(40, 40)] * 6 + [(60, 24)] * 3 + [(24, 60)] * 3
    with open(folder / "metadata.jsonl", "w") as f:
        for i, (w, h) in enumerate(sizes):
            Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)).save(folder / f"{i:03d}.png")
            f.write(json.dumps({"file_name": f"{i:03d}.png", "text": "a red circle above a blue square"}) + "\n")
    return str(folder)


@pytest.mark.parametrize("cached", [True, False], ids=["cache", "no_cache"])
def test_bucketed_training_on_mixed_aspect_images(sd_folder, mixed_dir, tmp_path, caplog, cached):
    from latent_diffusion.training.cache import load_cache

    bucket_flags = ["--enable_bucket", "--min_bucket_reso", "16", "--max_bucket_reso", "64", "--bucket_reso_steps", "8"]
    out = tmp_path / "out"
    with caplog.at_level("INFO"):
        train(sd_folder, mixed_dir, out, *bucket_flags, *LORA, "--max_train_steps", 2, "--checkpointing_steps", 5,
              "--train_batch_size", 3, "--sample_index_log", tmp_path / "rows", "--random_flip",
              *([] if cached else ["--no_cache"]))
    buckets = make_buckets(32, 16, 64, 8)
    expected = {i: nearest_bucket(*size, buckets) for i, size in enumerate([(40, 40)] * 6 + [(60, 24)] * 3 + [(24, 60)] * 3)}
    assert len(set(expected.values())) == 3
    assert "images per bucket (width×height): 32×32: 6" in caplog.text
    lines = (tmp_path / "rows.rank0").read_text().splitlines()
    steps = [[int(r) for r in line.split()[1:]] for line in lines if not line.startswith("weights")]
    assert len(steps) == 2 and all(len({expected[r] for r in rows}) == 1 for rows in steps)
    if cached:
        (folder,) = [p for p in (out / "latent_cache").iterdir()]
        cache = load_cache(str(folder))
        for row, mean in zip(cache.indices.tolist(), cache.latent_mean):
            w, h = expected[row]
            assert tuple(mean.shape) == (2, 4, h // 2, w // 2)  # [unflipped, flipped], C, bucket size / VAE factor
    assert (out / "pytorch_lora_weights.safetensors").is_file()


@pytest.mark.filterwarnings("ignore:Use 'content=<...>':DeprecationWarning")
def test_lora_push_to_hub_uploads_the_adapter_and_card_only(sd_folder, data_dir, cache_dir, tmp_path,  # noqa: F811
                                                            monkeypatch):
    from huggingface_hub import constants
    from hub_server import FakeHub

    repo = "someone/tiny-lora"
    with FakeHub() as fake:
        monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
        monkeypatch.setattr(constants, "HF_HUB_DISABLE_TELEMETRY", True)
        monkeypatch.setattr(constants, "ENDPOINT", fake.url)
        monkeypatch.setattr(constants, "HF_HUB_DISABLE_XET", True)
        train(sd_folder, data_dir, tmp_path / "out", *LORA, "--max_train_steps", 1, "--checkpointing_steps", 1,
              "--push_to_hub", "--hub_model_id", repo, "--hub_token", "hf_fake", cache_dir=cache_dir)
        pushed = fake.files(repo)
        assert fake.unhandled == [] and fake.errors == []
    assert set(pushed) == {"pytorch_lora_weights.safetensors", "README.md"}
    assert pushed["pytorch_lora_weights.safetensors"] == (tmp_path / "out" / "pytorch_lora_weights.safetensors").read_bytes()


@pytest.mark.distributed
def test_two_process_lora_with_buckets(sd_folder, mixed_dir, tmp_path):
    """accelerate launch, two CPU processes: LoRA + buckets, one bucket per step on both ranks, same final adapter."""
    import socket
    import subprocess
    import sys

    from test_training import ROOT, SCRIPT

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    env = dict(os.environ, ACCELERATE_USE_CPU="1", HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
    command = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
               "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port",
               str(port), str(SCRIPT), "--pretrained_model_name_or_path", str(sd_folder), "--train_data_dir", mixed_dir,
               "--output_dir", str(tmp_path / "out"), "--resolution", "32", "--train_batch_size", "1",
               "--max_train_steps", "3", "--checkpointing_steps", "2", "--report_to", "none", "--use_ema",
               "--lora_rank", "4", "--enable_bucket", "--min_bucket_reso", "16", "--max_bucket_reso", "64",
               "--bucket_reso_steps", "8", "--sample_index_log", str(tmp_path / "rows")]
    done = subprocess.run(command, env=env, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    buckets = make_buckets(32, 16, 64, 8)
    expected = {i: nearest_bucket(*size, buckets) for i, size in enumerate([(40, 40)] * 6 + [(60, 24)] * 3 + [(24, 60)] * 3)}
    logs = [(tmp_path / f"rows.rank{r}").read_text().splitlines() for r in range(2)]
    steps = [[line.split() for line in log if not line.startswith("weights")] for log in logs]
    assert len(steps[0]) == len(steps[1]) == 3
    for a, b in zip(*steps):
        assert a[0] == b[0] and not set(a[1:]) & set(b[1:])
        assert len({expected[int(r)] for r in a[1:] + b[1:]}) == 1  # both ranks train one bucket per step
    assert logs[0][-1].startswith("weights") and logs[0][-1] == logs[1][-1]
    assert (tmp_path / "out" / "pytorch_lora_weights.safetensors").is_file()
    assert (tmp_path / "out" / "checkpoint-2" / "lora_model_0.safetensors").is_file()
