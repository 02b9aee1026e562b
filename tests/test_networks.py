"""Network targets: Restormer with the official names, checkpoints, user factories, tiling: `pytest tests/test_networks.py`."""

import json
import shutil
import sys
import textwrap

import numpy as np
import pytest
import torch
from safetensors.torch import save_file
from torch import nn

from pipeline.networks import (
    CheckpointError,
    NetworkTarget,
    build_builtin_target,
    build_network_target,
    build_restormer_target,
    build_user_target,
    load_checkpoint,
    restormer_config,
    target_from_spec,
)
from pipeline.restormer import Restormer
from ptgrm import tiling
from stores import key_of

TINY = {"dim": 8, "num_blocks": [1, 1, 1, 1], "num_refinement_blocks": 1, "heads": [1, 1, 1, 1]}
# Read off swz30/Restormer basicsr/models/archs/restormer_arch.py for the TINY configuration.
BLOCK = [
    "norm1.body.weight",
    "norm1.body.bias",
    "attn.temperature",
    "attn.qkv.weight",
    "attn.qkv_dwconv.weight",
    "attn.project_out.weight",
    "norm2.body.weight",
    "norm2.body.bias",
    "ffn.project_in.weight",
    "ffn.dwconv.weight",
    "ffn.project_out.weight",
]
OFFICIAL_NAMES = (
    ["patch_embed.proj.weight"]
    + [f"encoder_level1.0.{b}" for b in BLOCK]
    + ["down1_2.body.0.weight"]
    + [f"encoder_level2.0.{b}" for b in BLOCK]
    + ["down2_3.body.0.weight"]
    + [f"encoder_level3.0.{b}" for b in BLOCK]
    + ["down3_4.body.0.weight"]
    + [f"latent.0.{b}" for b in BLOCK]
    + ["up4_3.body.0.weight", "reduce_chan_level3.weight"]
    + [f"decoder_level3.0.{b}" for b in BLOCK]
    + ["up3_2.body.0.weight", "reduce_chan_level2.weight"]
    + [f"decoder_level2.0.{b}" for b in BLOCK]
    + ["up2_1.body.0.weight"]
    + [f"decoder_level1.0.{b}" for b in BLOCK]
    + [f"refinement.0.{b}" for b in BLOCK]
    + ["output.weight"]
)
OFFICIAL_SHAPES = {
    "patch_embed.proj.weight": (8, 3, 3, 3),
    "encoder_level1.0.attn.temperature": (1, 1, 1),
    "encoder_level1.0.attn.qkv_dwconv.weight": (24, 1, 3, 3),
    "encoder_level1.0.ffn.project_in.weight": (42, 8, 1, 1),  # int(8 * 2.66) = 21 hidden, x2
    "encoder_level1.0.ffn.project_out.weight": (8, 21, 1, 1),
    "down1_2.body.0.weight": (4, 8, 3, 3),
    "up4_3.body.0.weight": (128, 64, 3, 3),
    "reduce_chan_level3.weight": (32, 64, 1, 1),
    "decoder_level1.0.norm1.body.weight": (16,),
    "output.weight": (3, 16, 3, 3),
}


def tiny_state(seed=0) -> dict:
    torch.manual_seed(seed)
    return Restormer(**TINY).state_dict()


def image(h=37, w=53) -> np.ndarray:
    return np.random.default_rng(0).random((h, w, 3), dtype=np.float32)


@pytest.fixture
def tiny_pth(tmp_path):
    path = tmp_path / "tiny.pth"
    torch.save({"params": tiny_state()}, path)
    return path


def test_tiny_restormer_has_the_official_names_and_shapes():
    state = tiny_state()
    assert list(state) == OFFICIAL_NAMES and len(state) == 98
    assert {k: tuple(state[k].shape) for k in OFFICIAL_SHAPES} == OFFICIAL_SHAPES
    free = Restormer(**TINY, LayerNorm_type="BiasFree").state_dict()
    assert list(free) == [n for n in OFFICIAL_NAMES if not n.endswith("body.bias")]
    dual = Restormer(**TINY, inp_channels=6, dual_pixel_task=True).state_dict()
    assert list(dual) == OFFICIAL_NAMES[:-1] + ["skip_conv.weight", "output.weight"]


