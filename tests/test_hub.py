"""Model cards and uploads, driven through the real huggingface_hub client against a local fake Hub.

The fake (tests/hub_server.py) listens on 127.0.0.1; nothing here touches the network.
conftest.py sets HF_HUB_OFFLINE=1, and huggingface_hub then refuses every request,
local endpoints included, so the `hub` fixture turns offline mode off inside these
tests only (and telemetry off, so no request goes anywhere but the fake).
"""
import hashlib
import json
import os

import pytest
import torch
from huggingface_hub import ModelCard, constants
from huggingface_hub.errors import OfflineModeIsEnabled
from PIL import Image
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors

from hub_server import FakeHub
from latent_diffusion.formats import hub as hubmod
from latent_diffusion.formats.hub import push_checkpoint_weights, push_folder, select_upload_files, write_model_card

# huggingface_hub's LFS PUT passes a file object as `data=`, which its HTTP client deprecates: not ours to fix.
pytestmark = pytest.mark.filterwarnings("ignore:Use 'content=<...>':DeprecationWarning")

TOKEN = "hf_fake_token"
REPO = "someone/tiny-sd"

MODEL_FILES = {  # what a pushed model folder must contain
    "model_index.json": json.dumps({"_class_name": "StableDiffusionPipeline",
                                    "unet": ["diffusers", "UNet2DConditionModel"],
                                    "scheduler": ["diffusers", "DDIMScheduler"]}).encode(),
    "unet/config.json": b'{"sample_size": 16}',
    "unet/diffusion_pytorch_model.safetensors": save_safetensors({"w": torch.arange(12.0).reshape(3, 4)}),
    "scheduler/scheduler_config.json": b'{"beta_schedule": "scaled_linear"}',
    "tokenizer/merges.txt": b"#version: 0.2\na b\n",
}
TRAINING_LEFTOVERS = {  # what must never be pushed
    "optimizer.bin": os.urandom(64),
    "scheduler.bin": os.urandom(16),
    "random_states_0.pkl": b"\x80\x04not really a pickle",
    "scaler.pt": os.urandom(8),
    "checkpoint-5/model.safetensors": save_safetensors({"w": torch.zeros(2)}),
    "checkpoint-5/optimizer.bin": os.urandom(8),
    "latent_cache/abc/shard-00000-of-00001.safetensors": save_safetensors({"z": torch.ones(2)}),
    "logs/text2image/events.out.tfevents.1.host": b"events",
    "validation/step-000010.png": b"\x89PNG old grid",
}


def write_files(root, files):
    for rel, data in files.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
    return root


@pytest.fixture
def hub(monkeypatch):
    """A running fake Hub, with huggingface_hub allowed to reach it (and nothing else)."""
    with FakeHub() as fake:
        monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)  # conftest's HF_HUB_OFFLINE=1 blocks local calls too
        monkeypatch.setattr(constants, "HF_HUB_DISABLE_TELEMETRY", True)  # no agent-registry fetch in the user agent
        monkeypatch.setattr(constants, "ENDPOINT", fake.url)  # any default-endpoint URL lands on the fake
        monkeypatch.setattr(constants, "HF_HUB_DISABLE_XET", True)  # the legacy LFS protocol, which the fake speaks
        yield fake
        assert fake.unhandled == [] and fake.errors == []


@pytest.fixture
def model_folder(tmp_path):
    folder = write_files(tmp_path / "model", {**MODEL_FILES, **TRAINING_LEFTOVERS})
    write_model_card(folder, base_model="someone/base-sd", dataset="someone/shapes", prompts=["a red circle"])
    return folder


def expected_model_files(folder):
    return {**MODEL_FILES, "README.md": (folder / "README.md").read_bytes()}


# ----------------------------------------------------------------------------- push_folder


def test_push_folder_uploads_exactly_the_model_files(hub, model_folder):
    url = push_folder(model_folder, REPO, token=TOKEN, endpoint=hub.url)

    assert hub.files(REPO) == expected_model_files(model_folder)  # no optimizer, RNG, checkpoints, caches, logs
    weights = MODEL_FILES["unet/diffusion_pytorch_model.safetensors"]
    assert hashlib.sha256(weights).hexdigest() in hub.lfs  # the weights went through LFS, the rest inline
    assert hub.repos[REPO].commits[-1]["lfs"] == ["unet/diffusion_pytorch_model.safetensors"]
    assert load_safetensors(hub.files(REPO)["unet/diffusion_pytorch_model.safetensors"])["w"].shape == (3, 4)
    assert url == f"{hub.url}/{REPO}/commit/{hub.repos[REPO].commits[-1]['oid']}"
    assert "/api/validate-yaml" in hub.paths("POST")  # the card's metadata was checked by the "Hub"
    assert all(h.get("authorization") == f"Bearer {TOKEN}" for m, p, h in hub.requests if p.startswith("/api/"))


