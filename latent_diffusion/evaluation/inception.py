"""The FID Inception-v3 network in plain torch, and loading its weights from a local file.

FID is defined in the feature space of one particular network: the TensorFlow
Inception-v3 of 2015-12-05, ported to PyTorch as
``pt_inception-2015-12-05-6726825d.pth`` (used by pytorch-fid and, through it,
by most published numbers). Its layout is torchvision's Inception3 with 1008
classes, no auxiliary head, and the TF graph's quirks:

- the average-pool branches of blocks 5b-7b ignore padding (``count_include_pad=False``);
- block 7c's pool branch is a max-pool, not an average-pool;
- BatchNorm ε = 0.001.

Parameter names here match that file's state dict, so it loads as it is.

Features: images x ∈ [0, 1] (B, 3, H, W) → bilinear resize to 299×299 →
2x − 1 ∈ [−1, 1] → the network up to global average pooling → (B, 2048).

Weights are read only from a local file: ``weights_path`` or the environment
variable ``LATENT_DIFFUSION_FID_WEIGHTS``, as ``.safetensors`` or as the
original ``.pth`` read with ``torch.load(weights_only=True)`` (tensors only;
nothing is unpickled).
"""
from __future__ import annotations

import os
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

WEIGHTS_ENV_VAR = "LATENT_DIFFUSION_FID_WEIGHTS"
WEIGHTS_FILENAME = "pt_inception-2015-12-05-6726825d.pth"
WEIGHTS_URL = f"https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/{WEIGHTS_FILENAME}"
INPUT_SIZE = 299
FEATURE_DIM = 2048
NUM_CLASSES = 1008


class FIDWeightsNotFoundError(RuntimeError):
    """No FID Inception weights were given or found; the message says how to provide them."""


def missing_weights_message(reason: str) -> str:
    """How to get and point at the FID Inception weights (we never download them ourselves)."""
    stem = WEIGHTS_FILENAME.rsplit(".", 1)[0]
    return (
        f"{reason}\n"
        "FID needs the FID Inception-v3 weights as a local file. To provide them:\n"
        f"  1. download {WEIGHTS_FILENAME} from\n     {WEIGHTS_URL}\n"
        f"  2. pass its path as weights_path=..., or set the environment variable\n"
        f"     {WEIGHTS_ENV_VAR}=/path/to/{WEIGHTS_FILENAME}\n"
        "  optionally convert it to safetensors once (then point at the .safetensors file):\n"
        f"     python -c \"import torch, safetensors.torch as st; st.save_file({{k: v.contiguous() for k, v in "
        f"torch.load('{WEIGHTS_FILENAME}', weights_only=True).items()}}, '{stem}.safetensors')\"\n"
        "Without these weights, FD-CLIP (Fréchet distance in a CLIP model's feature space) works offline; "
        "it is a different measure and must not be reported as FID."
    )