def test_tiny_restormer_output_equals_the_official_code():
    """Reference numbers computed with the official restormer_arch.py (seed 0, same input)."""
    torch.manual_seed(0)
    net = Restormer(**TINY).eval()
    yy, xx = torch.meshgrid(torch.arange(16.0), torch.arange(24.0), indexing="ij")
    x = torch.stack([0.5 + 0.4 * torch.sin(xx / 3 + c) * torch.cos(yy / 5 - c) for c in range(3)])[
        None
    ]
    with torch.no_grad():
        residual = net(x) - x
    assert residual.abs().mean().item() == pytest.approx(0.07550080865621567, abs=1e-6)
    assert residual[0, :, 5, 7].tolist() == pytest.approx(
        [-0.08342606, 0.06506982, -0.04112005], abs=1e-6
    )
    assert residual[0, :, 15, 23].tolist() == pytest.approx(
        [0.05187634, 0.07873946, 0.01870602], abs=1e-6
    )


def test_full_restormer_has_the_published_parameter_count():
    count = lambda net: sum(p.numel() for p in net.parameters())  # noqa: E731
    assert count(Restormer()) == 26_126_644  # 26.13 M, as the paper and the official code give
    assert len(Restormer().state_dict()) == 494
    assert count(Restormer(LayerNorm_type="BiasFree")) == 26_111_668


def test_checkpoint_pth_and_safetensors_load_and_run(tmp_path, tiny_pth):
    st = tmp_path / "tiny.safetensors"
    save_file({k: v.contiguous() for k, v in tiny_state().items()}, str(st))
    wrapped = tmp_path / "wrapped.pth"
    torch.save(
        {"state_dict": {"module." + k: v for k, v in tiny_state().items()}, "epoch": 3}, wrapped
    )
    outs = []
    for path in (tiny_pth, st, wrapped):
        target = build_restormer_target("deblur", path, config=TINY, device="cpu")
        out = target(image(), {})
        assert out.shape == (37, 53, 3) and out.dtype == np.float32 and np.isfinite(out).all()
        assert target.id == "restormer-deblur" and target.weights == "pretrained"
        outs.append(out)
    np.testing.assert_array_equal(outs[0], outs[1])
    np.testing.assert_array_equal(outs[0], outs[2])
    spec = target.spec()
    assert (
        spec["config"]["LayerNorm_type"] == "WithBias"
        and spec["factor"] == 8
        and len(spec["checkpoint_sha256"]) == 64
    )
    json.dumps(spec)  # goes into the member key


def test_published_task_configurations():
    published = {
        "inp_channels": 3,
        "out_channels": 3,
        "dim": 48,
        "num_blocks": [4, 6, 6, 8],
        "num_refinement_blocks": 4,
        "heads": [1, 2, 4, 8],
        "ffn_expansion_factor": 2.66,
        "bias": False,
        "dual_pixel_task": False,
    }
    for task, norm in [
        ("deblur", "WithBias"),
        ("defocus", "WithBias"),
        ("derain", "WithBias"),
        ("denoise", "BiasFree"),
        ("denoise-gaussian", "BiasFree"),
    ]:
        assert restormer_config(task) == {**published, "LayerNorm_type": norm}
    with pytest.raises(ValueError, match="unknown Restormer task"):
        build_restormer_target("dehaze", "x.pth")
    with pytest.raises(ValueError, match="unknown Restormer argument"):
        restormer_config("deblur", width=3)


