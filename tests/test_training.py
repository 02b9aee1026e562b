"""The trainer researchers trust: repeatable, resumable, DDP, paper-style evaluation, reports."""

import json
import os
import re
import shutil
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from skimage.metrics import structural_similarity
from toys import make_store, make_task_stores

from ptgrm.model import PTGRM
from ptgrm.refine import load_model
from stores import StoreError
from training.__main__ import main
from training.metrics import rgb_to_y, ssim

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def stores(tmp_path_factory):
    root = tmp_path_factory.mktemp("toy-stores")
    make_task_stores(root)
    return root


def train_args(stores, runs, run, *extra):
    return [
        "train",
        "--task",
        "deblur",
        "--data",
        "toy",
        "--store-root",
        str(stores),
        "--runs-dir",
        str(runs),
        "--run",
        run,
        "--steps",
        "10",
        "--batch",
        "4",
        "--crop",
        "32",
        "--log-every",
        "2",
        "--ckpt-every",
        "100",
        "--workers",
        "0",
        *extra,
    ]


def weights(run_dir):
    return (run_dir / "model.safetensors").read_bytes()


def test_stopped_and_resumed_run_ends_where_the_uninterrupted_run_ends(stores, tmp_path):
    assert main(train_args(stores, tmp_path, "full")) == 0
    assert main(train_args(stores, tmp_path, "parts", "--stop-at", "6")) == 0
    assert not (tmp_path / "parts" / "eval.json").exists()
    assert json.loads((tmp_path / "parts" / "model.json").read_text())["step"] == 6
    assert main(train_args(stores, tmp_path, "parts", "--resume")) == 0
    assert weights(tmp_path / "parts") == weights(tmp_path / "full")
    full, parts = ((tmp_path / r / "metrics.jsonl").read_text() for r in ("full", "parts"))

    def strip(text):
        return [
            {k: v for k, v in json.loads(x).items() if k != "data_wait_frac"}  # noqa: E731
            for x in text.splitlines()
        ]

    assert strip(parts) == strip(full)


class MovedToDouble(PTGRM):
    """Moving it to the training device also makes it float64: on a CPU, optimizer state loaded
    before the move then mismatches its parameters, as it does on a GPU (state on the CPU)."""

    def to(self, *args, **kwargs):
        return super().to(*args, **kwargs).double()

    def forward(self, base, lq, g):
        return super().forward(base.double(), lq.double(), g.double()).float()


def test_resume_loads_the_optimizer_state_where_the_model_trains(stores, tmp_path, monkeypatch):
    monkeypatch.setattr("training.train.PTGRM", MovedToDouble)
    assert main(train_args(stores, tmp_path, "full")) == 0
    assert main(train_args(stores, tmp_path, "parts", "--stop-at", "6")) == 0
    assert main(train_args(stores, tmp_path, "parts", "--resume")) == 0
    assert weights(tmp_path / "parts") == weights(tmp_path / "full")


