"""Training without ground truth (the paper's Table 4): `--loss zerodce`, `--loss sci` and the `unpaired` layout."""

import json

import numpy as np
import pytest
import torch
from PIL import Image

from pipeline.extract import FeaturesConfig, build_features
from pipeline.layouts import detect
from pipeline.sources import SourceError
from stores import Store
from training.losses import (
    SCI_FIDELITY,
    SCI_SIGMA,
    ZERODCE_WEIGHTS,
    colour_constancy,
    exposure_control,
    illumination_smoothness,
    sci_loss,
    spatial_consistency,
    zerodce_loss,
    zerodce_terms,
)
from training.step import train_step
from training.train import TrainConfig, train


def slow_sci_loss(refined: np.ndarray, lq: np.ndarray) -> float:
    """SCI's loss written pixel by pixel from the paper (Sec. 3.3), for one (3, H, W) image."""
    u = np.clip(lq / np.clip(refined, 1e-3, 1), 1e-4, 1)
    m = np.array([[0.257, 0.504, 0.098], [-0.148, -0.291, 0.439], [0.439, -0.368, -0.071]])
    ycc = np.einsum("oc,chw->ohw", m, lq)
    h, w = lq.shape[1:]
    smooth = 0.0
    for dy in range(-2, 3):
        for dx in range(-2, 3):
            if (dy, dx) == (0, 0):
                continue
            terms = [
                np.exp(-((ycc[:, i, j] - ycc[:, i + dy, j + dx]) ** 2).sum() / (2 * SCI_SIGMA**2))
                * np.abs(u[:, i, j] - u[:, i + dy, j + dx]).sum()
                for i in range(h)
                for j in range(w)
                if 0 <= i + dy < h and 0 <= j + dx < w
            ]
            smooth += np.mean(terms)
    return SCI_FIDELITY * np.mean((u - lq) ** 2) + smooth


def test_sci_loss_by_hand():
    rng = np.random.default_rng(0)
    lq = rng.random((3, 5, 7)) * 0.3
    refined = np.clip(lq * 3 + rng.random((3, 5, 7)) * 0.1, 0, 1)
    got = sci_loss(torch.tensor(refined[None]), torch.tensor(lq[None])).item() / refined.size
    assert got == pytest.approx(slow_sci_loss(refined, lq), rel=1e-5)
    flat = torch.full((1, 3, 6, 6), 0.2)  # u = 0.2 / 0.4 = 0.5 everywhere: fidelity only
    assert sci_loss(torch.full((1, 3, 6, 6), 0.4), flat).item() / flat.numel() == pytest.approx(
        1.5 * 0.3**2
    )
    # an output above 1 cannot push the illumination below the input (SCI's u >= x): no escape to a ~0 loss
    x = torch.tensor(lq[None])
    assert (
        sci_loss(torch.full_like(x, 50.0), x).item()
        == sci_loss(torch.ones_like(x), x).item()
        > 0.1 * x.numel()
    )


def regions(values, size=4, channels=3) -> torch.Tensor:
    """A (1, C, size*rows, size*cols) image, each size x size region one value (per channel if a tuple)."""
    t = torch.tensor(values, dtype=torch.float64)
    t = t[None].expand(channels, *t.shape) if t.dim() == 2 else t.permute(2, 0, 1)
    return t.repeat_interleave(size, 1).repeat_interleave(size, 2)[None]


def test_spatial_consistency_by_hand():
    lq = regions(
        [[0.1, 0.3]]
    )  # two 4x4 regions side by side: one neighbour pair, seen from both sides, K = 2
    enhanced = regions([[(0.1, 0.2, 0.3), (0.8, 0.8, 0.8)]])  # channel means 0.2 and 0.8
    assert spatial_consistency(enhanced, lq).item() == pytest.approx(
        2 * ((0.2 - 0.8) - (0.1 - 0.3)) ** 2 / 2
    )
    assert spatial_consistency(lq + 0.4, lq).item() == pytest.approx(
        0, abs=1e-12
    )  # same contrasts: no cost
    # 2x2 regions: each has 2 neighbours inside (the image border adds no term), K = 4
    lq4, en4 = regions([[0.1, 0.2], [0.3, 0.4]]), regions([[0.1, 0.4], [0.3, 0.4]])
    pairs = [
        ((0.1 - 0.4) - (0.1 - 0.2)),
        ((0.1 - 0.3) - (0.1 - 0.3)),
        ((0.4 - 0.4) - (0.2 - 0.4)),
        ((0.3 - 0.4) - (0.3 - 0.4)),
    ]  # the 4 neighbour pairs, each counted from both sides
    assert spatial_consistency(en4, lq4).item() == pytest.approx(2 * sum(d * d for d in pairs) / 4)