def test_a_renamed_key_lists_missing_and_unexpected(tmp_path):
    state = tiny_state()
    state["out.weight"] = state.pop("output.weight")
    path = tmp_path / "renamed.pth"
    torch.save({"params": state}, path)
    with pytest.raises(CheckpointError, match="renamed.pth") as e:
        build_restormer_target("deblur", path, config=TINY)
    assert "'output.weight'" in str(e.value) and "'out.weight'" in str(e.value)
    with pytest.raises(CheckpointError, match="size mismatch"):  # right names, other configuration
        build_restormer_target(
            "deblur",
            _save(tmp_path, "wide.pth", Restormer(**{**TINY, "dim": 16}).state_dict()),
            config=TINY,
        )
    with pytest.raises(CheckpointError, match="not found"):
        build_restormer_target("deblur", tmp_path / "nope.pth", config=TINY)
    free = _save(tmp_path, "free.pth", Restormer(**TINY, LayerNorm_type="BiasFree").state_dict())
    with pytest.raises(CheckpointError, match="denoising models are BiasFree"):
        build_restormer_target("deblur", free, config=TINY)


def _save(folder, name, state):
    torch.save({"params": state}, folder / name)
    return folder / name


def _touch(path):  # would run if a checkpoint could execute code
    open(path, "w").close()


class _Payload:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return _touch, (self.marker,)


def test_a_pickled_object_is_refused_and_runs_nothing(tmp_path):
    module_ckpt = tmp_path / "module.pth"
    torch.save(nn.Conv2d(3, 3, 3), module_ckpt)
    with pytest.raises(
        CheckpointError, match=r"module\.pth: refused: it holds pickled Python objects"
    ):
        load_checkpoint(module_ckpt)
    marker = tmp_path / "ran"
    evil = tmp_path / "evil.pth"
    torch.save({"params": {"w": torch.zeros(1)}, "x": _Payload(str(marker))}, evil)
    with pytest.raises(CheckpointError, match="refused"):
        load_checkpoint(evil)
    assert not marker.exists()
    (tmp_path / "junk.pth").write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="junk.pth"):
        load_checkpoint(tmp_path / "junk.pth")


USER_MODULE = """
import torch
from torch import nn

def build():
    return nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 3, 3, padding=1))

def not_a_module():
    return 42
"""


@pytest.fixture
def user_module(tmp_path, monkeypatch):
    (tmp_path / "ptg_user_net.py").write_text(textwrap.dedent(USER_MODULE))
    monkeypatch.syspath_prepend(str(tmp_path))
    yield "ptg_user_net"
    sys.modules.pop("ptg_user_net", None)


def user_checkpoint(tmp_path, seed=0, name="user.pth"):
    import ptg_user_net

    torch.manual_seed(seed)
    return _save(tmp_path, name, ptg_user_net.build().state_dict())


def test_user_target_loads_and_runs(tmp_path, user_module):
    target = build_network_target("ptg_user_net:build", user_checkpoint(tmp_path), device="cpu")
    assert target.id == "user-ptg_user_net-build" and target.weights == "pretrained"
    assert (
        target.spec()["factory"] == "ptg_user_net:build"
        and len(target.spec()["module_sha256"]) == 64
    )
    out = target(image(), {})
    assert out.shape == (37, 53, 3) and out.dtype == np.float32


def test_user_target_errors(tmp_path, user_module):
    ckpt = user_checkpoint(tmp_path)
    cases = [
        ("no_such_module_xyz:build", "cannot import module"),
        ("ptg_user_net:nope", "no callable 'nope'"),
        ("ptg_user_net:not_a_module", "returned int, not a torch.nn.Module"),
        ("ptg_user_net", "module.path:factory"),
    ]
    for name, message in cases:
        with pytest.raises(ValueError, match=message):
            build_user_target(name, ckpt)
    with pytest.raises(CheckpointError, match="not found"):
        build_user_target("ptg_user_net:build", tmp_path / "missing.pth")
    with pytest.raises(CheckpointError, match="tiny.pth does not fit"):
        build_user_target("ptg_user_net:build", _save(tmp_path, "tiny.pth", tiny_state()))
    with pytest.raises(ValueError, match="give its checkpoint"):
        build_network_target("ptg_user_net:build", None)


