"""Stable Diffusion encoders (pipeline/sd_encoders.py) on tiny diffusers models: `pytest tests/test_sd_encoders.py`."""

import shutil
import time

import numpy as np
import pytest

pytest.importorskip("diffusers")

from pipeline.encoders import WeightsNotFound  # noqa: E402
from pipeline.sd_encoders import SD15_VAE, build_sd_encoder, canonical_name, parse_sd_encoder  # noqa: E402

TINY = {"block_out_channels": [8, 16], "layers_per_block": 1, "norm_num_groups": 4}
# 4 blocks: downsampled 8x like SD's VAE, so the mid block's attention stays small at 256 px
TINY_VAE = {
    **TINY,
    "block_out_channels": [8, 8, 16, 16],
    "down_block_types": ["DownEncoderBlock2D"] * 4,
    "up_block_types": ["UpDecoderBlock2D"] * 4,
    "latent_channels": 4,
    "sample_size": 64,
}
TINY_UNET = {
    **TINY,
    "down_block_types": ["CrossAttnDownBlock2D", "DownBlock2D"],
    "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D"],
    "cross_attention_dim": 16,
    "attention_head_dim": 2,
    "sample_size": 8,
}
TINY_CONFIG = {"vae": TINY_VAE, "unet": TINY_UNET}
FAST = ":size=64"  # tiny models at 64 px keep every call in milliseconds


def save_tiny(folder, seed=0, parts=("vae", "unet")):
    import torch
    from diffusers import AutoencoderKL, UNet2DConditionModel

    torch.manual_seed(seed)
    if "vae" in parts:
        AutoencoderKL(**TINY_VAE).save_pretrained(folder / "vae")
    if "unet" in parts:
        UNet2DConditionModel(**TINY_UNET).save_pretrained(folder / "unet")
    return folder


@pytest.fixture(scope="module")
def sd_dir(tmp_path_factory):
    """tmp/sd/vae and tmp/sd/unet in diffusers' save_pretrained layout (random weights, seed 0)."""
    return save_tiny(tmp_path_factory.mktemp("sd"))


@pytest.fixture(scope="module")
def images():
    rng = np.random.default_rng(0)
    return [
        rng.integers(0, 256, (40, 56, 3), dtype=np.uint8),
        rng.integers(0, 256, (33, 47, 3), dtype=np.uint8),
    ]


@pytest.fixture
def empty_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    return tmp_path / "hub"


@pytest.mark.parametrize(
    "name,dim",
    [
        ("sd-vae", 8),
        ("sd-unet", 16),
        ("sd-vae:layer=encoder.mid_block", 32),
        ("sd-unet:pool=meanstd:layer=down_blocks.0", 16),
    ],
)
def test_shapes_finite_and_flips(sd_dir, images, name, dim):
    enc = build_sd_encoder(name + FAST, weights=str(sd_dir))
    g = enc(images)
    assert (
        g.shape == (2, 4, dim) and enc.dim == dim and g.dtype == np.float32 and np.isfinite(g).all()
    )
    img = images[0]
    flipped = enc([img[:, ::-1], img[::-1], img[::-1, ::-1]])[
        :, 0
    ]  # g of each flipped image itself
    np.testing.assert_allclose(flipped, g[0, 1:], rtol=1e-4, atol=1e-5)
    assert not np.allclose(
        g[0, 0], g[0, 1], atol=1e-4
    )  # the variants do differ: the test means something


def test_default_size_and_spec(sd_dir, images):
    enc = build_sd_encoder("sd-unet", weights=str(sd_dir))
    assert enc([images[0]]).shape == (1, 4, 16)
    spec = enc.spec()
    assert spec["encoder"] == "sd-unet" and enc.name == "sd-unet"
    assert spec["layer"] == "unet.mid_block output" and spec["pool"] == "mean over space"
    assert spec["timestep"] == 50 and spec["noise"].startswith("none")
    assert spec["prompt"] == '"" (zeros (1, 77, 16), no text encoder)'
    assert spec["preprocess"]["resize"] == [256, 256] and spec["preprocess"]["crop"] is None
    assert (
        spec["scaling_factor"] == pytest.approx(0.18215)
        and spec["output"] == "unnormalised (no L2)"
    )
    assert (
        spec["weights"] == "pretrained"
        and len(spec["weights_sha256"]) == 64
        and spec["dtype"] == "float32"
    )
    assert spec["weights_files"] == [
        "unet/config.json",
        "unet/diffusion_pytorch_model.safetensors",
        "vae/config.json",
        "vae/diffusion_pytorch_model.safetensors",
    ]
    vae = build_sd_encoder("sd-vae" + FAST, weights=str(sd_dir)).spec()
    assert vae["layer"] == "vae latent (4 channels)" and vae["pool"].startswith(
        "mean over space, then std"
    )
    assert "timestep" not in vae
    assert vae["weights_files"] == ["vae/config.json", "vae/diffusion_pytorch_model.safetensors"]


