"""Evaluation measures: Fréchet distance, the FID Inception, FID / FD-CLIP, CLIP score, resources.

Everything is built offline from config: a random FID Inception, a tiny random CLIP model with a
tokenizer trained on a few captions. scipy appears only here, as an independent reference.
"""
import mmap
import time
import warnings

import numpy as np
import pytest
import torch
from PIL import Image

from latent_diffusion.evaluation import (
    WEIGHTS_ENV_VAR,
    CLIPImageEmbedder,
    CLIPScorer,
    FIDInception,
    FIDWeightsNotFoundError,
    clip_score,
    compute_fd_clip,
    compute_fid,
    feature_statistics,
    frechet_distance,
    image_features,
    load_fid_inception,
    load_reference_statistics,
    measure,
    measure_name,
    save_reference_statistics,
)
from latent_diffusion.evaluation.images import iter_images

CAPTIONS = ["a red circle", "a blue square above a green triangle", "two yellow stars", "a small purple circle"]
CLIP_SIZE = 32


# ---------------------------------------------------------------- helpers and fixtures


def scipy_frechet(mu1, sigma1, mu2, sigma2):
    """The textbook formula with scipy's general matrix square root (independent of our eigen route)."""
    from scipy import linalg

    covmean = linalg.sqrtm(sigma1 @ sigma2)
    diff = mu1 - mu2
    return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2 * np.trace(np.real(covmean)))


def random_covariance(rng, dim, rank=None):
    factor = rng.standard_normal((dim, rank or dim))
    return factor @ factor.T / dim


def random_images(n, size=40, seed=0):
    """uint8 (n, size, size, 3) with varied content so features differ."""
    rng = np.random.default_rng(seed)
    return rng.integers(0, 256, size=(n, size, size, 3), dtype=np.uint8)


def save_image_folder(folder, images):
    folder.mkdir(parents=True, exist_ok=True)
    for i, image in enumerate(images):
        Image.fromarray(image).save(folder / f"{i:03d}.png")
    return folder


def _image_processor():
    import transformers

    processor_class = getattr(transformers, "CLIPImageProcessorPil", None) or transformers.CLIPImageProcessor
    return processor_class(size={"shortest_edge": CLIP_SIZE}, crop_size={"height": CLIP_SIZE, "width": CLIP_SIZE})


def _tiny_clip_config(tokenizer):
    from transformers import CLIPConfig

    tower = dict(hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4)
    text = dict(tower, vocab_size=len(tokenizer), max_position_embeddings=77,
                bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                pad_token_id=tokenizer.pad_token_id)
    vision = dict(tower, image_size=CLIP_SIZE, patch_size=8)
    return CLIPConfig(text_config=text, vision_config=vision, projection_dim=16)


@pytest.fixture(scope="module")
def clip_folder(tmp_path_factory):
    """A tiny random CLIPModel + tokenizer + image processor, saved as a model folder."""
    from transformers import CLIPModel

    from latent_diffusion.text.tokenizers import train_clip_tokenizer

    folder = tmp_path_factory.mktemp("tiny-clip")
    tokenizer = train_clip_tokenizer(CAPTIONS * 5, vocab_size=80)
    torch.manual_seed(0)
    CLIPModel(_tiny_clip_config(tokenizer)).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    _image_processor().save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def clip_vision_folder(tmp_path_factory):
    """A vision-only CLIP tower saved without an image processor (the default preprocessing is used)."""
    from transformers import CLIPVisionConfig, CLIPVisionModel

    folder = tmp_path_factory.mktemp("tiny-clip-vision")
    torch.manual_seed(1)
    config = CLIPVisionConfig(hidden_size=24, intermediate_size=30, num_hidden_layers=1, num_attention_heads=2,
                              image_size=CLIP_SIZE, patch_size=8)
    CLIPVisionModel(config).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def inception():
    torch.manual_seed(0)
    return FIDInception()


# ---------------------------------------------------------------- Fréchet distance


def test_feature_statistics_match_numpy():
    x = np.random.default_rng(0).standard_normal((50, 7))
    mu, sigma = feature_statistics(x)
    np.testing.assert_allclose(mu, x.mean(0))
    np.testing.assert_allclose(sigma, np.cov(x, rowvar=False))
    assert mu.dtype == sigma.dtype == np.float64


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_frechet_distance_matches_scipy_on_random_covariances(seed):
    rng = np.random.default_rng(seed)
    dim = 24
    mu1, mu2 = rng.standard_normal(dim), rng.standard_normal(dim)
    sigma1, sigma2 = random_covariance(rng, dim), random_covariance(rng, dim)
    expected = scipy_frechet(mu1, sigma1, mu2, sigma2)
    assert frechet_distance(mu1, sigma1, mu2, sigma2) == pytest.approx(expected, rel=1e-8, abs=1e-9)