def test_exposure_control_by_hand():
    img = regions([[0.6, 0.2]], size=16)  # two 16x16 patches: means 0.6 and 0.2, E = 0.6
    assert exposure_control(img).item() == pytest.approx((0.0**2 + 0.4**2) / 2)
    assert exposure_control(img, e=0.2).item() == pytest.approx(0.4**2 / 2)


def test_colour_constancy_by_hand():
    img = torch.cat(
        [regions([[(0.5, 0.3, 0.2)]]), torch.full((1, 3, 4, 4), 0.4, dtype=torch.float64)]
    )
    one = ((0.5 - 0.3) ** 4 + (0.5 - 0.2) ** 4 + (0.3 - 0.2) ** 4) ** 0.5  # the grey image adds 0
    assert colour_constancy(img).item() == pytest.approx(one / 2)


def test_illumination_smoothness_by_hand():
    a = torch.tensor([[[[0.0, 1.0, 2.0], [0.0, 0.0, 0.0]]]], dtype=torch.float64)
    vertical = (0 + 1 + 4) / ((2 - 1) * 3)  # squared differences down the columns / their count
    horizontal = (1 + 1 + 0 + 0) / (2 * (3 - 1))
    assert illumination_smoothness(a).item() == pytest.approx(2 * (vertical + horizontal))
    assert illumination_smoothness(torch.cat([a, a, a], 1)).item() == pytest.approx(
        3 * 2 * (vertical + horizontal)
    )
    assert illumination_smoothness(torch.cat([a, 0 * a])).item() == pytest.approx(
        vertical + horizontal
    )  # batch mean


def test_zerodce_loss_on_ptgrm_output_prefers_a_well_exposed_image_to_white():
    """The collapse of --loss sci: on a dark, noisy input, a white output scores better than the
    ground truth, since the illumination u = lq / refined it implies is the input itself (no
    fidelity cost) and any darker output amplifies the input's noise in u by 1 / refined (more
    smoothness cost). ZeroDCE's exposure term makes white expensive."""
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[:32, :32] / 31
    gt = torch.tensor(
        np.stack([0.35 + 0.5 * yy, 0.35 + 0.5 * xx, 0.6 + 0 * xx])[None]
    )  # well exposed, mean 0.6
    lq = (gt * 0.05 + torch.tensor(rng.normal(0, 0.01, gt.shape))).clamp(
        0, 1
    )  # its dark, noisy input
    base = gt * 0.3  # a target that brightens too little
    white = torch.ones_like(gt)
    assert (
        sci_loss(white, lq).item() < sci_loss(gt, lq).item()
    )  # the collapse, as measured on the demo
    assert zerodce_loss(white, lq, base).item() > zerodce_loss(gt, lq, base).item()
    terms = zerodce_terms(base, lq, base)  # PTG-RM at initialisation: refined == clamp(base)
    assert terms["smoothness"].item() == 0 and terms["exposure"].item() == pytest.approx(
        exposure_control(base).item()
    )
    total = sum(ZERODCE_WEIGHTS[k] * v for k, v in terms.items()) * base.numel()
    assert zerodce_loss(base, lq, base).item() == pytest.approx(total.item())
    assert ZERODCE_WEIGHTS == {
        "spatial": 1,
        "exposure": 10,
        "colour": 5,
        "smoothness": 200,
    }  # the authors' code


@pytest.mark.parametrize("loss", [sci_loss, zerodce_loss])
def test_a_no_reference_step_never_reads_the_ground_truth(loss):
    from ptgrm.model import PTGRM, PTGRMConfig

    torch.manual_seed(0)
    net = PTGRM(PTGRMConfig(osf_dim=8))
    batch = {
        "lq": torch.rand(2, 3, 32, 32) * 0.2,
        "base": torch.rand(2, 3, 32, 32),
        "g": torch.rand(2, 8),
    }
    a = train_step(
        net, {**batch, "gt": torch.rand(2, 3, 32, 32)}, torch.device("cpu"), None, 0, 1, loss
    )
    b = train_step(
        net, {**batch, "gt": torch.zeros(2, 3, 32, 32)}, torch.device("cpu"), None, 0, 1, loss
    )
    assert a[0].item() == b[0].item() and a[1].item() == b[1].item()


def dark(rng, h=48, w=64) -> np.ndarray:
    return (rng.random((h, w, 3)) * 40).astype(np.uint8)


def unpaired_folder(root):
    rng = np.random.default_rng(0)
    (root / "train").mkdir(parents=True)
    for k in range(3):
        Image.fromarray(dark(rng)).save(root / "train" / f"night{k}.png")
    for sub in ("lq", "gt"):
        (root / "test" / sub).mkdir(parents=True)
    for k in range(2):
        gt = (rng.random((48, 64, 3)) * 255).astype(np.uint8)
        Image.fromarray(gt).save(root / "test" / "gt" / f"t{k}.png")
        Image.fromarray((gt * 0.15).astype(np.uint8)).save(root / "test" / "lq" / f"t{k}.png")
    return root