def test_push_folder_twice_reuses_the_repo(hub, model_folder):
    push_folder(model_folder, REPO, token=TOKEN, endpoint=hub.url, private=True)
    (model_folder / "unet" / "config.json").write_bytes(b'{"sample_size": 32}')
    push_folder(model_folder, REPO, token=TOKEN, endpoint=hub.url, commit_message="second")

    assert hub.paths("POST").count("/api/repos/create") == 2  # the 409 of the second is taken as "exists"
    assert hub.repos[REPO].private and len(hub.repos[REPO].commits) == 2
    assert hub.repos[REPO].commits[-1]["summary"] == "second"
    assert hub.files(REPO)["unet/config.json"] == b'{"sample_size": 32}'


def test_push_folder_to_a_branch_and_subfolder(hub, model_folder):
    push_folder(model_folder, REPO, token=TOKEN, endpoint=hub.url, revision="dev", path_in_repo="variants/a")

    assert hub.files(REPO, "main") == {}
    assert hub.files(REPO, "dev") == {f"variants/a/{k}": v for k, v in expected_model_files(model_folder).items()}


def test_push_folder_to_a_bare_name_lands_under_the_user(hub, model_folder):
    push_folder(model_folder, "tiny-sd", token=TOKEN, endpoint=hub.url)

    assert list(hub.repos) == [f"{hub.namespace}/tiny-sd"]
    assert hub.files(f"{hub.namespace}/tiny-sd") == expected_model_files(model_folder)


def test_push_folder_through_the_xet_enabled_client(hub, model_folder, monkeypatch):
    """With hf_xet installed, upload_folder takes its pipelined path; with regular-mode files it still commits here."""
    pytest.importorskip("hf_xet")
    import huggingface_hub._upload_pipeline as upload_pipeline

    calls, original = [], upload_pipeline.pipelined_upload
    monkeypatch.setattr(upload_pipeline, "pipelined_upload", lambda *a, **k: calls.append(1) or original(*a, **k))
    monkeypatch.setattr(constants, "HF_HUB_DISABLE_XET", False)
    hub.lfs_patterns = ()  # the fake cannot be a Xet storage backend: everything goes inline
    push_folder(model_folder, REPO, token=TOKEN, endpoint=hub.url)

    assert calls == [1]
    assert hub.files(REPO) == expected_model_files(model_folder)


def test_offline_mode_blocks_even_a_local_endpoint(hub, model_folder, monkeypatch):
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(OfflineModeIsEnabled):
        push_folder(model_folder, REPO, token=TOKEN, endpoint=hub.url)
    assert hub.requests == []


def test_select_upload_files_defaults(model_folder):
    assert select_upload_files(model_folder) == sorted(expected_model_files(model_folder))
    everything = select_upload_files(model_folder, allow_patterns=None, ignore_patterns=None)
    assert everything == sorted([*MODEL_FILES, *TRAINING_LEFTOVERS, "README.md"])


# ----------------------------------------------------------------------------- push_checkpoint_weights


def test_push_checkpoint_weights_goes_under_checkpoints_step_n(hub, tmp_path):
    weights = {"model.safetensors": save_safetensors({"w": torch.ones(3)}),
               "ema.safetensors": save_safetensors({"w": torch.full((3,), 0.5)})}
    checkpoint = write_files(tmp_path / "checkpoint-40", {
        **weights, "optimizer.bin": os.urandom(32), "scheduler.bin": os.urandom(8),
        "random_states_0.pkl": b"rng", "scaler.pt": b"amp", "training_state.json": b'{"global_step": 40}',
    })
    url = push_checkpoint_weights(checkpoint, REPO, 40, token=TOKEN, endpoint=hub.url)

    assert hub.files(REPO) == {f"checkpoints/step-40/{name}": data for name, data in weights.items()}
    assert hub.repos[REPO].commits[-1]["summary"] == "Checkpoint weights at step 40"
    assert url.startswith(f"{hub.url}/{REPO}/commit/")

    from latent_diffusion.training.checkpointing import checkpoint_weights  # what the training script logs as sent

    assert sorted(f"checkpoints/step-40/{n}" for n in checkpoint_weights(str(checkpoint))) == sorted(hub.files(REPO))