class BasicConv2d(nn.Module):
    """conv (no bias) → BatchNorm (ε = 0.001) → ReLU."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size, stride=1, padding=0):
        super().__init__()
        self.conv = nn.Conv2d(in_channels, out_channels, kernel_size, stride=stride, padding=padding, bias=False)
        self.bn = nn.BatchNorm2d(out_channels, eps=0.001)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.bn(self.conv(x)))


def _avg_pool_3x3(x: torch.Tensor) -> torch.Tensor:
    """3×3 stride-1 average pool that, like TF, averages only over real (unpadded) pixels."""
    return F.avg_pool2d(x, kernel_size=3, stride=1, padding=1, count_include_pad=False)


class InceptionA(nn.Module):
    """Block 5b/5c/5d: 1×1 | 1×1→5×5 | 1×1→3×3→3×3 | avg-pool→1×1; out = 224 + pool_features channels."""

    def __init__(self, in_channels: int, pool_features: int):
        super().__init__()
        self.branch1x1 = BasicConv2d(in_channels, 64, 1)
        self.branch5x5_1 = BasicConv2d(in_channels, 48, 1)
        self.branch5x5_2 = BasicConv2d(48, 64, 5, padding=2)
        self.branch3x3dbl_1 = BasicConv2d(in_channels, 64, 1)
        self.branch3x3dbl_2 = BasicConv2d(64, 96, 3, padding=1)
        self.branch3x3dbl_3 = BasicConv2d(96, 96, 3, padding=1)
        self.branch_pool = BasicConv2d(in_channels, pool_features, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b1 = self.branch1x1(x)
        b5 = self.branch5x5_2(self.branch5x5_1(x))
        b3 = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
        bp = self.branch_pool(_avg_pool_3x3(x))
        return torch.cat([b1, b5, b3, bp], dim=1)


class InceptionB(nn.Module):
    """Block 6a (grid reduction): 3×3/2 | 1×1→3×3→3×3/2 | max-pool/2; out = 480 + in_channels."""

    def __init__(self, in_channels: int):
        super().__init__()
        self.branch3x3 = BasicConv2d(in_channels, 384, 3, stride=2)
        self.branch3x3dbl_1 = BasicConv2d(in_channels, 64, 1)
        self.branch3x3dbl_2 = BasicConv2d(64, 96, 3, padding=1)
        self.branch3x3dbl_3 = BasicConv2d(96, 96, 3, stride=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b3 = self.branch3x3(x)
        bd = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
        bp = F.max_pool2d(x, kernel_size=3, stride=2)
        return torch.cat([b3, bd, bp], dim=1)


class InceptionC(nn.Module):
    """Blocks 6b-6e: factorized 7×7 convolutions (1×7 and 7×1); out = 768 channels."""

    def __init__(self, in_channels: int, channels_7x7: int):
        super().__init__()
        c7 = channels_7x7
        self.branch1x1 = BasicConv2d(in_channels, 192, 1)
        self.branch7x7_1 = BasicConv2d(in_channels, c7, 1)
        self.branch7x7_2 = BasicConv2d(c7, c7, (1, 7), padding=(0, 3))
        self.branch7x7_3 = BasicConv2d(c7, 192, (7, 1), padding=(3, 0))
        self.branch7x7dbl_1 = BasicConv2d(in_channels, c7, 1)
        self.branch7x7dbl_2 = BasicConv2d(c7, c7, (7, 1), padding=(3, 0))
        self.branch7x7dbl_3 = BasicConv2d(c7, c7, (1, 7), padding=(0, 3))
        self.branch7x7dbl_4 = BasicConv2d(c7, c7, (7, 1), padding=(3, 0))
        self.branch7x7dbl_5 = BasicConv2d(c7, 192, (1, 7), padding=(0, 3))
        self.branch_pool = BasicConv2d(in_channels, 192, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b1 = self.branch1x1(x)
        b7 = self.branch7x7_3(self.branch7x7_2(self.branch7x7_1(x)))
        bd = self.branch7x7dbl_1(x)
        for layer in (self.branch7x7dbl_2, self.branch7x7dbl_3, self.branch7x7dbl_4, self.branch7x7dbl_5):
            bd = layer(bd)
        bp = self.branch_pool(_avg_pool_3x3(x))
        return torch.cat([b1, b7, bd, bp], dim=1)


class InceptionD(nn.Module):
    """Block 7a (grid reduction): 1×1→3×3/2 | 1×1→1×7→7×1→3×3/2 | max-pool/2; out = 512 + in_channels."""

    def __init__(self, in_channels: int):
        super().__init__()
        self.branch3x3_1 = BasicConv2d(in_channels, 192, 1)
        self.branch3x3_2 = BasicConv2d(192, 320, 3, stride=2)
        self.branch7x7x3_1 = BasicConv2d(in_channels, 192, 1)
        self.branch7x7x3_2 = BasicConv2d(192, 192, (1, 7), padding=(0, 3))
        self.branch7x7x3_3 = BasicConv2d(192, 192, (7, 1), padding=(3, 0))
        self.branch7x7x3_4 = BasicConv2d(192, 192, 3, stride=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b3 = self.branch3x3_2(self.branch3x3_1(x))
        b7 = self.branch7x7x3_1(x)
        for layer in (self.branch7x7x3_2, self.branch7x7x3_3, self.branch7x7x3_4):
            b7 = layer(b7)
        bp = F.max_pool2d(x, kernel_size=3, stride=2)
        return torch.cat([b3, b7, bp], dim=1)


class InceptionE(nn.Module):
    """Blocks 7b/7c: expanded 1×3 / 3×1 branches; out = 2048 channels.

    `pool` is "avg" (7b, padding-free average as in TF) or "max" (7c: the TF graph max-pools here).
    """

    def __init__(self, in_channels: int, pool: str):
        super().__init__()
        if pool not in ("avg", "max"):
            raise ValueError(f"pool must be 'avg' or 'max'; got {pool!r}")
        self.pool = pool
        self.branch1x1 = BasicConv2d(in_channels, 320, 1)
        self.branch3x3_1 = BasicConv2d(in_channels, 384, 1)
        self.branch3x3_2a = BasicConv2d(384, 384, (1, 3), padding=(0, 1))
        self.branch3x3_2b = BasicConv2d(384, 384, (3, 1), padding=(1, 0))
        self.branch3x3dbl_1 = BasicConv2d(in_channels, 448, 1)
        self.branch3x3dbl_2 = BasicConv2d(448, 384, 3, padding=1)
        self.branch3x3dbl_3a = BasicConv2d(384, 384, (1, 3), padding=(0, 1))
        self.branch3x3dbl_3b = BasicConv2d(384, 384, (3, 1), padding=(1, 0))
        self.branch_pool = BasicConv2d(in_channels, 192, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b1 = self.branch1x1(x)
        b3 = self.branch3x3_1(x)
        b3 = torch.cat([self.branch3x3_2a(b3), self.branch3x3_2b(b3)], dim=1)
        bd = self.branch3x3dbl_2(self.branch3x3dbl_1(x))
        bd = torch.cat([self.branch3x3dbl_3a(bd), self.branch3x3dbl_3b(bd)], dim=1)
        pooled = _avg_pool_3x3(x) if self.pool == "avg" else F.max_pool2d(x, kernel_size=3, stride=1, padding=1)
        return torch.cat([b1, b3, bd, self.branch_pool(pooled)], dim=1)


class FIDInception(nn.Module):
    """Inception-v3 as FID defines it; `forward(images in [0, 1], (B, 3, H, W))` → pool features (B, 2048).

    `fc` (2048 → 1008 classes) is kept so the weights file loads strictly; `logits()` uses it.
    """

    measure_name = "FID"
    feature_dim = FEATURE_DIM

    def __init__(self):
        super().__init__()
        self.Conv2d_1a_3x3 = BasicConv2d(3, 32, 3, stride=2)
        self.Conv2d_2a_3x3 = BasicConv2d(32, 32, 3)
        self.Conv2d_2b_3x3 = BasicConv2d(32, 64, 3, padding=1)
        self.Conv2d_3b_1x1 = BasicConv2d(64, 80, 1)
        self.Conv2d_4a_3x3 = BasicConv2d(80, 192, 3)
        self.Mixed_5b = InceptionA(192, pool_features=32)
        self.Mixed_5c = InceptionA(256, pool_features=64)
        self.Mixed_5d = InceptionA(288, pool_features=64)
        self.Mixed_6a = InceptionB(288)
        self.Mixed_6b = InceptionC(768, channels_7x7=128)
        self.Mixed_6c = InceptionC(768, channels_7x7=160)
        self.Mixed_6d = InceptionC(768, channels_7x7=160)
        self.Mixed_6e = InceptionC(768, channels_7x7=192)
        self.Mixed_7a = InceptionD(768)
        self.Mixed_7b = InceptionE(1280, pool="avg")
        self.Mixed_7c = InceptionE(2048, pool="max")
        self.fc = nn.Linear(FEATURE_DIM, NUM_CLASSES)
        self.eval()

    @staticmethod
    def preprocess(images: torch.Tensor) -> torch.Tensor:
        """[0, 1] (B, 3, H, W) → bilinear resize to 299×299 → 2x − 1 ∈ [−1, 1]."""
        if images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"images must be (B, 3, H, W) RGB in [0, 1]; got shape {tuple(images.shape)}")
        x = F.interpolate(images, size=(INPUT_SIZE, INPUT_SIZE), mode="bilinear", align_corners=False)
        return 2.0 * x - 1.0

    def stem(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 3, 299, 299) → (B, 192, 35, 35)."""
        x = self.Conv2d_2b_3x3(self.Conv2d_2a_3x3(self.Conv2d_1a_3x3(x)))
        x = F.max_pool2d(x, kernel_size=3, stride=2)
        x = self.Conv2d_4a_3x3(self.Conv2d_3b_1x1(x))
        return F.max_pool2d(x, kernel_size=3, stride=2)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = self.stem(self.preprocess(images))  # (B, 192, 35, 35)
        x = self.Mixed_5d(self.Mixed_5c(self.Mixed_5b(x)))  # (B, 288, 35, 35)
        x = self.Mixed_6a(x)  # (B, 768, 17, 17)
        x = self.Mixed_6e(self.Mixed_6d(self.Mixed_6c(self.Mixed_6b(x))))  # (B, 768, 17, 17)
        x = self.Mixed_7c(self.Mixed_7b(self.Mixed_7a(x)))  # (B, 2048, 8, 8)
        return x.mean(dim=(2, 3))  # (B, 2048)

    def logits(self, images: torch.Tensor) -> torch.Tensor:
        """Class logits (B, 1008) of the 2015 TF classifier (used by Inception Score, not by FID)."""
        return self.fc(self.forward(images))