def test_unpaired_layout_caches_inputs_only_and_trains_with_a_no_reference_loss(
    tmp_path, tiny_clip
):
    data = unpaired_folder(tmp_path / "night")
    assert detect(data) != "unpaired"  # named only: unpaired:folder
    stores = build_features(
        FeaturesConfig(
            task="lowlight",
            data=f"unpaired:{data}",
            encoder=f"openclip:{tiny_clip}",
            store_root=str(tmp_path / "stores"),
        ),
    )
    train_store, test_store = sorted(stores, key=lambda p: "-test-" in p.name)
    source = Store(train_store).manifest()["members"]["pairs"]["spec"]["source"]
    assert source["ground_truth"] is False and source["layout"] == "unpaired"
    assert "ground_truth" not in Store(test_store).manifest()["members"]["pairs"]["spec"]["source"]
    cfg = TrainConfig(
        train_store=str(train_store),
        test_store=str(test_store),
        runs_dir=str(tmp_path / "runs"),
        run="nogt",
        encoder=f"openclip:{tiny_clip}",
        steps=3,
        batch=2,
        crop=32,
        workers=0,
        eval_every=0,
        log_every=1,
    )
    with pytest.raises(ValueError, match=r"no ground truth .*--loss zerodce or sci"):
        train(cfg)
    with pytest.raises(ValueError, match=r"--exposure is a mean intensity in \(0, 1\), got 60"):
        train(TrainConfig(**{**cfg.__dict__, "loss": "zerodce", "exposure": 60}))
    for loss in ("sci", "zerodce"):
        result = train(TrainConfig(**{**cfg.__dict__, "loss": loss, "exposure": 0.5}))
        assert (
            result["n_images"] == 2
            and np.isfinite(result["psnr_refined"])
            and result["target_weights"] == "pretrained"
        )
        recorded = json.loads((tmp_path / "runs" / "nogt" / "model.json").read_text())["train"]
        assert recorded["loss"] == loss and recorded["exposure"] == 0.5
        rows = [
            json.loads(line)
            for line in (tmp_path / "runs" / "nogt" / "metrics.jsonl").read_text().splitlines()
        ]
        assert all(np.isfinite(r["loss_mean"]) for r in rows if "loss_mean" in r)
    with pytest.raises(ValueError, match="evaluation needs a paired test split"):
        train(
            TrainConfig(**{**cfg.__dict__, "loss": "sci", "test_store": str(train_store)}),
        )
    from ptgrm.refine import load_model
    from training.data import Split
    from training.evaluate import evaluate

    model, _ = load_model(tmp_path / "runs" / "nogt")
    with pytest.raises(
        ValueError, match=r"night-train-.* no ground truth .*evaluate on a paired test split"
    ):
        evaluate(model, Split.open(train_store, None, [f"openclip:{tiny_clip}"]))  # make eval on it
    with pytest.raises(SourceError, match=r"test/lq lacks the inputs of 1 images .*t1.png"):
        (data / "test" / "lq" / "t1.png").unlink()
        build_features(
            FeaturesConfig(
                task="lowlight",
                data=f"unpaired:{data}",
                encoder=f"openclip:{tiny_clip}",
                store_root=str(tmp_path / "stores2"),
                splits=("test",),
            ),
        )


def test_the_trainer_applies_zerodce_with_the_configured_exposure_to_ptgrm_output():
    from ptgrm.model import PTGRM, PTGRMConfig
    from training.train import no_reference_loss

    torch.manual_seed(0)
    net = PTGRM(PTGRMConfig(osf_dim=8))
    batch = {
        "lq": torch.rand(2, 3, 32, 32) * 0.2,
        "base": torch.rand(2, 3, 32, 32) * 1.2,
        "g": torch.rand(2, 8),
        "gt": torch.rand(2, 3, 32, 32),
    }
    loss, base_loss = train_step(
        net,
        batch,
        torch.device("cpu"),
        None,
        0,
        1,
        no_reference_loss(TrainConfig(loss="zerodce", exposure=0.3)),
    )
    refined = net(batch["base"], batch["lq"], batch["g"])  # at initialisation: clamp(base)
    assert loss.item() == pytest.approx(
        zerodce_loss(refined, batch["lq"], batch["base"], e=0.3).item()
    )
    assert base_loss.item() == pytest.approx(loss.item())  # the base's own loss: the same output
    assert loss.item() != pytest.approx(
        zerodce_loss(refined, batch["lq"], batch["base"]).item()
    )  # E = 0.6