def test_frechet_distance_near_singular_covariances():
    """Rank-deficient covariances (fewer samples than dimensions, as in small FID runs) stay finite and accurate."""
    rng = np.random.default_rng(3)
    dim = 32
    sigma1 = random_covariance(rng, dim, rank=5) + 1e-9 * np.eye(dim)
    sigma2 = random_covariance(rng, dim, rank=7) + 1e-9 * np.eye(dim)
    mu1, mu2 = rng.standard_normal(dim), rng.standard_normal(dim)
    ours = frechet_distance(mu1, sigma1, mu2, sigma2)
    assert np.isfinite(ours) and ours >= 0
    assert ours == pytest.approx(scipy_frechet(mu1, sigma1, mu2, sigma2), rel=1e-5)
    features = rng.standard_normal((6, dim))  # exactly singular: N − 1 = 5 < D
    mu, sigma = feature_statistics(features)
    assert frechet_distance(mu, sigma, mu, sigma) == pytest.approx(0.0, abs=1e-6 * np.trace(sigma))


def test_frechet_distance_closed_forms():
    rng = np.random.default_rng(4)
    dim = 16
    mu, sigma = rng.standard_normal(dim), random_covariance(rng, dim)
    assert frechet_distance(mu, sigma, mu, sigma) == pytest.approx(0.0, abs=1e-9)
    shift = rng.standard_normal(dim)
    assert frechet_distance(mu, sigma, mu + shift, sigma) == pytest.approx(shift @ shift, rel=1e-9)
    a, b = rng.uniform(0.1, 2, dim), rng.uniform(0.1, 2, dim)  # commuting (diagonal): Σ (√a − √b)²
    expected = np.sum((np.sqrt(a) - np.sqrt(b)) ** 2)
    assert frechet_distance(mu, np.diag(a), mu, np.diag(b)) == pytest.approx(expected, rel=1e-9)


def test_frechet_distance_rejects_bad_shapes():
    with pytest.raises(ValueError, match="feature dimensions differ"):
        frechet_distance(np.zeros(3), np.eye(3), np.zeros(4), np.eye(4))
    with pytest.raises(ValueError, match="sigma1"):
        frechet_distance(np.zeros(3), np.ones((3, 2)), np.zeros(3), np.eye(3))
    with pytest.raises(ValueError, match="at least 2 samples"):
        feature_statistics(np.ones((1, 4)))


# ---------------------------------------------------------------- FID Inception


def test_inception_features_shape(inception):
    images = torch.rand(2, 3, 64, 48)
    features = image_features(inception, images, batch_size=2)
    assert features.shape == (2, 2048) and np.all(np.isfinite(features))
    assert measure_name(inception) == "FID"
    sd = inception.state_dict()
    assert sd["fc.weight"].shape == (1008, 2048)
    assert sd["Mixed_7c.branch3x3dbl_3b.conv.weight"].shape == (384, 384, 3, 1)
    assert sd["Conv2d_1a_3x3.bn.running_var"].shape == (32,)
    # torchvision's Inception3 without the aux head has 23,834,568 parameters for 1000 classes; 8 more classes here
    assert sum(p.numel() for p in inception.parameters()) == 23_834_568 + 8 * 2048 + 8


def _perturbed_state_dict(model):
    """The model's state dict with non-trivial BatchNorm statistics, so a load that drops them would show."""
    generator = torch.Generator().manual_seed(0)
    state = {}
    for key, value in model.state_dict().items():
        if key.endswith(("running_mean", "running_var")):
            value = value + 0.1 * torch.rand(value.shape, generator=generator)
        state[key] = value.clone().contiguous()
    return state


def test_inception_weights_round_trip(tmp_path, inception):
    from safetensors.torch import save_file

    state = _perturbed_state_dict(inception)
    save_file(state, str(tmp_path / "fid.safetensors"))
    torch.save({k: v for k, v in state.items() if not k.endswith("num_batches_tracked")}, tmp_path / "fid.pth")
    for name in ("fid.safetensors", "fid.pth"):  # the .pth lacks num_batches_tracked, like older files
        loaded = load_fid_inception(tmp_path / name, device="cpu").state_dict()
        for key, value in state.items():
            if not key.endswith("num_batches_tracked"):
                assert torch.equal(loaded[key], value), (name, key)


def test_inception_weights_from_env_var(tmp_path, inception, monkeypatch):
    torch.save(inception.state_dict(), tmp_path / "weights.pth")
    monkeypatch.setenv(WEIGHTS_ENV_VAR, str(tmp_path / "weights.pth"))
    assert isinstance(load_fid_inception(device="cpu"), FIDInception)