def resolve_weights_path(weights_path: str | os.PathLike | None = None) -> Path:
    """`weights_path`, else $LATENT_DIFFUSION_FID_WEIGHTS; raises FIDWeightsNotFoundError if neither names a file."""
    if weights_path is None:
        weights_path = os.environ.get(WEIGHTS_ENV_VAR) or None
        if weights_path is None:
            reason = f"No FID weights given: weights_path is None and ${WEIGHTS_ENV_VAR} is not set."
            raise FIDWeightsNotFoundError(missing_weights_message(reason))
    path = Path(weights_path).expanduser()
    if not path.is_file():
        raise FIDWeightsNotFoundError(missing_weights_message(f"FID weights file not found: {str(path)!r}."))
    return path


def load_state_dict_file(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Tensors from `.safetensors`, or `.pth`/`.pt`/`.bin` via torch.load(weights_only=True): no pickled objects."""
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path), device="cpu")
    if suffix in (".pth", ".pt", ".bin"):
        state = torch.load(str(path), map_location="cpu", weights_only=True)
        if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
            raise ValueError(f"weights file {str(path)!r} does not hold a flat state dict of tensors")
        return state
    raise ValueError(f"weights_path must end in .safetensors, .pth, .pt or .bin; got {str(path)!r}")


def load_fid_inception(weights_path: str | os.PathLike | None = None,
                       device: str | torch.device | None = None) -> FIDInception:
    """The FID Inception network with weights from `weights_path` or $LATENT_DIFFUSION_FID_WEIGHTS, in eval mode.

    `device` defaults to CUDA when available. Raises FIDWeightsNotFoundError (a RuntimeError) saying how to
    get the weights when neither names a file.
    """
    path = resolve_weights_path(weights_path)
    model = FIDInception()
    load_weights(model, load_state_dict_file(path), source=str(path))
    device = device if device is not None else ("cuda" if torch.cuda.is_available() else "cpu")
    return model.to(device).eval()


def load_weights(model: FIDInception, state_dict: dict[str, torch.Tensor], source: str = "state_dict") -> None:
    """Load strictly, except BatchNorm's `num_batches_tracked` counters (absent from older files, unused in eval)."""
    result = model.load_state_dict(state_dict, strict=False)
    missing = [k for k in result.missing_keys if not k.endswith("num_batches_tracked")]
    if missing or result.unexpected_keys:
        raise ValueError(
            f"{source} is not an FID Inception-v3 state dict: missing {missing[:5]} ({len(missing)} in all), "
            f"unexpected {result.unexpected_keys[:5]} ({len(result.unexpected_keys)} in all)"
        )
