"""SCI (`sci-easy`, `sci-medium`, `sci-difficult`): the published weights ship with the project,
load strictly under the official names, and give the official test's output.

tests/fixtures/sci_official.json was computed once, outside this project, with the authors' own
`Finetunemodel` (github.com/vis-opt-group/SCI at 9d28a3f, model.py; the procedure of their
test.py) and the same three weight files, on four scikit-image photos darkened by the lowlight
demo's degradation; only numbers are stored (per image: mean, channel means, five pixels).
"""

import dataclasses
import json
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch

from pipeline.degrade import lowlight, sample_rng
from pipeline.extract import FeaturesConfig, build_features
from pipeline.networks import BUILTINS, CheckpointError, load_state
from pipeline.restore import target_from_spec
from pipeline.sci import SCI, SCI_WEIGHTS, WEIGHTS_DIR
from pipeline.targets import build_target
from ptgrm.checkpoints import load_checkpoint
from stores import Store

ROOT = Path(__file__).resolve().parents[1]
OFFICIAL = json.loads((Path(__file__).parent / "fixtures" / "sci_official.json").read_text())
VARIANTS = tuple(SCI_WEIGHTS)


def darkened(k: int, name: str) -> np.ndarray:
    """The fixture's input: the photo's top-left 300x400, darkened as the lowlight demo does, as uint8."""
    import skimage.data as skd

    img = getattr(skd, name)()[:300, :400, :3].astype(np.float32) / 255.0
    lq, _ = lowlight(img, sample_rng(OFFICIAL["seed"], k))
    return np.round(lq * 255.0).astype(np.uint8).astype(np.float32) / 255.0


def test_the_shipped_files_are_the_published_ones_with_their_license():
    for v, sha in SCI_WEIGHTS.items():
        import hashlib

        assert hashlib.sha256((WEIGHTS_DIR / f"{v}.pt").read_bytes()).hexdigest() == sha
    assert "MIT License" in (WEIGHTS_DIR / "LICENSE").read_text()
    assert "vis-opt-group/SCI" in (WEIGHTS_DIR / "NOTICE.md").read_text()


@pytest.mark.parametrize("variant", VARIANTS)
def test_published_state_dict_loads_strictly_under_the_official_names(variant):
    state = load_checkpoint(WEIGHTS_DIR / f"{variant}.pt")
    assert len(state) == 83 and any(
        k.startswith("calibrate.") for k in state
    )  # training-only module
    enhance = {k: v for k, v in state.items() if k.startswith("enhance.")}
    net = SCI()
    load_state(net, enhance, variant)  # strict: every enhance.* key, nothing else
    assert set(net.state_dict()) == set(enhance)
    with pytest.raises(CheckpointError, match="missing key"):
        load_state(SCI(), {k: v for k, v in enhance.items() if "out_conv" not in k}, variant)
    target = build_target(f"sci-{variant}", device="cpu")  # the shipped file, no --target-weights
    spec = target.spec()
    assert spec["weights"] == "pretrained" and spec["checkpoint_sha256"] == SCI_WEIGHTS[variant]
    assert spec["ignored_prefix"] == "calibrate." and spec["network"] == "sci"


@pytest.mark.parametrize("variant", VARIANTS)
def test_output_equals_the_official_test_procedure_on_darkened_photos(variant):
    target = build_target(f"sci-{variant}", device="cpu")
    for k, name in enumerate(OFFICIAL["photos"]):
        want = OFFICIAL["weights"][variant][name]
        lq = darkened(k, name)
        assert abs(lq.mean() - want["input_mean"]) < 1e-6, (
            "the darkened input differs from the fixture's"
        )
        out = target(lq, {}).astype(np.float64)
        assert abs(out.mean() - want["mean"]) < 1e-5, (name, out.mean(), want["mean"])
        np.testing.assert_allclose(out.mean((0, 1)), want["channel_means"], atol=1e-5)
        np.testing.assert_allclose(
            [out[y, x] for y, x in OFFICIAL["pixels"]], want["pixels"], atol=1e-5
        )
        assert out.mean() > 2 * lq.mean()  # it brightens


def test_a_damaged_shipped_copy_is_refused(tmp_path, monkeypatch):
    state = load_checkpoint(WEIGHTS_DIR / "medium.pt")
    state["enhance.out_conv.0.bias"] = state["enhance.out_conv.0.bias"] + 0.01
    torch.save(state, tmp_path / "medium.pt")
    spec = BUILTINS["sci-medium"]
    monkeypatch.setitem(
        BUILTINS,
        "sci-medium",
        dataclasses.replace(spec, packaged=(tmp_path / "medium.pt", spec.packaged[1])),
    )
    with pytest.raises(
        CheckpointError, match=r"medium\.pt: sha256 .* not the published file's .*damaged"
    ):
        build_target("sci-medium", device="cpu")
    # another SCI checkpoint given explicitly is the user's choice: loaded, its sha256 in the key
    monkeypatch.setitem(BUILTINS, "sci-medium", spec)
    other = build_target("sci-medium", str(tmp_path / "medium.pt"), device="cpu")
    assert other.spec()["checkpoint_sha256"] != SCI_WEIGHTS["medium"]


def test_lowlight_demo_defaults_to_sci_pretrained_and_restore_rebuilds_it(tmp_path, tiny_clip):
    out = subprocess.run(
        [
            "make",
            "-s",
            "features",
            "TASK=lowlight",
            f"ENCODER=openclip:{tiny_clip}",
            f"STORE_ROOT={tmp_path}",
            "SPLITS=test",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
    )
    assert out.returncode == 0, out.stderr[-2000:]
    [store] = tmp_path.glob("demo-test-lowlight-*")
    members = Store(store).manifest()["members"]
    [(path, info)] = [(p, m) for p, m in members.items() if p.startswith("targets/")]
    assert path.startswith("targets/sci-medium-") and info["weights"] == "pretrained"
    assert info["spec"]["checkpoint_sha256"] == SCI_WEIGHTS["medium"]
    target = target_from_spec(info["spec"])  # no --target-weights needed: the shipped file
    assert target.sha256 == SCI_WEIGHTS["medium"]


def test_a_store_made_with_the_old_default_gamma_is_not_taken_for_sci(tmp_path, tiny_clip):
    """Stores record `target: None` for "the task's default": after lowlight's default became
    sci-medium, a gamma store must not answer a default run as complete."""
    from pipeline.plan import plan_features
    from pipeline.tasks import TASKS

    cfg = dict(
        task="lowlight", encoder=f"openclip:{tiny_clip}", store_root=str(tmp_path), splits=("test",)
    )
    gamma = dataclasses.replace(TASKS["lowlight"], target="gamma")  # the default before SCI
    with pytest.MonkeyPatch.context() as mp:
        mp.setitem(TASKS, "lowlight", gamma)
        build_features(FeaturesConfig(**cfg))
        assert all(p.complete() for p in plan_features(FeaturesConfig(**cfg)))  # complete for gamma
    assert not all(p.complete() for p in plan_features(FeaturesConfig(**cfg)))  # not for sci-medium
    [store] = build_features(FeaturesConfig(**cfg))
    assert sorted(
        p.split("-")[0] for p in Store(store).manifest()["members"] if p.startswith("targets/")
    ) == ["targets/gamma", "targets/sci"]
