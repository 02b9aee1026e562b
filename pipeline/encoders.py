"""Frozen encoders that give the off-the-shelf feature vector g of a degraded image (OSF).

`build_encoder("clip-vit-b32", weights=None, allow_random=True)` loads OpenCLIP weights from a
local file or folder, else from the Hugging Face cache (offline), else (demo only) falls back
to a seeded random initialisation and says so in its spec: `weights: random`.
Calling the encoder on a uint8 (H, W, 3) image returns g for its 4 flips: (4, D) float32.
"""
from __future__ import annotations

import logging
import os
import warnings
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from stores import encoder_id, sha256_file

log = logging.getLogger(__name__)

FLIPS = ("none", "h", "v", "hv")  # h flips width, v flips height; index = h + 2 * v
CHECKPOINT_NAMES = ("open_clip_model.safetensors", "open_clip_pytorch_model.bin")

# name -> (OpenCLIP architecture, pretrained tag). The paper's prior is OpenAI's ViT-B/32,
# whose checkpoint uses QuickGELU.
ALIASES = {"clip-vit-b32": ("ViT-B-32-quickgelu", "openai")}


class WeightsNotFound(RuntimeError):
    pass


class ClipEncoder:
    """OpenCLIP `encode_image`, L2-normalised, on the whole image resized to the model's input.

    Preprocessing as the paper's code needs it for stock ViTs: bicubic (antialiased) resize of
    the full image to image_size x image_size (no crop), then CLIP mean/std normalisation.
    """

    def __init__(self, name: str, arch: str, model: torch.nn.Module, weights: dict, device="cpu"):
        self.name, self.arch, self.weights = name, arch, weights
        self.model = model.eval().requires_grad_(False).to(device)
        self.device = device
        size = model.visual.image_size
        self.size = tuple(size) if isinstance(size, (tuple, list)) else (size, size)
        pp = getattr(model.visual, "preprocess_cfg", {}) or {}
        self.mean = tuple(pp.get("mean", (0.48145466, 0.4578275, 0.40821073)))
        self.std = tuple(pp.get("std", (0.26862954, 0.26130258, 0.27577711)))
        with torch.no_grad():
            self.dim = int(self.model.encode_image(torch.zeros(1, 3, *self.size, device=device)).shape[-1])

    def spec(self) -> dict:
        return {"encoder": encoder_id(self.name), "arch": self.arch, "library": "open_clip",
                "weights": self.weights["weights"], "weights_sha256": self.weights.get("sha256"),
                "init_seed": self.weights.get("init_seed"),
                "open_clip_version": _open_clip_version() if self.weights["weights"] == "random" else None,
                "preprocess": {"resize": list(self.size), "interpolation": "bicubic", "antialias": True,
                               "crop": None, "mean": list(self.mean), "std": list(self.std)},
                "output": "encode_image, L2-normalised", "dim": self.dim, "flips": list(FLIPS)}

    @torch.no_grad()
    def __call__(self, images: list[np.ndarray]) -> np.ndarray:
        """images: uint8 (H, W, 3) of any sizes -> g (N, 4, D) float32."""
        batch = torch.cat([self._views(img) for img in images])  # (4N, 3, S, S)
        mean = torch.tensor(self.mean, device=self.device).view(1, 3, 1, 1)
        std = torch.tensor(self.std, device=self.device).view(1, 3, 1, 1)
        g = self.model.encode_image((batch - mean) / std)
        g = F.normalize(g.float(), dim=-1)
        return g.view(len(images), len(FLIPS), -1).cpu().numpy()

    def _views(self, img: np.ndarray) -> torch.Tensor:
        x = torch.from_numpy(np.ascontiguousarray(img)).to(self.device).permute(2, 0, 1)[None].float() / 255
        x = F.interpolate(x, size=self.size, mode="bicubic", antialias=True, align_corners=False).clamp(0, 1)
        # flipping after the resize equals resizing the flipped image (the resize is symmetric)
        return torch.cat([x, x.flip(-1), x.flip(-2), x.flip(-1).flip(-2)])


def _open_clip_version() -> str:
    import open_clip

    return open_clip.__version__


SD_ENCODERS = ("sd-vae", "sd-unet")  # pipeline/sd_encoders.py; options after ':' (sd-unet:t=100:size=512)


def is_sd(name: str) -> bool:
    return name.split(":")[0] in SD_ENCODERS