def test_the_key_changes_with_the_checkpoint_bytes(tmp_path, user_module):
    a = build_user_target("ptg_user_net:build", user_checkpoint(tmp_path, 0, "a.pth"))
    b = build_user_target("ptg_user_net:build", user_checkpoint(tmp_path, 1, "b.pth"))
    shutil.copy(tmp_path / "a.pth", tmp_path / "copy.pth")  # same bytes, another file
    same = build_user_target("ptg_user_net:build", tmp_path / "copy.pth")
    assert a.spec()["checkpoint_sha256"] != b.spec()["checkpoint_sha256"]
    assert key_of(a.spec()) != key_of(b.spec()) and key_of(a.spec()) == key_of(same.spec())
    tiled = build_user_target("ptg_user_net:build", tmp_path / "a.pth", tile=32, overlap=8)
    assert key_of(tiled.spec()) != key_of(a.spec())


def test_target_from_spec_rebuilds_and_checks_the_checkpoint(tmp_path, tiny_pth):
    target = build_restormer_target(
        "denoise",
        _save(tmp_path, "d.pth", Restormer(**TINY, LayerNorm_type="BiasFree").state_dict()),
        config=TINY,
        tile=32,
        overlap=8,
    )
    spec = json.loads(json.dumps(target.spec()))
    again = target_from_spec(spec, tmp_path / "d.pth")
    assert again.spec() == target.spec()
    np.testing.assert_array_equal(again(image(), {}), target(image(), {}))
    torch.manual_seed(5)
    other = _save(tmp_path, "other.pth", Restormer(**TINY, LayerNorm_type="BiasFree").state_dict())
    with pytest.raises(ValueError, match="differs from the one the store was made with"):
        target_from_spec(spec, other)


class ThreeConvs(nn.Module):
    """Receptive field 7x7 (radius 3). Weights are multiples of 1/4 in [-1/4, 1/4] and the test
    image multiples of 1/16, so every sum is exact in float32 whatever order a convolution
    kernel adds in: any difference between tiled and untiled output is a tiling error."""

    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(3, 8, 3, padding=1),
            nn.ReLU(),
            nn.Conv2d(8, 8, 3, padding=1),
            nn.ReLU(),
            nn.Conv2d(8, 3, 3, padding=1),
        )
        gen = torch.Generator().manual_seed(0)
        with torch.no_grad():
            for p in self.parameters():
                p.copy_(torch.randint(-1, 2, p.shape, generator=gen) / 4)

    def forward(self, x):
        return self.body(x)


@pytest.mark.parametrize("factor,tile,overlap", [(1, 24, 6), (4, 32, 12), (8, 40, 16)])
def test_tiled_equals_untiled_within_the_receptive_field(factor, tile, overlap):
    net, lq = ThreeConvs(), np.round(image(70, 101) * 16) / 16
    whole = NetworkTarget(net, "convs", {}, factor=factor, device="cpu")(lq, {})
    tiled = NetworkTarget(net, "convs", {}, factor=factor, tile=tile, overlap=overlap, device="cpu")
    assert tiled.weights == "random" and tiled.spec()["tile"] == tile
    np.testing.assert_array_equal(tiled(lq, {}), whole)
    too_thin = NetworkTarget(net, "convs", {}, factor=factor, tile=tile, overlap=0, device="cpu")
    assert not np.array_equal(too_thin(lq, {}), whole)  # the test can see a seam