def test_sha256_follows_the_weight_files(sd_dir, tmp_path, images):
    other = tmp_path / "sd2"
    shutil.copytree(sd_dir, other)
    save_tiny(other, seed=1, parts=("unet",))
    a, b = (build_sd_encoder("sd-unet" + FAST, weights=str(d)) for d in (sd_dir, other))
    assert a.weights["sha256"] != b.weights["sha256"]
    assert not np.allclose(a(images[:1]), b(images[:1]))
    va, vb = (build_sd_encoder("sd-vae" + FAST, weights=str(d)) for d in (sd_dir, other))
    assert va.weights["sha256"] == vb.weights["sha256"]  # only the folders used are hashed
    only = build_sd_encoder("sd-vae" + FAST, weights=str(sd_dir / "vae"))  # a VAE-only folder
    assert only.weights["sha256"] == va.weights["sha256"]
    np.testing.assert_array_equal(only(images[:1]), va(images[:1]))


def test_hugging_face_cache(sd_dir, empty_cache, images):
    snap = empty_cache / "models--org--tiny-sd" / "snapshots" / ("0" * 40)
    shutil.copytree(sd_dir, snap)
    (snap.parent.parent / "refs").mkdir()
    (snap.parent.parent / "refs" / "main").write_text("0" * 40)
    enc = build_sd_encoder("sd-unet:repo=org/tiny-sd" + FAST)
    ref = build_sd_encoder("sd-unet" + FAST, weights=str(sd_dir))
    assert enc.weights["path"] == str(snap) and enc.weights["sha256"] == ref.weights["sha256"]
    np.testing.assert_array_equal(enc(images[:1]), ref(images[:1]))
    assert enc.name == "sd-unet:repo=org/tiny-sd:size=64"


def test_missing_weights_say_where_they_looked(tmp_path, empty_cache):
    with pytest.raises(WeightsNotFound) as e:
        build_sd_encoder("sd-unet")
    msg = str(e.value)
    assert (
        str(empty_cache) in msg
        and "stable-diffusion-v1-5/stable-diffusion-v1-5" in msg
        and "--sd-weights" in msg
    )
    save_tiny(tmp_path / "vae_only", parts=("vae",))
    with pytest.raises(WeightsNotFound, match="vae_only: no vae/ and unet/"):
        build_sd_encoder("sd-unet", weights=str(tmp_path / "vae_only"))
    build_sd_encoder("sd-vae" + FAST, weights=str(tmp_path / "vae_only"))  # enough for sd-vae


def test_random_fallback_is_deterministic(empty_cache, images):
    def make(seed):
        with pytest.warns(UserWarning, match="RANDOM"):
            return build_sd_encoder(
                "sd-unet" + FAST, allow_random=True, init_seed=seed, random_config=TINY_CONFIG
            )

    a, b, c = make(3), make(3), make(4)
    np.testing.assert_array_equal(a(images), b(images))
    assert not np.allclose(a(images), c(images))
    spec = a.spec()
    assert (
        spec["weights"] == "random"
        and spec["init_seed"] == 3
        and spec["diffusers_version"].startswith("0.42")
    )
    assert (
        spec["model_config_sha256"] == b.spec()["model_config_sha256"]
        and spec["weights_sha256"] is None
    )


def test_full_sd15_vae_config_builds(empty_cache, images):
    t0 = time.perf_counter()
    with pytest.warns(UserWarning, match="RANDOM"):
        enc = build_sd_encoder("sd-vae:size=64", allow_random=True)
    assert enc([images[0]]).shape == (1, 4, 8)
    assert (
        enc.vae.config.block_out_channels == tuple(SD15_VAE["block_out_channels"])
        or list(enc.vae.config.block_out_channels) == SD15_VAE["block_out_channels"]
    )
    assert enc.spec()["model_config_sha256"] and time.perf_counter() - t0 < 20


