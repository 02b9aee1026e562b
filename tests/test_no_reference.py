"""Training without ground truth (the paper's Table 4): `--loss sci` and the `unpaired` layout."""
import json

import numpy as np
import pytest
import torch
from PIL import Image

from pipeline.extract import FeaturesConfig, build_features
from pipeline.layouts import detect
from pipeline.sources import SourceError
from stores import Store
from training.losses import SCI_FIDELITY, SCI_SIGMA, sci_loss
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
            terms = [np.exp(-((ycc[:, i, j] - ycc[:, i + dy, j + dx]) ** 2).sum() / (2 * SCI_SIGMA ** 2))
                     * np.abs(u[:, i, j] - u[:, i + dy, j + dx]).sum()
                     for i in range(h) for j in range(w) if 0 <= i + dy < h and 0 <= j + dx < w]
            smooth += np.mean(terms)
    return SCI_FIDELITY * np.mean((u - lq) ** 2) + smooth


def test_sci_loss_by_hand():
    rng = np.random.default_rng(0)
    lq = rng.random((3, 5, 7)) * 0.3
    refined = np.clip(lq * 3 + rng.random((3, 5, 7)) * 0.1, 0, 1)
    got = sci_loss(torch.tensor(refined[None]), torch.tensor(lq[None])).item() / refined.size
    assert got == pytest.approx(slow_sci_loss(refined, lq), rel=1e-5)
    flat = torch.full((1, 3, 6, 6), 0.2)  # u = 0.2 / 0.4 = 0.5 everywhere: fidelity only
    assert sci_loss(torch.full((1, 3, 6, 6), 0.4), flat).item() / flat.numel() == pytest.approx(1.5 * 0.3 ** 2)
    # an output above 1 cannot push the illumination below the input (SCI's u >= x): no escape to a ~0 loss
    x = torch.tensor(lq[None])
    assert sci_loss(torch.full_like(x, 50.0), x).item() == sci_loss(torch.ones_like(x), x).item() > 0.1 * x.numel()


def test_a_no_reference_step_never_reads_the_ground_truth():
    from ptgrm.model import PTGRM, PTGRMConfig

    torch.manual_seed(0)
    net = PTGRM(PTGRMConfig(osf_dim=8))
    batch = {"lq": torch.rand(2, 3, 32, 32) * 0.2, "base": torch.rand(2, 3, 32, 32), "g": torch.rand(2, 8)}
    a = train_step(net, {**batch, "gt": torch.rand(2, 3, 32, 32)}, torch.device("cpu"), None, 0, 1, sci_loss)
    b = train_step(net, {**batch, "gt": torch.zeros(2, 3, 32, 32)}, torch.device("cpu"), None, 0, 1, sci_loss)
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


def test_unpaired_layout_caches_inputs_only_and_trains_with_a_no_reference_loss(tmp_path, tiny_clip):
    data = unpaired_folder(tmp_path / "night")
    assert detect(data) != "unpaired"  # named only: unpaired:folder
    stores = build_features(FeaturesConfig(task="lowlight", data=f"unpaired:{data}", encoder=f"openclip:{tiny_clip}",
                                           store_root=str(tmp_path / "stores")), log=lambda *_: None)
    train_store, test_store = sorted(stores, key=lambda p: "-test-" in p.name)
    source = Store(train_store).manifest()["members"]["pairs"]["spec"]["source"]
    assert source["ground_truth"] is False and source["layout"] == "unpaired"
    assert "ground_truth" not in Store(test_store).manifest()["members"]["pairs"]["spec"]["source"]
    cfg = TrainConfig(train_store=str(train_store), test_store=str(test_store), runs_dir=str(tmp_path / "runs"),
                      run="nogt", encoder=f"openclip:{tiny_clip}", steps=3, batch=2, crop=32, workers=0, eval_every=0, log_every=1)
    with pytest.raises(ValueError, match=r"no ground truth .*--loss sci"):
        train(cfg, log=lambda *_: None)
    result = train(TrainConfig(**{**cfg.__dict__, "loss": "sci"}), log=lambda *_: None)
    assert result["n_images"] == 2 and np.isfinite(result["psnr_refined"]) and result["target_weights"] == "pretrained"
    assert json.loads((tmp_path / "runs" / "nogt" / "model.json").read_text())["train"]["loss"] == "sci"
    with pytest.raises(ValueError, match="evaluation needs a paired test split"):
        train(TrainConfig(**{**cfg.__dict__, "loss": "sci", "test_store": str(train_store)}), log=lambda *_: None)
    from ptgrm.refine import load_model
    from training.data import Split
    from training.evaluate import evaluate

    model, _ = load_model(tmp_path / "runs" / "nogt")
    with pytest.raises(ValueError, match=r"night-train-.* no ground truth .*evaluate on a paired test split"):
        evaluate(model, Split.open(train_store, None, [f"openclip:{tiny_clip}"]))  # make eval on it
    with pytest.raises(SourceError, match=r"test/lq lacks the inputs of 1 images .*t1.png"):
        (data / "test" / "lq" / "t1.png").unlink()
        build_features(FeaturesConfig(task="lowlight", data=f"unpaired:{data}", encoder=f"openclip:{tiny_clip}",
                                      store_root=str(tmp_path / "stores2"), splits=("test",)), log=lambda *_: None)
