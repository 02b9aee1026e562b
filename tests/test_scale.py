"""Stores at real sizes: mixed sizes and orientations extracted without padding, and re-runs that
cost a stat per source file instead of a read."""

import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import pipeline.sources as sources
from common.log import collect
from pipeline.extract import FeaturesConfig, build_features
from stores import Store

SIZES = [
    (40, 48),
    (96, 64),
    (40, 48),
    (64, 96),
    (300, 200),
    (40, 48),
    (17, 33),
]  # both orientations


def write_dataset(root, sizes=SIZES):
    for k, (h, w) in enumerate(sizes):
        rng = np.random.default_rng(k)
        for kind in ("gt", "lq"):
            (root / "test" / kind).mkdir(parents=True, exist_ok=True)
            Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(
                root / "test" / kind / f"im{k}.png"
            )
    return root


def features(data, stores, tiny_clip, **kw):
    lines = []
    kw = {"target": "identity", **kw}
    cfg = FeaturesConfig(
        task="deblur",
        data=f"generic:{data}",
        encoder=f"openclip:{tiny_clip}",
        store_root=str(stores),
        shard_len=2,
        tile=32,
        splits=("test",),
        **kw,
    )
    with collect() as lines:
        return build_features(cfg)[0], "\n".join(lines)


def test_mixed_sizes_are_stored_at_their_own_size_and_read_back(tmp_path, tiny_clip):
    data = write_dataset(tmp_path / "data")
    store = Store(features(data, tmp_path / "stores", tiny_clip)[0])
    assert {b.hw for b in store.layout.buckets} == {
        (64, 64),
        (96, 64),
        (64, 96),
        (320, 224),
        (32, 64),
    }
    names, hw = store.array("pairs", "names")[:], store.array("pairs", "hw")[:]
    lq = store.array("pairs", "lq")
    for i, name in enumerate(names):
        want = np.asarray(Image.open(data / name.replace("/gt/", "/lq/")))
        k, row = store.layout.locate(i)
        canvas = lq[i, :, :]
        assert tuple(hw[i]) == want.shape[:2] and canvas.shape[:2] == store.layout.buckets[k].hw
        assert np.array_equal(canvas[: hw[i][0], : hw[i][1]], want) and not canvas[hw[i][0] :].any()
    assert sorted(store.array("pairs", "source_index")[:].tolist()) == list(range(len(SIZES)))


def test_rerun_costs_a_stat_and_names_touched_and_changed_files(tmp_path, tiny_clip, monkeypatch):
    data = write_dataset(tmp_path / "data")
    first, _ = features(data, tmp_path / "stores", tiny_clip)
    hashed, headers, decoded = [], [], []
    real_hash, real_size, real_read = sources.sha256_file, sources._image_size, sources.read_image
    monkeypatch.setattr(sources, "sha256_file", lambda p: hashed.append(p) or real_hash(p))
    monkeypatch.setattr(sources, "_image_size", lambda p: headers.append(p) or real_size(p))
    monkeypatch.setattr(sources, "read_image", lambda p: decoded.append(p) or real_read(p))

    again, log = features(data, tmp_path / "stores", tiny_clip)
    assert again == first and "nothing to compute" in log and hashed == headers == decoded == []

    touched = data / "test" / "lq" / "im3.png"
    os.utime(touched, ns=(touched.stat().st_atime_ns, touched.stat().st_mtime_ns + 10**9))
    again, log = features(data, tmp_path / "stores", tiny_clip)
    assert again == first and "nothing to compute" in log and hashed == [touched]
    assert "touched" in log and "test/lq/im3.png" in log
    hashed.clear()
    again, log = features(data, tmp_path / "stores", tiny_clip)
    assert hashed == [] and "touched" not in log and decoded == []  # the new mtime was recorded
    changed = data / "test" / "gt" / "im1.png"
    Image.fromarray(np.zeros((96, 64, 3), np.uint8)).save(changed)
    again, log = features(data, tmp_path / "stores", tiny_clip)
    assert again != first and "changed" in log and "test/gt/im1.png" in log
    assert hashed == [changed]

    hashed.clear()
    features(data, tmp_path / "stores", tiny_clip, rehash=True)
    assert len(hashed) == 2 * len(SIZES)  # --rehash: every file read again