def test_names_and_options():
    base, opts = parse_sd_encoder("sd-unet:t=100:size=512")
    assert (
        base == "sd-unet"
        and opts["t"] == 100
        and opts["size"] == 512
        and opts["layer"] == "mid_block"
    )
    assert canonical_name(base, opts) == "sd-unet:size=512:t=100"
    assert canonical_name(*parse_sd_encoder("sd-vae:size=256")) == "sd-vae"
    for bad in (
        "sd-vae:t=5",
        "sd-unet:size=100",
        "sd-unet:t=1000",
        "sd-unet:pool=max",
        "sd-unet:x",
        "sd-xl",
        "sd-unet:t=5,size=64",
    ):  # ',' separates encoders, not options
        with pytest.raises(ValueError):
            parse_sd_encoder(bad)


def save_tiny_text(folder, width=16):
    """text_encoder/ + tokenizer/ as in an SD pipeline folder (tiny CLIP text model, 77 tokens)."""
    pytest.importorskip("transformers")
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    chars = [chr(c) for c in range(ord("a"), ord("z") + 1)]
    vocab = {
        t: i
        for i, t in enumerate(
            ["<|startoftext|>", "<|endoftext|>"] + chars + [c + "</w>" for c in chars]
        )
    }
    CLIPTokenizer(vocab=vocab, merges=[], model_max_length=77).save_pretrained(folder / "tokenizer")
    cfg = CLIPTextConfig(
        vocab_size=len(vocab),
        hidden_size=width,
        intermediate_size=2 * width,
        num_hidden_layers=1,
        num_attention_heads=2,
        max_position_embeddings=77,
        bos_token_id=0,
        eos_token_id=1,
        pad_token_id=1,
    )
    CLIPTextModel(cfg).save_pretrained(folder / "text_encoder")


def test_empty_prompt_from_a_text_encoder(sd_dir, tmp_path, images):
    full = tmp_path / "sd"
    shutil.copytree(sd_dir, full)
    save_tiny_text(full)
    enc, zeros = (build_sd_encoder("sd-unet" + FAST, weights=str(d)) for d in (full, sd_dir))
    assert enc.spec()["prompt"].startswith('"" (CLIP text encoder') and enc.context.shape == (
        1,
        77,
        16,
    )
    assert {"text_encoder/model.safetensors", "tokenizer/tokenizer_config.json"} <= set(
        enc.spec()["weights_files"]
    )
    assert enc.weights["sha256"] != zeros.weights["sha256"] and not np.allclose(
        enc(images), zeros(images)
    )


def test_text_encoder_without_transformers_uses_zeros(sd_dir, tmp_path, monkeypatch):
    full = tmp_path / "sd"
    shutil.copytree(sd_dir, full)
    (full / "text_encoder").mkdir()
    (full / "tokenizer").mkdir()
    monkeypatch.setitem(__import__("sys").modules, "transformers", None)  # import fails
    with pytest.warns(UserWarning, match="transformers is not installed"):
        enc = build_sd_encoder("sd-unet" + FAST, weights=str(full))
    assert enc.spec()["prompt"].startswith('"" (zeros')


@pytest.mark.parametrize("dtype,vae_dtype", [("bfloat16", "bfloat16"), ("float16", "float32")])
def test_half_precision(sd_dir, images, dtype, vae_dtype):
    ref = build_sd_encoder("sd-unet" + FAST, weights=str(sd_dir))
    enc = build_sd_encoder(f"sd-unet:size=64:dtype={dtype}", weights=str(sd_dir))
    spec = enc.spec()
    assert (
        spec["dtype"] == dtype and spec["vae_dtype"] == vae_dtype
    )  # SD's VAE asks for float32 (force_upcast)
    g = enc(images)
    assert g.dtype == np.float32 and np.isfinite(g).all()
    np.testing.assert_allclose(g, ref(images), atol=0.05 * np.abs(ref(images)).max())


def test_unknown_layer_is_a_clear_error(sd_dir):
    with pytest.raises(ValueError, match="no layer 'mid'"):
        build_sd_encoder("sd-unet:layer=mid" + FAST, weights=str(sd_dir))