def parse_encoder(name: str) -> tuple[str, str | None]:
    """`clip-vit-b32`, `openclip:<arch or local folder>[:<pretrained tag>]` -> (arch, tag);
    `sd-vae[:k=v...]`, `sd-unet[:k=v...]` -> (name, None) once its options are checked."""
    if is_sd(name):
        from .sd_encoders import parse_sd_encoder

        parse_sd_encoder(name)  # ValueError naming the bad option and the valid ones
        return name, None
    if name in ALIASES:
        return ALIASES[name]
    if name.startswith("openclip:"):
        rest = name[len("openclip:"):]
        arch, _, tag = rest.partition(":") if not Path(rest).is_dir() else (rest, "", "")
        return arch, tag or None
    known = (", ".join(sorted(ALIASES)) + ", openclip:<model>[:<tag>], openclip:<folder>, "
             "sd-vae[:k=v...], sd-unet[:k=v...]")
    raise ValueError(f"unknown encoder {name!r}; known: {known}")


def _hf_cached_checkpoint(arch: str, tag: str | None) -> Path | None:
    """The checkpoint of an OpenCLIP pretrained tag in the Hugging Face cache, if present."""
    if not tag:
        return None
    import open_clip
    from huggingface_hub import try_to_load_from_cache

    cfg = open_clip.get_pretrained_cfg(arch, tag) or {}
    repo = (cfg.get("hf_hub") or "").strip("/")
    for filename in CHECKPOINT_NAMES if repo else ():
        found = try_to_load_from_cache(repo, filename, cache_dir=_hf_home())
        if isinstance(found, str) and Path(found).is_file():
            return Path(found)
    return None


def _load_openclip(arch: str, tag: str | None, weights_path: str | None, allow_random: bool,
                   init_seed: int):
    import open_clip

    if Path(arch).is_dir():  # an OpenCLIP folder: open_clip_config.json + checkpoint
        ckpt = next((Path(arch) / n for n in CHECKPOINT_NAMES if (Path(arch) / n).is_file()), None)
        if ckpt is None:
            raise WeightsNotFound(f"{arch}: no {' or '.join(CHECKPOINT_NAMES)} in this OpenCLIP folder")
        model = open_clip.create_model(f"local-dir:{arch}")
        return model, {"weights": "pretrained", "sha256": sha256_file(ckpt), "path": str(ckpt),
                       "config_sha256": sha256_file(Path(arch) / "open_clip_config.json")}
    if weights_path:
        path = Path(weights_path)
        if not path.is_file():
            raise WeightsNotFound(f"--clip-weights {path}: no such file")
        model = open_clip.create_model(arch, pretrained=str(path))
        return model, {"weights": "pretrained", "sha256": sha256_file(path), "path": str(path)}
    cached = _hf_cached_checkpoint(arch, tag)
    if cached is not None:
        model = open_clip.create_model(arch, pretrained=str(cached))
        return model, {"weights": "pretrained", "sha256": sha256_file(cached), "path": str(cached)}
    where = f"--clip-weights (not given), the Hugging Face cache ({_hf_home()}) for {arch}:{tag}"
    if not allow_random:
        raise WeightsNotFound(f"no weights for {arch}: looked in {where}. Pass --clip-weights PATH "
                              f"(CLIP_WEIGHTS=PATH), or --allow-random-weights (ALLOW_RANDOM_WEIGHTS=1) to use a random "
                              f"initialisation (recorded as weights: random)")
    warnings.warn(f"no pre-trained weights for {arch} (looked in {where}); using a RANDOM "
                  f"initialisation (seed {init_seed}). The features are not CLIP's; the store key "
                  f"and every report say 'weights: random'.", stacklevel=2)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(init_seed)
        model = open_clip.create_model(arch, pretrained=None)
    return model, {"weights": "random", "init_seed": init_seed}


def _hf_home() -> str:
    return os.environ.get("HF_HUB_CACHE") or os.path.join(
        os.environ.get("HF_HOME", os.path.expanduser("~/.cache/huggingface")), "hub")


def build_encoder(name: str, weights: str | None = None, allow_random: bool = False,
                  init_seed: int = 0, device: str = "cpu"):
    """An encoder by name; `weights` is an OpenCLIP checkpoint, or for `sd-vae`/`sd-unet` a
    diffusers folder."""
    if is_sd(name):
        from .sd_encoders import build_sd_encoder  # diffusers is imported only when asked for

        return build_sd_encoder(name, weights, allow_random, init_seed, device)
    arch, tag = parse_encoder(name)
    model, info = _load_openclip(arch, tag, weights, allow_random, init_seed)
    if Path(arch).is_dir():  # the key holds the folder's content, not where it lies
        arch = f"open_clip_config.json sha256 {info['config_sha256']}"
    return ClipEncoder(name, arch, model, info, device)