def test_cuda_graph_path_trains_like_eager_and_resumes_across_modes(stores, tmp_path, capsys):
    """--cuda-graph on a CPU: the capture is skipped with its reason, but the step's static buffers,
    fused Adam with a tensor learning rate and device-side loss sums run; the result stays within
    float tolerance of the eager run (fused Adam sums in another order), its checkpoints hold plain
    float rates, and a run resumes in the other mode."""
    assert main(train_args(stores, tmp_path, "eager")) == 0
    capsys.readouterr()
    assert main(train_args(stores, tmp_path, "graph", "--cuda-graph")) == 0
    assert "--cuda-graph: capture skipped (not on a GPU)" in capsys.readouterr().out
    eager, graph = (
        json.loads((tmp_path / r / "eval.json").read_text()) for r in ("eager", "graph")
    )
    assert abs(eager["psnr_refined"] - graph["psnr_refined"]) < 0.01
    rows = [json.loads(x) for x in (tmp_path / "graph" / "metrics.jsonl").read_text().splitlines()]
    eager_rows = [
        json.loads(x) for x in (tmp_path / "eager" / "metrics.jsonl").read_text().splitlines()
    ]
    losses = [
        (r["loss_mean"], e["loss_mean"]) for r, e in zip(rows, eager_rows) if "loss_mean" in r
    ]
    assert len(losses) == 5 and all(abs(a - b) <= 1e-3 * abs(b) for a, b in losses)
    state = torch.load(tmp_path / "graph" / "state.pt", weights_only=True)
    assert all(type(g["lr"]) is float for g in state["optimizer"]["param_groups"])
    assert all(type(x) is float for x in state["scheduler"]["_last_lr"])
    # stopped in one mode, resumed in the other: both finish where their own modes' runs end
    assert main(train_args(stores, tmp_path, "mixed", "--cuda-graph", "--stop-at", "6")) == 0
    assert main(train_args(stores, tmp_path, "mixed", "--resume")) == 0
    mixed = json.loads((tmp_path / "mixed" / "eval.json").read_text())
    assert abs(mixed["psnr_refined"] - eager["psnr_refined"]) < 0.01
    assert main(train_args(stores, tmp_path, "back", "--stop-at", "6")) == 0
    assert main(train_args(stores, tmp_path, "back", "--resume", "--cuda-graph")) == 0
    assert (
        abs(
            json.loads((tmp_path / "back" / "eval.json").read_text())["psnr_refined"]
            - eager["psnr_refined"]
        )
        < 0.01
    )


def test_a_checkpoint_loads_into_the_optimizer_each_mode_builds():
    """An eager checkpoint resumed with --cuda-graph keeps the graph run's fused (capturable on a GPU)
    Adam and its tensor rate, set to the checkpoint's value; a graph checkpoint resumed eagerly
    keeps plain Adam. (load_state_dict alone takes the checkpoint's flags: on a GPU the graph run
    then failed at its first step, "lr as a Tensor is not supported for capturable=False".)"""
    from training.step import float_lrs, load_optimizer, make_optimizer

    def trained(graph: bool):
        p = torch.nn.Parameter(torch.ones(4))
        opt = make_optimizer([p], 1e-3, torch.device("cpu"), graph)
        p.sum().backward()
        opt.step()
        opt.param_groups[0]["lr"] = torch.tensor(5e-4) if graph else 5e-4
        return float_lrs(opt.state_dict())

    for saved_graph, graph in ((False, True), (True, False)):
        state = trained(saved_graph)
        opt = make_optimizer([torch.nn.Parameter(torch.ones(4))], 1e-3, torch.device("cpu"), graph)
        rate = opt.param_groups[0]["lr"]
        load_optimizer(opt, state)
        group = opt.param_groups[0]
        assert bool(group.get("fused")) == graph
        assert (
            (group["lr"] is rate and float(rate) == pytest.approx(5e-4))
            if graph
            else group["lr"] == pytest.approx(5e-4)
        )
        assert torch.allclose(opt.state[group["params"][0]]["exp_avg"], torch.full((4,), 0.1))


@pytest.mark.parametrize(
    "argv",
    [
        ["training", "train", "--ste", "5"],
        ["pipeline", "features", "--enc", "x"],
        ["stores", "ls", "--js"],
        ["slurm", "train", "--ste", "5"],
    ],
)
def test_no_entry_point_takes_an_abbreviated_flag(argv):
    out = subprocess.run([sys.executable, "-m", *argv], capture_output=True, text=True, cwd=ROOT)
    assert out.returncode == 2 and "unrecognized arguments" in out.stderr, out.stderr[-300:]