# ----------------------------------------------------------------------------- model card


def test_model_card_metadata_parses_back(tmp_path):
    folder = write_files(tmp_path / "model", MODEL_FILES)
    grid = tmp_path / "elsewhere" / "step-000100.png"
    grid.parent.mkdir()
    Image.new("RGB", (8, 4), "red").save(grid)
    prompts = ["a red circle above a blue square", "a green | triangle"]
    path = write_model_card(
        folder, base_model="someone/base-sd", dataset="someone/shapes", tags=["shapes", "text-to-image"],
        hyperparameters={"learning_rate": 1e-4, "train_batch_size": 8, "use_ema": True},
        metrics={"fid": 12.3456789, "clip_score": 0.31}, validation_grid=grid, prompts=prompts,
        description="Trained on the Shapes world.", model_id=REPO,
    )
    card = ModelCard.load(path)
    data = card.data.to_dict()

    assert path == str(folder / "README.md")
    assert data["license"] == "apache-2.0" and data["library_name"] == "diffusers"
    assert data["pipeline_tag"] == "text-to-image" and data["inference"] is True
    assert {"stable-diffusion", "text-to-image", "latent-diffusion", "shapes"} <= set(data["tags"])
    assert len(data["tags"]) == len(set(data["tags"]))
    assert data["base_model"] == "someone/base-sd" and data["datasets"] == ["someone/shapes"]
    assert [w["text"] for w in data["widget"]] == prompts
    body = card.text
    assert f'LatentDiffusionPipeline.from_pretrained("{REPO}")' in body
    assert f'StableDiffusionPipeline.from_pretrained("{REPO}"' in body
    assert "| learning_rate | 0.0001 |" in body and "| use_ema | True |" in body
    assert "| fid | 12.3457 |" in body and "| unet | diffusers.UNet2DConditionModel |" in body
    assert "![validation grid](validation_grid.png)" in body and "2. a green \\| triangle" in body
    assert (folder / "validation_grid.png").read_bytes() == grid.read_bytes()


def test_model_card_keeps_local_paths_out_of_the_metadata(tmp_path):
    folder = write_files(tmp_path / "model", MODEL_FILES)
    local_base = tmp_path / "base-model"
    local_base.mkdir()
    grid = folder / "validation_grid.png"  # already in place, as training/train_text2img.py leaves it
    Image.new("RGB", (4, 4)).save(grid)
    write_model_card(folder, base_model=str(local_base), dataset=str(tmp_path), validation_grid=grid)
    card = ModelCard.load(folder / "README.md")

    assert "base_model" not in card.data.to_dict() and "datasets" not in card.data.to_dict()
    assert f"`{local_base}` (local)" in card.text and "![validation grid](validation_grid.png)" in card.text
    assert 'from_pretrained("model")' in card.text  # the folder's name when no model_id is given


# ----------------------------------------------------------------------------- errors


@pytest.mark.parametrize("call, argument", [
    (lambda tmp: push_folder(tmp / "missing", REPO), "folder"),
    (lambda tmp: push_folder(tmp, "not a/valid/repo id"), "repo_id"),
    (lambda tmp: push_folder(tmp, "bad..name"), "repo_id"),
    (lambda tmp: push_folder(write_files(tmp / "m", {"optimizer.bin": b"x"}), REPO), "folder"),
    (lambda tmp: push_checkpoint_weights(tmp / "missing", REPO, 1), "checkpoint_dir"),
    (lambda tmp: push_checkpoint_weights(write_files(tmp / "c", {"optimizer.bin": b"x"}), REPO, 1), "checkpoint_dir"),
    (lambda tmp: push_checkpoint_weights(tmp, REPO, -1), "step"),
    (lambda tmp: write_model_card(tmp / "missing"), "folder"),
    (lambda tmp: write_model_card(tmp, validation_grid=tmp / "nope.png"), "validation_grid"),
])
def test_bad_arguments_raise_value_error_naming_them(tmp_path, call, argument, monkeypatch):
    monkeypatch.setattr(hubmod, "HfApi", None)  # no client is made: the checks come first
    with pytest.raises(ValueError, match=argument):
        call(tmp_path)