def test_inception_rejects_pickled_objects_and_wrong_state_dicts(tmp_path):
    torch.save({"weight": torch.zeros(1), "payload": Image.new("RGB", (1, 1))}, tmp_path / "evil.pth")
    with pytest.raises(Exception):  # weights_only refuses to rebuild arbitrary classes
        load_fid_inception(tmp_path / "evil.pth", device="cpu")
    torch.save({"weight": torch.zeros(1)}, tmp_path / "wrong.pth")
    with pytest.raises(ValueError, match="not an FID Inception-v3 state dict"):
        load_fid_inception(tmp_path / "wrong.pth", device="cpu")
    (tmp_path / "weights.ckpt").write_bytes(b"")
    with pytest.raises(ValueError, match="weights_path must end in"):
        load_fid_inception(tmp_path / "weights.ckpt", device="cpu")


def test_missing_fid_weights_error_says_how_to_get_them(monkeypatch, tmp_path):
    monkeypatch.delenv(WEIGHTS_ENV_VAR, raising=False)
    with pytest.raises(FIDWeightsNotFoundError) as info:
        load_fid_inception()
    message = str(info.value)
    assert isinstance(info.value, RuntimeError)
    for needle in (WEIGHTS_ENV_VAR, "pt_inception-2015-12-05-6726825d.pth", "https://", "safetensors", "weights_only"):
        assert needle in message
    with pytest.raises(FIDWeightsNotFoundError, match="not found"):
        load_fid_inception(tmp_path / "nowhere.safetensors")
    with pytest.raises(FIDWeightsNotFoundError):
        compute_fid(random_images(2), (np.zeros(2048), np.eye(2048)))


# ---------------------------------------------------------------- FID / FD-CLIP


class MeanColor(torch.nn.Module):
    """A toy extractor: mean and std of each channel, (B, 6)."""

    def forward(self, images):
        return torch.cat([images.mean(dim=(2, 3)), images.std(dim=(2, 3))], dim=1)


