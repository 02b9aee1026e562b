"""Stage 1 pieces: degradation, classical target, encoders and sources."""

import argparse
import json
from dataclasses import asdict, fields
from pathlib import Path

import numpy as np
import pytest

from common.metrics import psnr, to_uint8
from common.privacy import shareable
from pipeline.__main__ import features_config, features_parser
from pipeline.degrade import deblur, motion_kernel, sample_rng
from pipeline.encoders import WeightsNotFound, build_encoder
from pipeline.plan import FeaturesConfig
from pipeline.sources import SourceError, _demo_image, open_source, read_image
from pipeline.targets import Wiener, build_target
from stores.maintain import NOT_REPLAYED, features_command


def test_degradation_is_seeded_per_sample():
    img = _demo_image("chelsea")[:96, :96].astype(np.float32) / 255
    a, pa = deblur(img, sample_rng(0, 5))
    b, pb = deblur(img, sample_rng(0, 5))
    c, _ = deblur(img, sample_rng(0, 6))
    assert np.array_equal(a, b) and pa == pb
    assert not np.array_equal(a, c)
    k = np.asarray(pa["kernel"])
    assert k.shape == (19, 19) and abs(k.sum() - 1) < 1e-9 and (k >= 0).all()
    assert 0.5 / 255 <= pa["noise_sigma"] <= 2 / 255


def test_motion_kernels_are_spread_along_a_path():
    for i in range(20):
        k = motion_kernel(sample_rng(1, i))
        assert (k > 1e-3).sum() >= 4  # a blur, not a delta


@pytest.mark.parametrize("name", ["chelsea", "coffee", "rocket"])
def test_wiener_target_restores_the_blurred_photo(name):
    gt = _demo_image(name)
    lq, drawn = deblur(gt.astype(np.float32) / 255, sample_rng(0, 0))
    lq8 = to_uint8(lq)
    base = Wiener()(lq8.astype(np.float32) / 255, drawn)
    assert psnr(to_uint8(base), gt) > psnr(lq8, gt) + 1.0


def test_wiener_needs_the_recorded_kernel():
    with pytest.raises(ValueError, match="non-blind"):
        Wiener()(np.zeros((8, 8, 3), np.float32), {})


def test_classical_targets_refuse_network_options():
    with pytest.raises(ValueError, match="network targets only"):
        build_target("wiener", tile=256, overlap=32)
    with pytest.raises(ValueError, match="takes no checkpoint"):
        build_target("gamma", "weights.pth")


def test_repair_replays_every_features_setting(tmp_path):
    """Each FeaturesConfig field, recorded as a store records it, comes back through the repair
    command and the features parser; a new field fails here until it is given a value below."""
    home = Path.home()
    values = {
        "task": "denoise",
        "data": f"generic:{home / 'data' / 'SIDD'}",
        "target": "mprnet-deblur:n_feat=8",
        "target_weights": str(home / "w" / "mprnet.pth"),
        "target_tile": 256,
        "target_overlap": 48,
        "target_budget_mb": float("inf"),
        "target_compile": True,
        "encoder": f"openclip:{home / 'clip'},sd-vae",
        "store_root": "else",
        "store_shared": "s3://bucket/stores",
        "shards": 3,
        "shard_len": 4,
        "shard_mb": 8.5,
        "tile": 32,
        "seed": 7,
        "clip_weights": str(home / "clip.pt"),
        "sd_weights": str(home / "sd"),
        "allow_random_weights": True,
        "init_seed": 5,
        "splits": ("train",),
        "batch": 2,
        "encoder_dtype": "bf16",
        "max_bad": 0.2,
        "lease_seconds": 30.5,
        "device": "cpu",
        "rehash": True,
        "wds": True,
    }
    assert set(values) == {f.name for f in fields(FeaturesConfig)}, (
        "give the new field a value here"
    )
    default = FeaturesConfig()
    assert [k for k, v in values.items() if v == getattr(default, k)] == []
    recorded = json.loads(
        json.dumps(shareable(asdict(FeaturesConfig(**values))))
    )  # as the manifest holds it
    argv = features_command(recorded, tmp_path, "test")
    assert argv[1:4] == ["-m", "pipeline", "features"]
    parser = argparse.ArgumentParser()
    features_parser(parser.add_subparsers(dest="cmd"))
    again = features_config(parser.parse_args(argv[3:]))
    expected = {
        **values,
        "store_root": str(tmp_path),
        "splits": ("test",),  # the store repaired, its split
        **{k: getattr(default, k) for k in NOT_REPLAYED},
    }
    for f in fields(FeaturesConfig):
        assert getattr(again, f.name) == expected[f.name], f.name


def test_demo_splits_are_disjoint_by_photo():
    train, test = open_source("demo", "train"), open_source("demo", "test")
    photos = lambda src: {s.name.split("@")[0] for s in src.samples}  # noqa: E731
    assert len(test.samples) >= 24 and not photos(train) & photos(test)
    assert photos(test) == {"chelsea", "coffee", "rocket"}
    assert all(s.hw == (192, 192) for s in train.samples) and all(
        s.hw == (128, 128) for s in test.samples
    )
    tiles = {
        s.name: s.load()[0] for s in test.samples
    }  # non-overlapping: every tile is its own crop
    coffee = _demo_image("coffee")
    assert np.array_equal(tiles["coffee@128_256"], coffee[128:256, 256:384])
    assert set(train.fingerprint["images"]) == photos(train)


def test_tiny_clip_folder_loads_and_gives_normalised_flip_features(tiny_clip):
    enc = build_encoder(f"openclip:{tiny_clip}")
    img = _demo_image("coffee")
    g = enc([img, img[:100, :150]])
    assert g.shape == (2, 4, 32) and np.allclose(np.linalg.norm(g, axis=-1), 1, atol=1e-5)
    assert not np.allclose(g[0, 0], g[0, 1])  # a flipped image has its own g
    variants = [img[:, ::-1], img[::-1], img[::-1, ::-1]]  # width flip, height flip, both
    g_flip = enc([np.ascontiguousarray(v) for v in variants])
    for k in range(
        3
    ):  # variant k + 1 of an image is variant 0 of that flip of it (as distill and training use them)
        assert np.allclose(g_flip[k, 0], g[0, k + 1], atol=1e-5), k
    assert not np.allclose(g[0, 2], g[0, 1]) and not np.allclose(g[0, 3], g[0, 2])
    spec = enc.spec()
    assert spec["weights"] == "pretrained" and len(spec["weights_sha256"]) == 64
    assert str(tiny_clip) not in str(spec)  # the key holds content, not the folder's location


def test_missing_weights_fall_back_to_random_only_when_allowed(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty-cache"))
    with pytest.raises(WeightsNotFound, match="allow-random-weights"):
        build_encoder("clip-vit-b32", allow_random=False)
    with pytest.raises(WeightsNotFound, match="no such file"):
        build_encoder("clip-vit-b32", weights=str(tmp_path / "nope.pt"))


def test_corrupt_image_error_names_the_file(tmp_path):
    bad = tmp_path / "broken.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n" + b"garbage" * 10)
    with pytest.raises(SourceError, match="broken.png"):
        read_image(bad)


@pytest.mark.parametrize("batch", [-2, 0])
def test_features_refuses_a_batch_below_one(batch):
    """--batch -2 stored all-zero g (the encoder loop never ran) under the member's usual key,
    marked complete; it is refused before any network is built."""
    from pipeline.extract import build_models

    with pytest.raises(ValueError, match=f"--batch must be at least 1 image, got {batch}"):
        build_models(FeaturesConfig(task="denoise", data="demo", batch=batch))