def test_spans_cover_every_pixel_once_far_from_cuts():
    for length, tile, overlap, factor in [
        (100, 32, 8, 1),
        (104, 40, 16, 8),
        (33, 64, 16, 8),
        (260, 64, 20, 4),
    ]:
        spans = tiling.spans(length, tile, overlap, factor)
        kept = np.zeros(length, int)
        for s, e, k0, k1 in spans:
            assert s % factor == 0 and e - s == min(tile, length) and s <= k0 < k1 <= e
            assert (k0 == 0 or k0 - s >= overlap // 2) and (k1 == length or e - k1 >= overlap // 2)
            kept[k0:k1] += 1
        assert (kept == 1).all()
    with pytest.raises(ValueError, match="multiple of 8"):
        NetworkTarget(ThreeConvs(), "convs", {}, factor=8, tile=36)


def test_an_image_above_the_budget_runs_in_tiles_sized_from_the_network():
    """Without --target-tile, memory follows a tile for images above max_pixels: the tile and the
    threshold come from the network's measured activation bytes per pixel and the budget, both are in
    the key, and a tiled result is the exact tiled computation (ThreeConvs: exact within its field)."""
    net, lq = ThreeConvs(), np.round(image(150, 230) * 16) / 16
    # 8 channels x 4 bytes per pixel at most, so 0.05 MB -> about 270 px at LIVE_FACTOR 6, tiles of 16
    small = NetworkTarget(net, "convs", {}, factor=4, overlap=8, device="cpu", budget_mb=0.05)
    auto = small.spec()["auto_tile"]
    assert auto["budget_mb"] == 0.05 and auto["max_pixels"] < 150 * 230 and auto["tile"] % 4 == 0
    assert small.tile_for(148, 232) == auto["tile"] and small.tile_for(8, 8) is None
    explicit = NetworkTarget(net, "convs", {}, factor=4, tile=auto["tile"], overlap=8, device="cpu")
    np.testing.assert_array_equal(small(lq, {}), explicit(lq, {}))
    roomy = NetworkTarget(
        net, "convs", {}, factor=4, overlap=8, device="cpu"
    )  # default budget: one pass
    assert roomy.tile_for(152, 232) is None
    np.testing.assert_array_equal(
        roomy(lq, {}), NetworkTarget(net, "convs", {}, factor=4, device="cpu")(lq, {})
    )
    assert roomy.spec() != small.spec()  # another budget is another member


def test_a_builtin_target_records_its_automatic_tiling_and_is_rebuilt_from_it():
    target = build_builtin_target(
        "mprnet-deblur",
        config={"n_feat": 8, "scale_unetfeats": 4, "scale_orsnetfeats": 4, "num_cab": 1},
        allow_random=True,
        budget_mb=2.0,
    )
    auto = target.spec()["auto_tile"]
    assert auto["budget_mb"] == 2.0 and auto["tile"] >= 2 * auto["overlap"]
    again = target_from_spec(target.spec(), None, device="cpu")
    assert again.spec() == target.spec()


def test_restore_runs_recorded_user_code_only_named_and_unchanged(
    tmp_path, monkeypatch, user_module
):
    """A run records `evilmod:factory` (importing it writes a marker): restore refuses it unless the
    user names it, and then checks the module file's sha256 before importing it."""
    from pipeline import restore

    marker = tmp_path / "imported"
    (tmp_path / "evilmod.py").write_text(
        f"open({str(marker)!r}, 'w').close()\n"
        "def factory():\n    raise RuntimeError('factory called')\n"
    )
    recorded = {
        "factory": "evilmod:factory",
        "module_sha256": "0" * 64,
    }  # another version of the file
    spec = {"network": "user", "checkpoint_sha256": "1" * 64, **recorded}
    build = [
        {
            "name": "evilmod:factory",
            "spec": {"weights": "pretrained", "weights_sha256": "2" * 64, **recorded},
        }
    ]
    with pytest.raises(ValueError, match="pass --target evilmod:factory"):
        restore.target_from_spec(spec, "w.pth")
    with pytest.raises(ValueError, match="pass --encoder evilmod:factory"):
        restore.encoders_from_run(build)
    named = ["evilmod:factory"]
    with pytest.raises(
        ValueError, match=r"evilmod\.py has sha256 \w+, not the 000000000000.* before importing"
    ):
        restore.target_from_spec(spec, "w.pth", allow_code=named)
    with pytest.raises(
        ValueError, match=r"evilmod\.py has sha256 \w+, not the 000000000000.* before importing"
    ):
        restore.encoders_from_run(build, allow_code=named)
    assert not marker.exists()
    target = build_user_target("ptg_user_net:build", user_checkpoint(tmp_path), device="cpu")
    spec = json.loads(json.dumps(target.spec()))
    with pytest.raises(ValueError, match="pass --target ptg_user_net:build"):
        restore.target_from_spec(spec, tmp_path / "user.pth")
    again = restore.target_from_spec(spec, tmp_path / "user.pth", allow_code=["ptg_user_net:build"])
    assert again.spec() == target.spec()  # named and unchanged: rebuilt