def test_compute_fid_with_any_extractor(tmp_path):
    images = random_images(8)
    folder = save_image_folder(tmp_path / "ref", images)
    assert compute_fid(images, folder, extractor=MeanColor()) == pytest.approx(0.0, abs=1e-9)
    assert measure_name(MeanColor()) == "FD"
    darker = (images // 2).astype(np.uint8)
    assert compute_fid(darker, folder, extractor=MeanColor()) > 0.01


def test_fd_clip_matches_direct_computation(tmp_path, clip_folder):
    from transformers import AutoImageProcessor, CLIPModel

    generated, reference = random_images(6, seed=1), random_images(7, size=48, seed=2)
    ref_folder = save_image_folder(tmp_path / "ref", reference)
    extractor = CLIPImageEmbedder(clip_folder, device="cpu")
    assert measure_name(extractor) == "FD-CLIP"
    fd = compute_fid(list(map(Image.fromarray, generated)), ref_folder, extractor=extractor, batch_size=4)

    model, processor = CLIPModel.from_pretrained(clip_folder).eval(), AutoImageProcessor.from_pretrained(clip_folder)
    with torch.no_grad():
        outs = [model.get_image_features(pixel_values=processor(images=list(x), return_tensors="pt")["pixel_values"])
                for x in (generated, reference)]
    # transformers 4 returns the projected embeddings; 5 returns an output whose pooler_output holds them
    feats = [out if isinstance(out, torch.Tensor) else out.pooler_output for out in outs]
    expected = frechet_distance(*feature_statistics(feats[0].double()), *feature_statistics(feats[1].double()))
    assert fd == pytest.approx(expected, rel=1e-4)
    assert compute_fd_clip(generated, ref_folder, clip_folder, device="cpu") == pytest.approx(fd, rel=1e-6)


def test_reference_statistics_round_trip_and_guard(tmp_path, clip_folder, clip_vision_folder):
    images = random_images(5, seed=3)
    folder = save_image_folder(tmp_path / "ref", images)
    extractor = CLIPImageEmbedder(clip_folder, device="cpu")
    stats_path = save_reference_statistics(folder, tmp_path / "stats" / "ref.npz", extractor=extractor)
    mu, sigma, measure_label = load_reference_statistics(stats_path)
    assert measure_label == "FD-CLIP" and mu.shape == (16,) and sigma.shape == (16, 16)
    assert compute_fid(images, stats_path, extractor=extractor) == pytest.approx(0.0, abs=1e-6)
    np.savez(tmp_path / "fid.npz", mu=mu, sigma=sigma, measure=np.array("FID"))
    with pytest.raises(ValueError, match="holds FID statistics"):
        compute_fid(images, tmp_path / "fid.npz", extractor=extractor)
    np.savez(tmp_path / "plain.npz", mu=mu, sigma=sigma)  # pytorch-fid's format: no measure recorded
    assert compute_fid(images, tmp_path / "plain.npz", extractor=extractor) == pytest.approx(0.0, abs=1e-6)

    vision = CLIPImageEmbedder(clip_vision_folder, device="cpu")  # no projection, no processor file
    assert image_features(vision, images).shape == (5, 24)


# ---------------------------------------------------------------- CLIP score


def direct_clip_score(folder, images, prompts):
    """100 · max(cos, 0), averaged, from CLIPModel.forward's normalized embeddings."""
    from transformers import AutoImageProcessor, AutoTokenizer, CLIPModel

    model = CLIPModel.from_pretrained(folder).eval()
    pixels = AutoImageProcessor.from_pretrained(folder)(images=list(images), return_tensors="pt")["pixel_values"]
    tokens = AutoTokenizer.from_pretrained(folder)(prompts, padding=True, return_tensors="pt")
    with torch.no_grad():
        out = model(pixel_values=pixels, input_ids=tokens["input_ids"], attention_mask=tokens["attention_mask"])
    cosine = (out.image_embeds * out.text_embeds).sum(-1).double().numpy()
    return 100 * np.maximum(cosine, 0)


def test_clip_score_matches_formula(clip_folder):
    images = random_images(5, seed=5)
    prompts = [CAPTIONS[i % len(CAPTIONS)] for i in range(5)]
    expected = direct_clip_score(clip_folder, images, prompts)
    scorer = CLIPScorer(clip_folder, device="cpu")
    np.testing.assert_allclose(scorer.scores(images, prompts, batch_size=2), expected, rtol=1e-4, atol=1e-4)
    assert scorer(images, prompts, batch_size=5) == pytest.approx(expected.mean(), rel=1e-4, abs=1e-4)
    as_tensor = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255
    assert clip_score(as_tensor, prompts, clip_folder, batch_size=3, device="cpu") == pytest.approx(
        expected.mean(), rel=1e-4, abs=1e-4)


def test_clip_score_input_checks(clip_folder, clip_vision_folder):
    scorer = CLIPScorer(clip_folder, device="cpu")
    with pytest.raises(ValueError, match="one prompt per image"):
        scorer(random_images(3), CAPTIONS[:2])
    with pytest.raises(ValueError, match="one prompt per image"):
        scorer(random_images(2), CAPTIONS[:3])
    with pytest.raises(ValueError, match="clip_vision_model"):
        CLIPScorer(clip_vision_folder, device="cpu")
    with pytest.warns(UserWarning, match="truncated"):
        score = scorer(random_images(1), [" ".join(CAPTIONS * 20)])
    assert 0.0 <= score <= 100.0


# ---------------------------------------------------------------- images


def test_image_inputs_agree(tmp_path):
    images = random_images(3, size=16)
    folder = save_image_folder(tmp_path / "imgs", images)
    forms = [images, list(map(Image.fromarray, images)), folder,
             torch.from_numpy(images).permute(0, 3, 1, 2), images.astype(np.float32) / 255]
    reference = torch.stack(list(iter_images(images)))
    for form in forms:
        torch.testing.assert_close(torch.stack(list(iter_images(form))), reference, atol=1e-6, rtol=0)
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        list(iter_images(torch.rand(1, 3, 8, 8) * 2 - 1))
    with pytest.raises(ValueError, match="no images"):
        list(iter_images(tmp_path))


# ---------------------------------------------------------------- resources


def test_measure_sleep():
    result = measure(time.sleep, 0.05, warmup=0, repeats=2, device="cpu")
    assert result.seconds >= 0.04
    assert len(result.times) == 2 and result.memory_kind == "cpu_rss_approx"


def test_measure_large_allocation():
    size = 128 * 1024 * 1024

    def allocate():
        # fresh anonymous pages: malloc could hand back memory an earlier test freed and RSS still counts
        block = mmap.mmap(-1, size)
        view = np.frombuffer(block, dtype=np.uint8)
        view[:] = 1  # touched, so resident
        time.sleep(0.05)
        del view
        block.close()

    result = measure(allocate, warmup=0, repeats=1, device="cpu")
    assert result.peak_increase_bytes >= size // 2
    assert result.peak_bytes >= result.peak_increase_bytes
    small = measure(lambda: None, warmup=0, repeats=3, device="cpu")
    assert small.peak_increase_bytes < size // 2


def test_measure_rejects_bad_arguments():
    with pytest.raises(ValueError, match="repeats"):
        measure(lambda: None, repeats=0, device="cpu")
    with pytest.raises(ValueError, match="warmup"):
        measure(lambda: None, warmup=-1, device="cpu")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        measure(lambda x, y=0: x + y, 1, y=2, warmup=1, repeats=1, device="cpu")