def test_a_complete_store_is_answered_without_building_a_network(tmp_path, tiny_clip, monkeypatch):
    import pipeline.extract as extract

    data = write_dataset(tmp_path / "data")
    first, _ = features(data, tmp_path / "stores", tiny_clip)
    built = []
    real_build = extract.build_models
    monkeypatch.setattr(extract, "build_models", lambda cfg: built.append(cfg) or real_build(cfg))
    again, log = features(data, tmp_path / "stores", tiny_clip)
    assert again == first and "nothing to compute" in log and built == []
    # another target is a new member: the networks are built and it is computed
    again, log = features(data, tmp_path / "stores", tiny_clip, target="gamma")
    assert len(built) == 1 and "computing targets/gamma" in log
    # changed weights: the encoder's checkpoint file is newer than the member -> built, checked by key
    weights = next(p for p in Path(tiny_clip).iterdir() if p.is_file())
    os.utime(weights, ns=(weights.stat().st_atime_ns, weights.stat().st_mtime_ns + 10**9))
    again, log = features(data, tmp_path / "stores", tiny_clip)
    assert again == first and len(built) == 2 and "nothing to compute" in log
    features(data, tmp_path / "stores", tiny_clip, rehash=True)
    assert len(built) == 3
    features(data, tmp_path / "stores", tiny_clip)  # the new stats were recorded: fast again
    assert len(built) == 3


@pytest.mark.parametrize("name", ["deblur", "defocus", "lowlight", "derain", "denoise25"])
def test_degradations_in_strips_match_the_whole_image(name, monkeypatch):
    """Large images are degraded strip by strip (bounded float64 work): the noise stream is the
    same, so point-wise degradations are bit-identical and blurs differ only by FFT rounding."""
    import pipeline.degrade as degrade

    fn, params = degrade.DEGRADATIONS[name]
    img = np.random.default_rng(3).random((150, 230, 3)).astype(np.float32)
    whole, drawn = fn(img, degrade.sample_rng(0, 7), **params)
    monkeypatch.setattr(degrade, "STRIP_PX", 230 * 20)  # 8 strips
    assert len(degrade.strips(150, 230)) == 8
    parts, drawn_parts = fn(img, degrade.sample_rng(0, 7), **params)
    assert drawn_parts == drawn and parts.dtype == np.float32
    if name in ("deblur", "defocus"):
        assert np.abs(parts - whole).max() < 1e-6
    else:
        np.testing.assert_array_equal(parts, whole)


def test_classical_targets_in_strips_match_the_whole_image(monkeypatch):
    import pipeline.degrade as degrade
    from pipeline.targets import GammaCorrection, NonLocalMeans, Wiener

    lq = np.random.default_rng(4).random((150, 230, 3)).astype(np.float32) * 0.3
    kernel = {"kernel": degrade.motion_kernel(np.random.default_rng(1)).tolist()}
    whole = GammaCorrection()(lq, {}), Wiener()(lq, kernel), NonLocalMeans()(lq, {})
    monkeypatch.setattr(degrade, "STRIP_PX", 230 * 20)
    np.testing.assert_array_equal(GammaCorrection()(lq, {}), whole[0])
    np.testing.assert_array_equal(Wiener()(lq, kernel), whole[1])
    np.testing.assert_array_equal(NonLocalMeans()(lq, {}), whole[2])


def test_the_no_op_command_imports_no_torch_and_no_network_code(tmp_path, tiny_clip):
    """`make features` on complete stores is answered from names, the stat cache and the manifest:
    the process never imports torch, scipy or open_clip (seconds of start-up on a small machine)."""
    import subprocess
    import sys

    data = write_dataset(tmp_path / "data")
    features(data, tmp_path / "stores", tiny_clip)
    code = (
        "import sys; from pipeline.__main__ import main; "
        f"rc = main(['features', '--task', 'deblur', '--data', 'generic:{data}', '--target', 'identity', "
        f"'--encoder', 'openclip:{tiny_clip}', '--store-root', '{tmp_path / 'stores'}', '--splits', 'test', "
        "'--shard-len', '2', '--tile', '32']); "
        "print('loaded', [m for m in ('torch', 'scipy.signal', 'open_clip') if m in sys.modules], rc)"
    )
    out = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        check=True,
        cwd=Path(__file__).resolve().parents[1],
    ).stdout
    assert "nothing to compute" in out and out.strip().endswith("loaded [] 0"), out


def test_noop_rerun_holds_with_weights_under_home(tmp_path, tiny_clip, monkeypatch):
    """Stores record paths under $HOME as `~/...` (privacy); the fast no-op re-run expands them
    before comparing settings and stat-ing the weight files."""
    import shutil

    import pipeline.extract as extract

    home = tmp_path / "home"
    monkeypatch.setenv("HOME", str(home))
    clip = home / "models" / "clip"
    shutil.copytree(tiny_clip, clip)
    data = write_dataset(tmp_path / "data")
    first, _ = features(data, tmp_path / "stores", clip)
    manifest = (first / "manifest.json").read_text()
    assert str(home) not in manifest and "~/models/clip" in manifest
    built = []
    real_build = extract.build_models
    monkeypatch.setattr(extract, "build_models", lambda cfg: built.append(cfg) or real_build(cfg))
    again, log = features(data, tmp_path / "stores", clip)
    assert again == first and "nothing to compute" in log and built == []
