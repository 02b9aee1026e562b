"""The paper's target networks (SNR-Aware, MPRNet, Uformer-B): official names, strict loading,
errors, random weights, tiling, and `make features` with each: `pytest tests/test_target_networks.py`.

tests/fixtures/official_names.json holds the parameter names and shapes of each network at its
published configuration. It was written from pipeline/ and checked, name by name and shape by
shape, against the official code (swz30/MPRNet {Deblurring,Deraining,Denoising}/MPRNet.py,
ZhendongWang6/Uformer model.py as `Uformer_B`, the restorer of
pretrain_model_boost_restoration's low_light_transformer2), whose outputs on random weights ours
equal (docs/networks.md gives the measured differences). The official code is not in this project.
"""

import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from scipy.ndimage import gaussian_filter

from common.metrics import psnr, to_uint8
from pipeline.extract import FeaturesConfig, build_features
from pipeline.networks import (
    BUILTINS,
    CheckpointError,
    build_builtin_target,
    build_network_target,
    load_state,
    parse_options,
    target_from_spec,
)
from pipeline.snr_aware import SNRAware, blurred_frame, snr_map
from ptgrm import tiling
from stores import Store, key_of
from training.data import Split

ROOT = Path(__file__).resolve().parents[1]
FIXTURE = json.loads((Path(__file__).parent / "fixtures" / "official_names.json").read_text())
NEW = ("snr-aware", "mprnet-deblur", "mprnet-derain", "mprnet-denoise", "uformer-b")
# small configurations with every kind of layer (Uformer: shifted windows above the bottleneck)
TINY = {
    "snr-aware": {"nf": 8, "light_RBs": 1, "n_layers": 1, "heads": 2, "d_head": 8},
    "mprnet-deblur": {"n_feat": 8, "scale_unetfeats": 4, "scale_orsnetfeats": 4, "num_cab": 1},
    "mprnet-derain": {"n_feat": 8, "scale_unetfeats": 4, "scale_orsnetfeats": 4, "num_cab": 1},
    "mprnet-denoise": {"n_feat": 8, "scale_unetfeats": 4, "scale_orsnetfeats": 4, "num_cab": 1},
    "uformer-b": {
        "embed_dim": 8,
        "depths": [2, 1, 1, 1, 1, 1, 1, 1, 2],
        "win_size": 2,
        "img_size": 32,
    },
}
PUBLISHED_PARAMS = {
    "snr-aware": 39_124_099,
    "mprnet-deblur": 20_127_073,
    "mprnet-derain": 3_637_249,
    "mprnet-denoise": 15_741_025,
    "uformer-b": 50_880_946,
}  # MPRNet 20.1 M, Uformer-B 50.88 M


def tiny_name(name: str) -> str:
    """The CLI form: `mprnet-deblur:n_feat=8:...`."""
    opts = [
        f"{k}={','.join(map(str, v)) if isinstance(v, list) else v}" for k, v in TINY[name].items()
    ]
    return ":".join([name, *opts])


def tiny_state(name: str, seed: int = 0) -> dict:
    b = BUILTINS[name]
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        net = b.make(**b.config(**TINY[name]))
    with torch.no_grad():  # move off the identity-like init so outputs depend on every tensor
        for k, v in net.state_dict().items():
            if v.is_floating_point():
                v.add_(torch.randn(v.shape, generator=torch.Generator().manual_seed(len(k))) * 0.02)
    return net.state_dict()


def save(path: Path, state: dict, wrapper: str | None = "state_dict") -> Path:
    torch.save({wrapper: state, "epoch": 3} if wrapper else state, path)
    return path