def test_loader_workers_default_to_none_on_a_small_cpu_machine(monkeypatch):
    """On at most 2 CPUs without a GPU a Zarr store's crops load in the training process (a loader
    process would take a core from the compute threads); elsewhere, and for a stream, one."""
    from training import train as t

    cfg, cpu, gpu = t.TrainConfig(), torch.device("cpu"), torch.device("cuda")
    monkeypatch.setattr(t, "cpu_count", lambda: 2)
    assert t.loader_workers(cfg, cpu) == 0
    assert (
        t.loader_workers(replace(cfg, format="wds"), cpu) == 1 and t.loader_workers(cfg, gpu) == 1
    )
    assert t.loader_workers(replace(cfg, workers=3), cpu) == 3
    monkeypatch.setattr(t, "cpu_count", lambda: 16)
    assert t.loader_workers(cfg, cpu) == 1


def test_cuda_graph_refuses_compile(stores, tmp_path, capsys):
    assert main(train_args(stores, tmp_path, "both", "--cuda-graph", "--compile")) == 1
    assert "--compile-mode reduce-overhead" in capsys.readouterr().err


def test_resume_past_a_partial_metrics_line_and_a_damaged_checkpoint(stores, tmp_path, capsys):
    run = tmp_path / "cut"
    assert main(train_args(stores, tmp_path, "full")) == 0
    assert main(train_args(stores, tmp_path, "cut", "--stop-at", "4", "--ckpt-every", "2")) == 0
    with open(run / "metrics.jsonl", "a") as f:
        f.write('{"step": 5, "loss"')  # killed while writing a line
    with pytest.warns(UserWarning, match=r"metrics.jsonl: dropped its partial last line"):
        assert (
            main(
                train_args(
                    stores, tmp_path, "cut", "--stop-at", "6", "--resume", "--ckpt-every", "2"
                )
            )
            == 0
        )
    state = (run / "state.pt").read_bytes()
    (run / "state.pt").write_bytes(state[: len(state) // 2])  # a damaged copy
    with pytest.warns(
        UserWarning, match=r"state.pt cannot be read .*resuming from .*state.prev.pt \(step 4\)"
    ):
        assert main(train_args(stores, tmp_path, "cut", "--resume", "--ckpt-every", "2")) == 0
    assert weights(run) == weights(
        tmp_path / "full"
    )  # steps 5 and 6 again, from the checkpoint of step 4
    assert (run / "state.damaged.pt").read_bytes() == state[
        : len(state) // 2
    ]  # kept aside, not resumed again

    def strip(p):
        return [
            {k: v for k, v in json.loads(x).items() if k != "data_wait_frac"}  # noqa: E731
            for x in p.read_text().splitlines()
        ]

    assert strip(run / "metrics.jsonl") == strip(tmp_path / "full" / "metrics.jsonl")
    for name in ("state.pt", "state.prev.pt"):
        (run / name).write_bytes(b"garbage")
    capsys.readouterr()
    assert main(train_args(stores, tmp_path, "cut", "--resume", "--ckpt-every", "2")) == 1
    err = capsys.readouterr().err
    assert (
        "state.pt cannot be read" in err
        and "state.prev.pt cannot be read" in err
        and "without --resume" in err
    )


def test_saved_images_of_two_sets_with_the_same_file_name_both_stay(tmp_path):
    root = tmp_path / "stores"
    make_store(root, "train", 8, (48, 48))
    make_store(
        root, "test", 3, (44, 52), names=["setA/0001.png", "setB/0001.png", "../../escape.png"]
    )
    assert main(train_args(root, tmp_path, "img", "--steps", "2", "--save-images")) == 0
    images = tmp_path / "img" / "images"
    saved = sorted(p.relative_to(images).as_posix() for p in images.rglob("*.png"))
    assert saved == ["escape.png", "setA/0001.png", "setB/0001.png"]
    assert (images / "setA/0001.png").read_bytes() != (images / "setB/0001.png").read_bytes()
    assert not list(tmp_path.glob("*.png"))


def test_resume_refuses_other_settings(stores, tmp_path):
    assert main(train_args(stores, tmp_path, "r", "--stop-at", "4")) == 0
    assert main(train_args(stores, tmp_path, "r", "--resume", "--lr", "0.001")) == 1


def rebuilt_stores(tmp_path):
    """The toy task's stores rebuilt with other content (another seed): other pairs keys."""
    root = tmp_path / "rebuilt"
    make_store(root, "train", 12, (48, 48), seed=1)
    make_store(root, "test", 3, (44, 52), seed=1)
    return root


def test_resume_eval_and_ablation_refuse_a_rebuilt_store_naming_both_keys(stores, tmp_path, capsys):
    assert main(train_args(stores, tmp_path, "k", "--stop-at", "4")) == 0
    recorded = json.loads((tmp_path / "k" / "model.json").read_text())
    other = rebuilt_stores(tmp_path)
    capsys.readouterr()
    assert main(train_args(other, tmp_path, "k", "--resume")) == 1
    err = capsys.readouterr().err
    assert recorded["train_store"]["pairs_key"] in err and "with key" in err and "rebuilt" in err
    new_key = json.loads(next(other.glob("*-train-*/manifest.json")).read_text())["members"][
        "pairs"
    ]["key"]
    assert new_key in err
    assert main(train_args(stores, tmp_path, "k", "--resume")) == 0  # the same stores: resumes
    eval_args = ["eval", *train_args(other, tmp_path, "k")[1:]]
    assert main(eval_args) == 1 and recorded["test_store"]["pairs_key"] in capsys.readouterr().err
    from training.ablate import finished
    from training.train import TrainConfig, open_splits

    cfg = TrainConfig(
        task="deblur",
        data="toy",
        store_root=str(stores),
        runs_dir=str(tmp_path),
        run="k",
        steps=10,
        batch=4,
        crop=32,
        log_every=2,
        ckpt_every=100,
        workers=0,
    )
    assert finished(tmp_path / "k", cfg, open_splits(cfg)) is not None
    with pytest.raises(StoreError, match="with key"):
        finished(tmp_path / "k", cfg, open_splits(replace(cfg, store_root=str(other))))


def test_eval_files_and_report(stores, tmp_path):
    assert main(train_args(stores, tmp_path, "rep", "--eval-every", "4")) == 0
    run = tmp_path / "rep"
    result = json.loads((run / "eval.json").read_text())
    lo, hi = result["gain_psnr_ci95"]
    assert lo <= result["gain_psnr"] <= hi
    rows = (run / "eval.csv").read_text().splitlines()
    assert len(rows) == 1 + result["n_images"] and rows[0].startswith("name,")
    page = (run / "report.html").read_text()
    refs = re.findall(r'src="([^"]+)"', page)
    assert {"loss.png", "psnr.png"} <= set(refs) and any(r.startswith("crops/") for r in refs)
    assert all((run / r).is_file() for r in refs)
    assert f"{result['psnr_base']:.2f} -&gt; {result['psnr_refined']:.2f}" in page
    assert (run / "report.md").is_file()
    assert any(p.name.startswith("events.out.tfevents") for p in (run / "tb").iterdir())
    evals = [
        json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines() if "eval_psnr" in x
    ]
    assert [e["step"] for e in evals] == [4, 8, 10]


def test_ablation_switch_and_bad_switch(stores, tmp_path):
    assert (
        main(
            train_args(stores, tmp_path, "abl", "--ablate", "sve,channel_attention", "--steps", "2")
        )
        == 0
    )
    model, sidecar = load_model(tmp_path / "abl")
    assert sidecar["model"]["sve"] is False and sidecar["model"]["channel_attention"] is False
    assert main(train_args(stores, tmp_path, "bad", "--ablate", "no_such_part")) == 1


def test_perceptual_loss_without_weights_is_a_clear_error(stores, tmp_path, capsys):
    assert main(train_args(stores, tmp_path, "p", "--perceptual", "0.1")) == 1
    assert "--vgg-weights" in capsys.readouterr().err
    assert (
        main(
            train_args(stores, tmp_path, "p", "--perceptual", "0.1", "--vgg-weights", "/no/vgg.pth")
        )
        == 1
    )
    assert "/no/vgg.pth" in capsys.readouterr().err


def test_perceptual_loss_with_vgg19_weights_trains(stores, tmp_path):
    """Random weights in torchvision's VGG19 layout, saved as a features-only safetensors file
    (what the real vgg19-dcbb9e9d.pth holds beside the classifier), through the real loader."""
    from safetensors.torch import save_file
    from torchvision.models.vgg import cfgs, make_layers

    from training.losses import VGGPerceptual

    torch.manual_seed(0)
    state = {f"features.{k}": v for k, v in make_layers(cfgs["E"]).state_dict().items()}
    save_file(state, tmp_path / "vgg19.safetensors")
    loss = VGGPerceptual(str(tmp_path / "vgg19.safetensors"))
    x = torch.rand(2, 3, 32, 32)
    assert loss(x, x).item() == 0 and loss(x, x.flip(-1)).item() > 0
    assert (
        main(
            train_args(
                stores,
                tmp_path,
                "vgg",
                "--steps",
                "3",
                "--perceptual",
                "0.1",
                "--vgg-weights",
                str(tmp_path / "vgg19.safetensors"),
            )
        )
        == 0
    )
    assert load_model(tmp_path / "vgg")[1]["step"] == 3
    save_file({"conv.weight": torch.zeros(1)}, tmp_path / "other.safetensors")  # not VGG19
    with pytest.raises(ValueError, match="not a torchvision VGG19 state dict"):
        VGGPerceptual(str(tmp_path / "other.safetensors"))


FP32 = ("--precision", "fp32")


def test_two_process_gloo_ddp_trains_and_rank0_checkpoint_loads(stores, tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [
        sys.executable,
        "-m",
        "training",
        *train_args(stores, tmp_path, "ddp", "--device", "cpu", "--nproc", "2", *FP32),
    ]
    out = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, env=env, timeout=300)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-4000:]
    model, sidecar = load_model(tmp_path / "ddp")
    assert sidecar["step"] == 10 and (tmp_path / "ddp" / "eval.json").is_file()
    # the same global batches as one process: the weights agree up to float summation order
    # (in fp32: bf16 autocast rounds each process's half-batch activations on their own)
    assert main(train_args(stores, tmp_path, "single", *FP32)) == 0
    single, _ = load_model(tmp_path / "single")
    for (name, a), b in zip(model.state_dict().items(), single.state_dict().values()):
        assert np.allclose(a.numpy(), b.numpy(), atol=1e-4), name


@pytest.mark.parametrize("name", ["chelsea", "coffee", "astronaut"])
def test_ssim_matches_scikit_image(name):
    import skimage.data as skd

    gt = getattr(skd, name)()
    noisy = np.clip(gt + np.random.default_rng(0).normal(0, 12, gt.shape), 0, 255).astype(np.uint8)
    ref = structural_similarity(
        gt,
        noisy,
        gaussian_weights=True,
        sigma=1.5,
        use_sample_covariance=False,
        data_range=255,
        channel_axis=-1,
    )
    assert abs(ssim(gt, noisy) - ref) < 1e-4
    y_ref = structural_similarity(
        rgb_to_y(gt),
        rgb_to_y(noisy),
        gaussian_weights=True,
        sigma=1.5,
        use_sample_covariance=False,
        data_range=255,
    )
    assert abs(ssim(rgb_to_y(gt), rgb_to_y(noisy)) - y_ref) < 1e-4


def test_y_channel_is_matlab_rgb2ycbcr_on_uint8_rounded():
    from common.metrics import psnr
    from training.metrics import quality

    px = np.array(
        [[[255, 255, 255], [255, 0, 0], [0, 255, 0], [0, 0, 255], [128, 128, 128], [0, 0, 0]]],
        np.uint8,
    )
    # 16 + (65.481 R + 128.553 G + 24.966 B) / 255, rounded: 235, 81.481, 144.553, 40.966, 125.929, 16
    assert rgb_to_y(px).tolist() == [[235, 81, 145, 41, 126, 16]]
    red, blue = np.full((8, 8, 3), (255, 0, 0), np.uint8), np.full((8, 8, 3), (0, 0, 255), np.uint8)
    # Y 81 vs 41: MSE 1600, PSNR 10 log10(255^2 / 1600) = 16.0896 (unrounded Y would give 15.9769)
    assert quality(red, blue, "y")["psnr"] == pytest.approx(16.08963, abs=1e-4)
    assert psnr(rgb_to_y(red), rgb_to_y(blue)) == pytest.approx(10 * np.log10(255**2 / 1600))


def test_deraining_style_store_is_evaluated_on_y(tmp_path):
    root = tmp_path / "y-stores"
    make_task_stores(root, space="y")
    assert main(train_args(root, tmp_path, "y", "--steps", "2")) == 0
    assert json.loads((tmp_path / "y" / "eval.json").read_text())["space"] == "y"
    shutil.rmtree(root)


def test_ablate_writes_one_table_with_every_row(stores, tmp_path):
    from training.ablate import ROWS

    args = ["ablate", *train_args(stores, tmp_path, "abl", "--steps", "2")[1:]]
    assert main(args) == 0
    table = json.loads((tmp_path / "abl-ablation" / "ablation.json").read_text())
    assert [r["row"] for r in table["rows"]] == [row for row, _ in ROWS]
    params = {r["row"]: r["params"] for r in table["rows"]}
    assert (
        params["w/o SVE"] < params["full PTG-RM"]
        and params["w/o g (no pre-trained prior)"] < params["full PTG-RM"]
    )
    md = (tmp_path / "abl-ablation" / "ablation.md").read_text()
    assert all(row in md for row, _ in ROWS)
    mtime = (tmp_path / "abl-ablate-full-ptg-rm" / "model.safetensors").stat().st_mtime_ns
    assert main(args) == 0  # a second call reuses the finished rows
    assert (tmp_path / "abl-ablate-full-ptg-rm" / "model.safetensors").stat().st_mtime_ns == mtime
    # a row finished by an earlier version, which did not record a setting added since (its
    # default then applies, as on --resume), is still reused
    sidecar_path = tmp_path / "abl-ablate-full-ptg-rm" / "model.json"
    sidecar = json.loads(sidecar_path.read_text())
    del sidecar["train"]["exposure"]
    sidecar_path.write_text(json.dumps(sidecar))
    assert main(args) == 0
    assert (tmp_path / "abl-ablate-full-ptg-rm" / "model.safetensors").stat().st_mtime_ns == mtime


def test_distill_reports_true_and_predicted_g(stores, tmp_path):
    assert main(train_args(stores, tmp_path, "d", "--steps", "4")) == 0
    assert main(["distill", *train_args(stores, tmp_path, "d")[1:], "--distill-steps", "30"]) == 0
    result = json.loads((tmp_path / "d" / "eval.json").read_text())
    for key in ("psnr_refined_true_g", "psnr_refined_predicted_g", "distill_test_cosine"):
        assert np.isfinite(result[key]), key
    assert result["psnr_refined_true_g"] == pytest.approx(result["psnr_refined"])
    assert (tmp_path / "d" / "distill" / "predictor.safetensors").is_file()


def test_distill_skips_samples_excluded_at_extraction(tmp_path):
    from stores.store import RECORDS_DIR, write_json_atomic

    root = tmp_path / "stores"
    paths = make_task_stores(root)
    for path in paths:  # as a non-finite target output leaves it: sample 1 excluded
        target = next((path / "_records").glob("targets__*.json")).name
        write_json_atomic(
            path / RECORDS_DIR / target,
            {"excluded": [{"index": 1, "name": "x", "reason": "nan"}], "notes": []},
        )
    assert main(train_args(root, tmp_path, "dx", "--steps", "2")) == 0
    assert main(["distill", *train_args(root, tmp_path, "dx")[1:], "--distill-steps", "40"]) == 0
    assert np.isfinite(
        json.loads((tmp_path / "dx" / "eval.json").read_text())["distill_test_cosine"]
    )


def test_training_never_writes_to_its_stores(stores, tmp_path):
    def snapshot():
        return {p: (p.stat().st_size, p.stat().st_mtime_ns) for p in Path(stores).rglob("*")}

    before = snapshot()
    for p in Path(stores).rglob(
        "*"
    ):  # a read-only directory (root ignores it; the snapshot does not)
        p.chmod(p.stat().st_mode & ~0o222)
    try:
        assert main(train_args(stores, tmp_path, "ro", "--steps", "3", "--workers", "1")) == 0
    finally:
        for p in Path(stores).rglob("*"):
            p.chmod(p.stat().st_mode | 0o200)
    after = snapshot()
    assert after.keys() == before.keys() and all(after[p][0] == before[p][0] for p in before)
    assert all(after[p][1] == before[p][1] for p in before if p.is_file())


def test_bf16_precision_on_the_cpu_trains_repeatably_and_says_so(stores, tmp_path, capsys):
    """--precision bf16 runs the forward pass under bfloat16 autocast on the CPU too (the default,
    auto, does so where the CPU has native bfloat16): another result than fp32's, the same one
    twice, recorded in eval.json; resumed mid-run it ends where the uninterrupted run ends."""
    from training.step import cpu_has_bf16

    def run(name, *extra):
        assert main(train_args(stores, tmp_path, name, *extra)) == 0

    run("fp32", "--precision", "fp32")
    run("bf16", "--precision", "bf16")
    run("bf16-again", "--precision", "bf16")
    run("bf16-parts", "--precision", "bf16", "--stop-at", "6")
    run("bf16-parts", "--precision", "bf16", "--resume")
    run("auto")
    assert weights(tmp_path / "bf16") == weights(tmp_path / "bf16-again")
    assert weights(tmp_path / "bf16-parts") == weights(tmp_path / "bf16")
    assert weights(tmp_path / "bf16") != weights(tmp_path / "fp32")
    precision = {
        r: json.loads((tmp_path / r / "eval.json").read_text())["precision"]
        for r in ("fp32", "bf16", "auto")
    }
    auto = "bf16" if cpu_has_bf16() else "fp32"
    assert precision == {"fp32": "fp32", "bf16": "bf16", "auto": auto}
    assert weights(tmp_path / "auto") == weights(tmp_path / auto)
    capsys.readouterr()
    assert main(train_args(stores, tmp_path, "bad", "--precision", "fp16")) == 1
    assert "--precision 'fp16': expected auto, bf16 or fp32" in capsys.readouterr().err


def test_data_wait_counts_the_loader_only_not_evals_or_checkpoints(stores, tmp_path, monkeypatch):
    """data_wait_frac is the share of the loop spent waiting for batches. Evaluations and
    checkpoints during training are not waiting for data (they counted as such before: a demo run
    with its 4 PSNR-curve evaluations reported 10-15 % 'data wait' that was mostly evaluation)."""
    import time

    import training.train as tt

    real_eval, real_save = tt.evaluate, tt.save_checkpoint

    def slow_eval(*a, **k):
        time.sleep(1.0)
        return real_eval(*a, **k)

    def slow_save(*a, **k):
        time.sleep(1.0)
        return real_save(*a, **k)

    monkeypatch.setattr(tt, "evaluate", slow_eval)
    monkeypatch.setattr(tt, "save_checkpoint", slow_save)
    args = train_args(stores, tmp_path, "w", "--eval-every", "2", "--ckpt-every", "3")
    assert main(args) == 0
    result = json.loads((tmp_path / "w" / "eval.json").read_text())
    rows = [json.loads(x) for x in (tmp_path / "w" / "metrics.jsonl").read_text().splitlines()]
    # 4 evaluations and 3 checkpoints inside the loop slept 7 s; 10 steps of 4 x 32 px take far less
    assert result["data_wait_frac"] < 0.5, result["data_wait_frac"]
    assert all(r["data_wait_frac"] < 0.5 for r in rows if "data_wait_frac" in r)
