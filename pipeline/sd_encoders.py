"""Stable Diffusion priors as OSF g: `python -m pipeline features --encoder sd-unet --sd-weights DIR`.

The paper's "-s" prior uses Stable Diffusion features without saying which; here the prior is a
1-D vector pooled from SD features of lq, and everything that defines it is in `spec()` (and so
in the store key and manifest):

- `sd-vae`: g = [mean, std] over space of each channel of the VAE latent (D = 2 x 4 = 8 for SD's
  VAE). The latent is an 8x downsampled, perceptually compressed image; its first two moments
  per channel summarise brightness/colour (mean) and contrast/texture energy (std), which is
  what blur, noise and low light change. `layer=encoder.mid_block` pools the VAE encoder's
  512-channel mid block instead (D = 1024), a richer vector for the same cost.
- `sd-unet`: the same latent, fed *clean* (no noise added, so g is deterministic without a seed)
  to the UNet at timestep t (default 50 of 1000) with an empty prompt; g = mean over space of
  the `mid_block` output (D = 1280 for SD 1.x). The empty prompt is the real CLIP embedding of ""
  when the weights folder has `text_encoder/` + `tokenizer/` and `transformers` is installed,
  else a zero tensor (1, 77, cross_attention_dim): SD's to_k/to_v have no bias, so zero context
  makes every cross-attention add only its output bias (no text signal at all; this differs from
  SD's real "" embedding, and the spec says which one was used).

Both: lq resized as a whole (bicubic, antialiased, no crop) to size x size (default 256), scaled to
[-1, 1]; latent = (vae.encode(x).latent_dist.mean - shift_factor) * scaling_factor (the mean, never
a sample); g is NOT L2-normalised (PTG-RM maps g through an MLP); 4 flips as in `ClipEncoder`.
Options go into the name: `sd-unet:t=100:size=512:layer=down_blocks.3:pool=meanstd:dtype=float16:
repo=<hf repo id>`. Weights: `weights=DIR` (diffusers `save_pretrained` layout with `vae/` and
`unet/`, or a VAE-only folder), else the Hugging Face cache (offline), else (demo only) SD 1.5's
architecture with a seeded random initialisation, recorded as `weights: random`.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import warnings
from pathlib import Path

import numpy as np
import torch

from common.runtime import cudnn_benchmark
from ptgrm.images import FLIPS, batch_views
from stores import canonical_json, sha256_file

from .names import SD_NAMES
from .weights import WeightsNotFound, hf_home

DEFAULT_REPO = "stable-diffusion-v1-5/stable-diffusion-v1-5"
LEGACY_REPOS = ("runwayml/stable-diffusion-v1-5",)  # looked up too when repo= is not given
COMMON = {"size": 256, "pool": "meanstd", "repo": DEFAULT_REPO, "dtype": "float32"}
DEFAULTS = {
    "sd-vae": {**COMMON, "layer": "latent"},
    "sd-unet": {**COMMON, "layer": "mid_block", "pool": "mean", "t": 50},
}
POOLS = {"mean": "mean over space", "meanstd": "mean over space, then std over space (population)"}
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
PROMPT_LEN = 77  # CLIP's context length in SD 1.x/2.x
# weight files in the order the libraries pick them (fp16 `variant` files are not used)
DIFFUSERS_FILES = (
    "diffusion_pytorch_model.safetensors",
    "diffusion_pytorch_model.safetensors.index.json",
    "diffusion_pytorch_model.bin",
)
TRANSFORMERS_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin")

# stable-diffusion-v1-5 vae/config.json and unet/config.json (the random fallback's architecture)
SD15_VAE = {
    "in_channels": 3,
    "out_channels": 3,
    "latent_channels": 4,
    "layers_per_block": 2,
    "block_out_channels": [128, 256, 512, 512],
    "down_block_types": ["DownEncoderBlock2D"] * 4,
    "up_block_types": ["UpDecoderBlock2D"] * 4,
    "act_fn": "silu",
    "norm_num_groups": 32,
    "sample_size": 512,
    "scaling_factor": 0.18215,
}
SD15_UNET = {
    "in_channels": 4,
    "out_channels": 4,
    "sample_size": 64,
    "layers_per_block": 2,
    "block_out_channels": [320, 640, 1280, 1280],
    "attention_head_dim": 8,
    "cross_attention_dim": 768,
    "down_block_types": ["CrossAttnDownBlock2D"] * 3 + ["DownBlock2D"],
    "up_block_types": ["UpBlock2D"] + ["CrossAttnUpBlock2D"] * 3,
    "act_fn": "silu",
    "center_input_sample": False,
    "downsample_padding": 1,
    "flip_sin_to_cos": True,
    "freq_shift": 0,
    "mid_block_scale_factor": 1,
    "norm_eps": 1e-05,
    "norm_num_groups": 32,
}


def parse_sd_encoder(name: str) -> tuple[str, dict]:
    """`sd-unet:t=100:size=512` -> ("sd-unet", all options with defaults filled in, typed). Options are
    separated by ':' because ',' separates encoders in `--encoder clip-vit-b32,sd-unet`."""
    base, _, rest = name.partition(":")
    if base not in SD_NAMES:
        raise ValueError(f"not a Stable Diffusion encoder: {name!r} (known: {', '.join(SD_NAMES)})")
    opts = dict(DEFAULTS[base])
    for item in filter(None, rest.split(":")):
        key, eq, value = item.partition("=")
        if not eq or key not in opts:
            raise ValueError(
                f"{name!r}: bad option {item!r}; options of {base}: "
                + ", ".join(f"{k}=<{v}>" for k, v in DEFAULTS[base].items())
            )
        opts[key] = type(DEFAULTS[base][key])(value)
    if opts["size"] <= 0 or opts["size"] % 8:
        raise ValueError(f"{name!r}: size must be a positive multiple of 8, got {opts['size']}")
    if opts["pool"] not in POOLS or opts["dtype"] not in DTYPES:
        raise ValueError(
            f"{name!r}: pool must be one of {sorted(POOLS)}, dtype one of {sorted(DTYPES)}"
        )
    if not 0 <= opts.get("t", 0) < 1000:
        raise ValueError(f"{name!r}: t must be in [0, 1000), got {opts['t']}")
    return base, opts


def canonical_name(base: str, opts: dict) -> str:
    """The name that rebuilds this encoder (`make restore`): non-default options, sorted."""
    diff = [f"{k}={v}" for k, v in sorted(opts.items()) if v != DEFAULTS[base][k]]
    return ":".join([base] + diff)


class _Stop(Exception):
    """Raised by a forward hook once the wanted layer ran: the rest of the network is skipped."""


def _hooked(model: torch.nn.Module, layer: str, run) -> torch.Tensor:
    """The output of `model.<layer>` during `run()` (the first tensor if it returns a tuple)."""
    box = []

    def hook(_module, _inputs, out):
        box.append(out[0] if isinstance(out, (tuple, list)) else out)
        raise _Stop

    try:
        handle = model.get_submodule(layer).register_forward_hook(hook)
    except AttributeError:
        raise ValueError(f"no layer {layer!r} in {type(model).__name__}") from None
    try:
        run()
    except _Stop:
        pass
    finally:
        handle.remove()
    if not box:
        raise RuntimeError(f"layer {layer!r} did not run")
    return box[0]


def _prepare(model: torch.nn.Module, device, dtype) -> torch.nn.Module:
    model = model.eval().requires_grad_(False).to(device)
    return model if dtype == torch.float32 else model.to(dtype)  # loaded as float32


class SDVaeEncoder:
    """g from the SD VAE (module docstring): pooled latent (or `layer` of the VAE), 4 flips."""

    arch = "diffusers AutoencoderKL"

    def __init__(self, name: str, vae, weights: dict, device="cpu", max_batch: int = 16):
        base, self.opts = parse_sd_encoder(name)
        self.name = canonical_name(base, self.opts)
        self.weights, self.device, self.max_batch = weights, device, max_batch
        self.dtype = DTYPES[self.opts["dtype"]]
        # SD's VAE overflows in float16; its config asks to run it in float32 (as diffusers' pipelines do)
        upcast = self.dtype == torch.float16 and getattr(vae.config, "force_upcast", False)
        self.vae_dtype = torch.float32 if upcast else self.dtype
        self.vae = _prepare(vae, device, self.vae_dtype)
        self.scaling_factor = float(vae.config.scaling_factor)
        self.shift_factor = float(getattr(vae.config, "shift_factor", None) or 0.0)
        probe = min(self.opts["size"], 64)  # D does not depend on the size; 64 px is cheap
        with torch.no_grad():
            self.dim = int(self._pooled(torch.zeros(1, 3, probe, probe, device=device)).shape[-1])

    def _latent(self, x: torch.Tensor) -> torch.Tensor:
        mean = self.vae.encode(x.to(self.vae_dtype)).latent_dist.mean
        return ((mean - self.shift_factor) * self.scaling_factor).to(self.dtype)

    def _feature_map(self, x: torch.Tensor) -> torch.Tensor:
        if self.opts["layer"] == "latent":
            return self._latent(x)
        return _hooked(self.vae, self.opts["layer"], lambda: self.vae.encode(x.to(self.vae_dtype)))

    def _pooled(self, x: torch.Tensor) -> torch.Tensor:
        f = self._feature_map(x).float()
        mean = f.mean(dim=(-2, -1))
        if self.opts["pool"] == "mean":
            return mean
        return torch.cat([mean, f.std(dim=(-2, -1), unbiased=False)], dim=-1)

    @torch.no_grad()
    def __call__(self, images: list[np.ndarray]) -> np.ndarray:
        """images: uint8 (H, W, 3) of any sizes -> g (N, 4, D) float32."""
        size, step = (self.opts["size"],) * 2, max(1, self.max_batch // len(FLIPS))
        with cudnn_benchmark(str(self.device).startswith("cuda")):  # one input size
            g = torch.cat(  # views made per network call: at most max_batch of them live at once
                [
                    self._pooled(batch_views(images[i : i + step], size, self.device) * 2 - 1)
                    for i in range(0, len(images), step)
                ]
            )  # (4N, D); views in [-1, 1]
        return g.view(len(images), len(FLIPS), -1).cpu().numpy()

    def spec(self) -> dict:
        w, size = self.weights, self.opts["size"]
        return {
            "encoder": self.name.split(":")[0],
            "arch": self.arch,
            "library": "diffusers",
            "weights": w["weights"],
            "weights_sha256": w.get("sha256"),
            "weights_files": w.get("files"),
            "init_seed": w.get("init_seed"),
            "diffusers_version": w.get("diffusers_version"),
            "model_config_sha256": w.get("config_sha256"),
            "preprocess": {
                "resize": [size, size],
                "interpolation": "bicubic",
                "antialias": True,
                "crop": None,
                "range": [-1, 1],
            },
            "latent": "(vae.encode(x).latent_dist.mean - shift_factor) * scaling_factor (mean, no sample)",
            "scaling_factor": self.scaling_factor,
            "shift_factor": self.shift_factor,
            "layer": self._layer_desc(),
            "pool": POOLS[self.opts["pool"]],
            "output": "unnormalised (no L2)",
            "dtype": self.opts["dtype"],
            "vae_dtype": str(self.vae_dtype).removeprefix("torch."),
            "dim": self.dim,
            "flips": list(FLIPS),
        }

    def _layer_desc(self) -> str:
        layer, channels = self.opts["layer"], self.vae.config.latent_channels
        return f"vae latent ({channels} channels)" if layer == "latent" else f"vae.{layer} output"


class SDUnetEncoder(SDVaeEncoder):
    """g from the SD UNet (module docstring): clean latent at timestep t, empty prompt, pooled layer."""

    arch = "diffusers AutoencoderKL + UNet2DConditionModel"

    def __init__(
        self,
        name: str,
        vae,
        unet,
        weights: dict,
        prompt: tuple[torch.Tensor, str] | None = None,
        device="cpu",
        max_batch: int = 16,
    ):
        dtype = DTYPES[parse_sd_encoder(name)[1]["dtype"]]
        self.unet = _prepare(unet, device, dtype)
        ctx_dim = int(unet.config.cross_attention_dim)
        self.context, self.prompt = prompt or (
            torch.zeros(1, PROMPT_LEN, ctx_dim),
            f'"" (zeros (1, {PROMPT_LEN}, {ctx_dim}), no text encoder)',
        )
        self.context = self.context.to(device, dtype)
        super().__init__(name, vae, weights, device, max_batch)

    def _feature_map(self, x: torch.Tensor) -> torch.Tensor:
        latent = self._latent(x)
        t = torch.full((len(latent),), self.opts["t"], dtype=torch.long, device=latent.device)
        ctx = self.context.expand(len(latent), -1, -1)
        return _hooked(
            self.unet, self.opts["layer"], lambda: self.unet(latent, t, encoder_hidden_states=ctx)
        )

    def _layer_desc(self) -> str:
        return f"unet.{self.opts['layer']} output"

    def spec(self) -> dict:
        return {
            **super().spec(),
            "timestep": self.opts["t"],
            "num_train_timesteps": 1000,
            "noise": "none: the clean latent is fed at timestep t",
            "prompt": self.prompt,
        }


# ---------------------------------------------------------------- loading


def _weight_files(folder: Path, candidates: tuple[str, ...]) -> list[Path]:
    """config.json + the weight file(s) the library loads from `folder` (first candidate present)."""
    for name in candidates:
        path = folder / name
        if path.is_file():
            shards = (
                sorted(set(json.loads(path.read_text())["weight_map"].values()))
                if name.endswith(".json")
                else []
            )
            return [folder / "config.json", path] + [folder / s for s in shards]
    present = ", ".join(sorted(p.name for p in folder.iterdir())) if folder.is_dir() else "nothing"
    raise WeightsNotFound(f"{folder}: none of {', '.join(candidates)} (found: {present})")


def _hash_files(files: list[tuple[str, Path]]) -> tuple[str, list[str]]:
    """sha256 over `<role>/<file name>\t<sha256 of file>` lines (e.g. `vae/config.json`), sorted:
    the same weights give the same hash from a pipeline folder, a VAE-only folder or the cache."""
    rows = sorted((rel, sha256_file(p)) for rel, p in files)
    digest = hashlib.sha256("".join(f"{rel}\t{sha}\n" for rel, sha in rows).encode()).hexdigest()
    return digest, [rel for rel, _ in rows]


def _is_vae_folder(folder: Path) -> bool:
    cfg = folder / "config.json"
    return cfg.is_file() and json.loads(cfg.read_text()).get("_class_name") == "AutoencoderKL"


def _from_folder(base: str, root: Path) -> dict[str, Path] | None:
    """{"vae": dir[, "unet": dir]} in a diffusers pipeline folder, or a VAE-only folder for sd-vae."""
    need = ("vae", "unet") if base == "sd-unet" else ("vae",)
    if all((root / s / "config.json").is_file() for s in need):
        return {s: root / s for s in need}
    if base == "sd-vae" and _is_vae_folder(root):
        return {"vae": root}
    return None


def _find_dirs(base: str, weights: str | None, repo: str) -> tuple[Path | None, dict | None, str]:
    """(root, {"vae": dir, ...}, where it looked): --sd-weights DIR, else the HF cache (offline)."""
    if weights:
        root = Path(weights)
        dirs = _from_folder(base, root)
        if dirs is None:
            need = "vae/ and unet/" if base == "sd-unet" else "vae/ (or a VAE folder's config.json)"
            raise WeightsNotFound(
                f"--sd-weights {root}: no {need} with config.json in diffusers' "
                f"save_pretrained layout"
            )
        return root, dirs, str(root)
    from huggingface_hub import try_to_load_from_cache

    repos = [repo] + ([r for r in LEGACY_REPOS if r != repo] if repo == DEFAULT_REPO else [])
    for rid in repos:
        for probe in ("vae/config.json", "config.json"):
            found = try_to_load_from_cache(rid, probe, cache_dir=hf_home())
            if isinstance(found, str) and Path(found).is_file():
                root = Path(found).parent.parent if "/" in probe else Path(found).parent
                if (dirs := _from_folder(base, root)) is not None:
                    return root, dirs, f"the Hugging Face cache ({rid})"
    return (
        None,
        None,
        f"--sd-weights (not given), the Hugging Face cache ({hf_home()}) for {', '.join(repos)}",
    )


def _load_models(dirs: dict[str, Path]) -> tuple[dict, list[tuple[str, Path]]]:
    from diffusers import AutoencoderKL, UNet2DConditionModel

    classes = {"vae": AutoencoderKL, "unet": UNet2DConditionModel}
    fast = (
        importlib.util.find_spec("accelerate") is not None
    )  # without it diffusers warns, then inits twice
    models, files = {}, []
    for sub, folder in dirs.items():
        used = _weight_files(folder, DIFFUSERS_FILES)
        models[sub] = classes[sub].from_pretrained(
            folder,
            local_files_only=True,
            low_cpu_mem_usage=fast,
            use_safetensors=".safetensors" in used[1].name,
        )
        files += [(f"{sub}/{p.name}", p) for p in used]
    return models, files


def _empty_prompt(root: Path) -> tuple[tuple[torch.Tensor, str] | None, list[tuple[str, Path]]]:
    """The CLIP text embedding of "" (padded to the tokenizer's length) if the folder has a text
    encoder and transformers is installed; else None (zeros are used)."""
    te, tok = root / "text_encoder", root / "tokenizer"
    if not (te.is_dir() and tok.is_dir()):
        return None, []
    try:
        from transformers import CLIPTextModel, CLIPTokenizer
    except ImportError:
        warnings.warn(
            f"{root} has text_encoder/ and tokenizer/ but transformers is not installed: the "
            f"empty prompt is a zero tensor (recorded in the spec)",
            stacklevel=3,
        )
        return None, []
    files = _weight_files(te, TRANSFORMERS_FILES)
    tokenizer = CLIPTokenizer.from_pretrained(tok, local_files_only=True)
    model = CLIPTextModel.from_pretrained(
        te, local_files_only=True, use_safetensors=".safetensors" in files[1].name
    ).eval()
    ids = tokenizer(
        [""],
        padding="max_length",
        max_length=tokenizer.model_max_length,
        truncation=True,
        return_tensors="pt",
    ).input_ids
    with torch.no_grad():
        emb = model(ids)[0].float()
    desc = f'"" (CLIP text encoder last hidden state, {ids.shape[1]} tokens padded to max_length)'
    tok_files = [(f"tokenizer/{p.name}", p) for p in sorted(tok.iterdir()) if p.is_file()]
    return (emb, desc), [(f"text_encoder/{p.name}", p) for p in files] + tok_files


def _random_models(base: str, init_seed: int, config: dict | None) -> tuple[dict, dict]:
    import diffusers
    from diffusers import AutoencoderKL, UNet2DConditionModel

    cfgs = {"vae": SD15_VAE, "unet": SD15_UNET, **(config or {})}
    if base == "sd-vae":
        cfgs.pop("unet")
    models = {}
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(init_seed)
        models["vae"] = AutoencoderKL(**cfgs["vae"])
        if "unet" in cfgs:
            models["unet"] = UNet2DConditionModel(**cfgs["unet"])
    config_sha = hashlib.sha256(canonical_json(cfgs).encode()).hexdigest()
    return models, {
        "weights": "random",
        "init_seed": init_seed,
        "diffusers_version": diffusers.__version__,
        "config_sha256": config_sha,
        "config": "SD 1.5 (in code)" if config is None else "override",
    }


def build_sd_encoder(
    name: str,
    weights: str | None = None,
    allow_random: bool = False,
    init_seed: int = 0,
    device: str = "cpu",
    random_config: dict | None = None,
):
    """`sd-vae[:opts]` or `sd-unet[:opts]` -> SDVaeEncoder / SDUnetEncoder (module docstring).
    `random_config` ({"vae": cfg, "unet": cfg}) replaces SD 1.5's architecture in the random
    fallback only (tests)."""
    base, opts = parse_sd_encoder(name)
    root, dirs, where = _find_dirs(base, weights, opts["repo"])
    prompt = None
    if dirs is not None:
        models, files = _load_models(dirs)
        if base == "sd-unet":
            prompt, text_files = _empty_prompt(root)
            files += text_files
        sha, rels = _hash_files(files)
        info = {"weights": "pretrained", "sha256": sha, "path": str(root), "files": rels}
    elif not allow_random:
        raise WeightsNotFound(
            f"no Stable Diffusion weights for {base}: looked in {where}. Pass --sd-weights DIR "
            f"(a diffusers folder with vae/{' and unet/' if base == 'sd-unet' else ''}), "
            f"or --allow-random-weights (ALLOW_RANDOM_WEIGHTS=1) to use a random initialisation (weights: random)"
        )
    else:
        warnings.warn(
            f"no pre-trained weights for {base} (looked in {where}); using a RANDOM initialisation "
            f"(seed {init_seed}). The features are not Stable Diffusion's; the store key and every "
            f"report say 'weights: random'.",
            stacklevel=2,
        )
        models, info = _random_models(base, init_seed, random_config)
    if base == "sd-vae":
        return SDVaeEncoder(name, models["vae"], info, device)
    return SDUnetEncoder(name, models["vae"], models["unet"], info, prompt, device)