def image(h=96, w=128, seed=0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    x = gaussian_filter(rng.random((h, w, 3)), (4, 4, 0))
    x = (x - x.min()) / (x.max() - x.min()) * 0.6 + rng.random((h, w, 3)) * 0.05
    return x.astype(np.float32)


@pytest.mark.parametrize("name", NEW)
def test_official_names_and_shapes_load_strictly(name):
    b = BUILTINS[name]
    with torch.device("meta"):
        net = b.make(**b.config())
        state = {k: torch.empty(s) for k, s in FIXTURE[name].items()}
    assert {k: list(v.shape) for k, v in net.state_dict().items()} == FIXTURE[name]
    load_state(net, state, f"{name} fixture")  # strict: raises on any difference
    assert sum(p.numel() for p in net.parameters()) == PUBLISHED_PARAMS[name]
    wrong = dict(state)
    key = sorted(wrong)[len(wrong) // 2]
    wrong[key] = torch.empty((*FIXTURE[name][key][:-1], FIXTURE[name][key][-1] + 1), device="meta")
    with pytest.raises(CheckpointError, match=rf"1 mis-shaped key\(s\).*{key}: checkpoint"):
        load_state(net, wrong, f"{name} fixture")


@pytest.mark.parametrize("name", NEW)
def test_a_checkpoint_file_loads_and_a_wrong_one_is_refused_naming_the_keys(name, tmp_path):
    state = tiny_state(name)
    target = build_builtin_target(
        name, save(tmp_path / "ok.pth", state), config=TINY[name], device="cpu"
    )
    assert target.weights == "pretrained" and len(target.spec()["checkpoint_sha256"]) == 64
    assert target.spec()["network"] == BUILTINS[name].network
    assert target.spec()["config"] == BUILTINS[name].config(**TINY[name])
    key = next(k for k, v in state.items() if v.ndim == 4)
    bad = {**state, key: torch.zeros(*state[key].shape[:-1], state[key].shape[-1] + 2)}
    with pytest.raises(
        CheckpointError, match=rf"bad.pth does not fit .*1 mis-shaped key\(s\).*'{key}: checkpoint"
    ):
        build_builtin_target(name, save(tmp_path / "bad.pth", bad), config=TINY[name])
    renamed = {("x." + k if k == key else k): v for k, v in state.items()}
    with pytest.raises(
        CheckpointError,
        match=rf"1 missing key\(s\) \['{key}'\]; 1 unexpected key\(s\) \['x.{key}'\]",
    ):
        build_builtin_target(name, save(tmp_path / "renamed.pth", renamed), config=TINY[name])


def far_from(n: int, cuts: list, margin: int) -> np.ndarray:
    idx = np.arange(n)
    return np.all([np.abs(idx - c) >= margin for c in cuts], axis=0) if cuts else np.ones(n, bool)


@pytest.mark.parametrize("name", ["snr-aware", "mprnet-deblur", "uformer-b"])
def test_tiled_and_untiled_agree_away_from_the_seams(name):
    """These networks are not local (global attention, channel attention, MPRNet's quadrants), so
    tiles change the output a little; away from the cuts it stays within 1% of the residual."""
    lq = image(96, 160)
    state = tiny_state(name)
    whole = build_builtin_target(name, None, config=TINY[name], allow_random=True, device="cpu")
    tiled = build_builtin_target(
        name, None, config=TINY[name], allow_random=True, device="cpu", tile=64, overlap=32
    )
    for t in (whole, tiled):
        t.net.load_state_dict(state)
    a, b = whole(lq, {}), tiled(lq, {})
    diff = np.abs(a - b).mean(-1)
    cuts = []
    for n in lq.shape[:2]:
        spans = tiling.spans(n, 64, 32, whole.factor)
        c = [k0 for _, _, k0, _ in spans[1:]]
        if name.startswith("mprnet"):  # its own cuts: halves of every tile and of the whole image
            c += [n // 2] + [(s + e) // 2 for s, e, _, _ in spans]
        cuts.append(c)
    far = far_from(lq.shape[0], cuts[0], 8)[:, None] & far_from(lq.shape[1], cuts[1], 8)[None, :]
    residual = np.abs(a - lq).mean(-1)
    assert far.mean() > 0.15 and diff.max() > 0  # the test sees tiling
    assert diff[far].mean() < 0.01 * residual.mean() and diff[far].max() < 0.1 * residual.max()


def test_random_weights_are_seeded_labelled_and_refused_without_permission(tmp_path):
    a = build_network_target(
        tiny_name("mprnet-derain"), None, allow_random=True, init_seed=3, device="cpu"
    )
    b = build_network_target(
        tiny_name("mprnet-derain"), None, allow_random=True, init_seed=3, device="cpu"
    )
    c = build_network_target(
        tiny_name("mprnet-derain"), None, allow_random=True, init_seed=4, device="cpu"
    )
    assert (
        a.weights == "random"
        and a.spec()["init"]["seed"] == 3
        and a.spec()["checkpoint_sha256"] is None
    )
    np.testing.assert_array_equal(a(image(), {}), b(image(), {}))
    assert key_of(a.spec()) == key_of(b.spec()) != key_of(c.spec())
    again = target_from_spec(json.loads(json.dumps(a.spec())), None, device="cpu")
    np.testing.assert_array_equal(again(image(), {}), a(image(), {}))
    with pytest.raises(ValueError, match=r"give its checkpoint .*model_deraining.pth"):
        build_network_target("mprnet-derain", None)


def test_configuration_options_in_the_name():
    assert parse_options("uformer-b:depths=1,2:win_size=4:mlp_ratio=2.5:modulator=false") == (
        "uformer-b",
        {"depths": [1, 2], "win_size": 4, "mlp_ratio": 2.5, "modulator": False},
    )
    with pytest.raises(ValueError, match=r"unknown MPRNet argument\(s\) \['width'\]"):
        build_network_target("mprnet-deblur:width=3", None, allow_random=True)
    with pytest.raises(ValueError, match="must be name=value"):
        build_network_target("snr-aware:nf", None, allow_random=True)


def test_snr_aware_takes_the_restorer_part_of_the_joint_sid_checkpoint(tmp_path):
    from test_official import official_sd

    state = tiny_state("snr-aware")
    joint = save(tmp_path / "SID.pth", {**state, **official_sd()}, wrapper=None)
    target = build_builtin_target("snr-aware", joint, config=TINY["snr-aware"], device="cpu")
    assert (
        target.spec()["ignored_prefix"] == "refinement11."
        and "cv2.blur" in target.spec()["snr_map"]
    )
    net = SNRAware(**{**BUILTINS["snr-aware"].config(**TINY["snr-aware"])}).eval()
    net.load_state_dict(state)
    lq = image(64, 96)
    with torch.no_grad():
        direct = net(torch.from_numpy(lq).permute(2, 0, 1)[None])[0].permute(1, 2, 0).numpy()
    np.testing.assert_array_equal(
        target(lq, {}), direct
    )  # the map comes from the input, inside the target
    stray = save(
        tmp_path / "stray.pth",
        {**state, "conv_first.weight": torch.zeros(8, 3, 3, 3)},
        wrapper=None,
    )
    with pytest.raises(CheckpointError, match=r"unexpected key\(s\) \['conv_first.weight'\]"):
        build_builtin_target("snr-aware", stray, config=TINY["snr-aware"])


def test_blurred_frame_and_snr_map_by_hand():
    frame = np.zeros((8, 8, 3), np.float32)
    frame[0, 0] = 1.0
    blur = blurred_frame(frame)
    # 5x5 mean, reflect-101 border: (0, 0) is counted once in every window that reaches it
    expected = np.zeros((8, 8), np.float32)
    expected[:3, :3] = 1 / 25
    np.testing.assert_allclose(blur[..., 1], expected, atol=1e-7)
    flat = torch.full((1, 3, 8, 8), 0.5)  # no noise anywhere: SNR ratio 0.5 / 1e-4 everywhere
    np.testing.assert_allclose(snr_map(flat).numpy(), 5000 / (5000 + 1e-4), rtol=1e-6)
    x = torch.from_numpy(frame).permute(2, 0, 1)[None] * 0.5 + 0.25
    light = 0.25 + 0.5 * torch.from_numpy(blur).permute(2, 0, 1)[None]  # blur of x, by linearity
    ratio = light[:, :1] / (
        (x[:, :1] - light[:, :1]).abs() + 1e-4
    )  # luma of a grey frame is any channel
    np.testing.assert_allclose(
        snr_map(x).numpy(), (ratio / (ratio.max() + 1e-4)).numpy(), rtol=1e-5
    )


def small_folder(root: Path) -> Path:
    """A `generic` dataset: two 40x56 test pairs (small, so that five networks run in seconds)."""
    from PIL import Image

    for k in range(2):
        for kind, value in (("lq", 0.3), ("gt", 0.6)):
            path = root / "test" / kind / f"{k}.png"
            path.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray((image(40, 56, seed=k) * value / 0.65 * 255).astype(np.uint8)).save(
                path
            )
    return root


@pytest.mark.parametrize("name", NEW)
def test_features_with_random_weights_and_with_a_tiny_checkpoint(name, tmp_path, tiny_clip):
    common = {
        "data": str(small_folder(tmp_path / "data")),
        "splits": ("test",),
        "encoder": f"openclip:{tiny_clip}",
        "store_root": str(tmp_path),
        "task": "lowlight" if name == "snr-aware" else "deblur",
        "target": tiny_name(name),
    }
    with pytest.raises(
        ValueError, match="give its checkpoint"
    ):  # real data: no random target unless asked
        build_features(FeaturesConfig(**common))
    [store] = build_features(FeaturesConfig(**common, allow_random_weights=True))
    ckpt = save(tmp_path / "tiny.pth", tiny_state(name))
    build_features(FeaturesConfig(**common, target_weights=str(ckpt)))
    members = Store(store).manifest()["members"]
    targets = {m["weights"]: (p, m) for p, m in members.items() if p.startswith(f"targets/{name}-")}
    assert set(targets) == {"random", "pretrained"} and all(
        m["status"] == "complete" for _, m in targets.values()
    )
    assert targets["random"][1]["spec"]["init"]["seed"] == 0 and targets["random"][1]["spec"][
        "config"
    ] == BUILTINS[name].config(**TINY[name])
    assert (
        targets["pretrained"][1]["spec"]["checkpoint_sha256"]
        and "init" not in targets["pretrained"][1]["spec"]
    )
    bases = [
        np.stack(Store(store).array(targets[w][0], "base")[:]).astype(np.float32)
        for w in ("random", "pretrained")
    ]
    assert all(np.isfinite(b).all() for b in bases) and not np.array_equal(*bases)


def test_make_features_on_the_demo_with_a_tiny_checkpoint(tmp_path, tiny_clip):
    ckpt = save(tmp_path / "tiny.pth", tiny_state("snr-aware"), wrapper=None)
    out = subprocess.run(
        [
            "make",
            "-s",
            "features",
            "TASK=lowlight",
            f"TARGET={tiny_name('snr-aware')}",
            f"TARGET_WEIGHTS={ckpt}",
            f"ENCODER=openclip:{tiny_clip}",
            f"STORE_ROOT={tmp_path}",
            "SPLITS=test",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
    )
    assert out.returncode == 0, out.stderr[-2000:]
    assert "target snr-aware" in out.stdout
    [store] = tmp_path.glob("demo-test-lowlight-*")
    members = Store(store).manifest()["members"]
    assert [m["weights"] for p, m in members.items() if p.startswith("targets/snr-aware-")] == [
        "pretrained"
    ]


def test_sid_row_end_to_end_features_import_official_eval(tmp_path, tiny_clip):
    """SID.pth holds the SNR-Aware restorer and PTG-RM (`refinement11.`): the target takes the first,
    import-official the second, and eval scores PTG-RM on the target's output (960x512 frames)."""
    from test_official import official_shapes

    rng = np.random.default_rng(0)
    for k in range(2):
        short = tmp_path / "SID" / "short_sid2" / "10003" / f"10003_0{k}_0.1s.npy"
        short.parent.mkdir(parents=True, exist_ok=True)
        np.save(
            short, (rng.random((64, 96, 3)) * 40).astype(np.uint8)
        )  # resized to 960x512 when read
    (tmp_path / "SID" / "long_sid2" / "10003").mkdir(parents=True)
    np.save(
        tmp_path / "SID" / "long_sid2" / "10003" / "10003_00_10s.npy",
        (rng.random((64, 96, 3)) * 255).astype(np.uint8),
    )
    g = torch.Generator().manual_seed(0)
    clip_dim = 32  # the tiny CLIP's width (the published SID.pth has 512)
    ptgrm = {
        "refinement11." + k: torch.randn((s[0], clip_dim) if s[1:] == (512,) else s, generator=g)
        * 0.05
        for k, s in official_shapes().items()
    }
    ckpt = save(tmp_path / "SID.pth", {**tiny_state("snr-aware"), **ptgrm}, wrapper=None)

    [store] = build_features(
        FeaturesConfig(
            task="lowlight",
            data=f"sid:{tmp_path / 'SID'}",
            splits=("test",),
            target=tiny_name("snr-aware"),
            target_weights=str(ckpt),
            encoder=f"openclip:{tiny_clip}",
            store_root=str(tmp_path / "stores"),
        ),
    )
    manifest = Store(store).manifest()
    assert manifest["members"]["pairs"]["spec"]["source"]["protocol"]["resize"] == [960, 512]
    assert Store(store).array("pairs", "hw")[:].tolist() == [[512, 960]] * 2
    runs = tmp_path / "runs"
    for args in (
        ["import-official", ckpt, "--run", "sid", "--runs-dir", runs],
        [
            "eval",
            "--task",
            "lowlight",
            "--test-store",
            store,
            "--run",
            "sid",
            "--runs-dir",
            runs,
            "--encoder",
            f"openclip:{tiny_clip}",
        ],
    ):
        out = subprocess.run(
            [sys.executable, "-m", "training", *map(str, args)],
            cwd=ROOT,
            capture_output=True,
            text=True,
        )
        assert out.returncode == 0, out.stderr[-2000:]
    result = json.loads((runs / "sid" / "eval.json").read_text())
    assert (
        result["n_images"] == 2
        and result["weights"] == "pretrained"
        and np.isfinite(result["psnr_refined"])
    )
    assert result["psnr_base"] != result["psnr_refined"]  # PTG-RM changed the target's output


def official_uformer_test(net, x: torch.Tensor) -> torch.Tensor:
    """Uformer's test scripts (test/test_sidd.py, test_gopro_hide.py...): `expand2square(x, factor=128)`
    puts the image at the centre of a zero square whose side is max(h, w) rounded up to a multiple of
    128 ((X - h) // 2 rows above, (X - w) // 2 columns left), runs the network on the square and
    takes the image's place back out (`masked_select` of the mask)."""
    h, w = x.shape[-2:]
    side = math.ceil(max(h, w) / 128) * 128
    top, left = (side - h) // 2, (side - w) // 2
    square = torch.zeros(1, 3, side, side)
    square[..., top : top + h, left : left + w] = x
    with torch.no_grad():
        return net(square)[..., top : top + h, left : left + w]


def test_uformer_pads_as_the_official_test_does():
    """Centred zero padding to a square (side a multiple of 128), output cropped back: equal to the
    official procedure on sizes that are not multiples of 128, square or not (a narrow Uformer with
    the published 8x8 windows, so the same multiple of 128, in a fraction of the time)."""
    target = build_builtin_target(
        "uformer-b",
        None,
        config={"depths": [1] * 9, "embed_dim": 8},
        allow_random=True,
        device="cpu",
    )
    with torch.no_grad():  # off the initialisation, so that every weight matters
        for k, v in target.net.state_dict().items():
            if v.is_floating_point():
                v.add_(torch.randn(v.shape, generator=torch.Generator().manual_seed(len(k))) * 0.02)
    assert (
        "expand2square" in target.spec()["padding"]
    )  # in the key: stores made before are not reused
    for h, w in ((70, 94), (130, 200), (96, 128), (100, 100)):
        lq = image(h, w, seed=h)
        ours = target(lq, {})
        official = official_uformer_test(target.net, torch.from_numpy(lq).permute(2, 0, 1)[None])
        diff = float(np.abs(ours - official[0].permute(1, 2, 0).numpy()).max())
        assert ours.shape == (h, w, 3) and diff <= 1e-5, f"{h}x{w}: max |diff| {diff}"
    before = {
        k: v for k, v in target.spec().items() if k != "padding"
    }  # a store made reflect-padding
    with pytest.raises(
        ValueError, match=r"made padding its inputs by reflection.*expand2square.*make its features"
    ):
        target_from_spec(before, None, device="cpu")


def test_the_stored_float16_base_scores_as_the_official_float32_output(tmp_path, tiny_clip):
    """The official scripts convert the network's float32 output to uint8; the store keeps base in
    float16, which moves some uint8 values by one. On the lowlight demo with SCI's published weights
    the mean base PSNR stays within 0.005 dB of the official conversion's (docs/networks.md)."""
    [store] = build_features(
        FeaturesConfig(
            task="lowlight",
            data="demo",
            splits=("test",),
            store_root=str(tmp_path),
            encoder=f"openclip:{tiny_clip}",
        ),
    )
    split = Split.open(store, None, None)
    target = build_network_target("sci-medium", device="cpu")
    stored, official = [], []
    for i in range(len(split.hw)):
        s = split.image(i)
        stored.append(psnr(to_uint8(s["base"]), s["gt"]))
        official.append(psnr(to_uint8(target(s["lq"].astype(np.float32) / 255, {})), s["gt"]))
    assert len(stored) == 33 and split.target.startswith("targets/sci-medium-")
    assert abs(np.mean(stored) - np.mean(official)) <= 0.005, (np.mean(stored), np.mean(official))
