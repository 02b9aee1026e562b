"""bench/gpu.py's bounds: the work counter (exact FLOPs and bytes of known ops), the datasheet
peaks by GPU name (an unknown card gets no bound), and the quick run on a CPU (every row counted,
none given a GPU peak)."""

import importlib.util
import json
import math
import subprocess
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]


def bench_gpu():
    spec = importlib.util.spec_from_file_location("bench_gpu", ROOT / "bench" / "gpu.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


gpu = bench_gpu()
CPU = torch.device("cpu")


def test_the_counter_gives_the_exact_flops_and_bytes_of_known_ops():
    batch, n_in, n_out = 3, 7, 5
    linear, x = torch.nn.Linear(n_in, n_out), torch.rand(batch, n_in)
    with torch.no_grad():
        work = gpu.count_work(lambda: linear(x), CPU)
    assert work["flops"] == 2 * batch * n_in * n_out and work["conv_flops"] == 0
    # reads x, the weight (its transpose is a view: no bytes) and the bias; writes the output
    assert work["bytes"] == 4 * (batch * n_in + n_out * n_in + n_out + batch * n_out)

    a, b = torch.rand(4, 5), torch.rand(5)
    assert gpu.count_work(lambda: a + b, CPU) == {"flops": 0, "conv_flops": 0, "bytes": 4 * 45}
    assert gpu.count_work(lambda: a.expand(2, 4, 5) * 2, CPU)["bytes"] == 4 * (20 + 40)
    assert gpu.count_work(lambda: a.t().reshape(4, 5), CPU)["bytes"] == 4 * 40  # one copy
    assert gpu.count_work(lambda: a.view(5, 4).t(), CPU)["bytes"] == 0  # views move nothing
    assert gpu.count_work(lambda: a.add_(b), CPU)["bytes"] == 4 * 25  # a written, b read

    conv, image = torch.nn.Conv2d(3, 8, 3, padding=1, bias=False), torch.rand(2, 3, 6, 6)
    with torch.no_grad():
        work = gpu.count_work(lambda: conv(image), CPU)
    assert work["flops"] == work["conv_flops"] == 2 * 2 * 6 * 6 * 8 * 3 * 3 * 3


def test_the_peak_table_bounds_known_cards_and_refuses_unknown_ones():
    work = {"flops": 989e12, "conv_flops": 0, "bytes": 1e12}  # one second of bf16 on an H100/H200
    for name in ("NVIDIA H200", "NVIDIA H100 80GB HBM3"):
        row = gpu.bound(work, 1, 0.5, name, bf16=True)
        assert math.isclose(row["bound_per_s"], 1) and math.isclose(row["pct_of_bound"], 50)
        assert "compute-bound" in row["bound"]
    memory = gpu.bound({**work, "bytes": 9.6e12}, 1, 0.25, "NVIDIA H200", bf16=True)
    assert math.isclose(memory["bound_per_s"], 0.5) and "memory-bound" in memory["bound"]
    fp32 = gpu.bound({**work, "bytes": 0}, 1, 0.01, "NVIDIA H200", bf16=False)
    assert math.isclose(fp32["bound_per_s"], 67 / 989)  # matmuls in fp32 off the tensor cores
    for name in ("NVIDIA H200 NVL", "NVIDIA GeForce RTX 4090", "H200"):
        row = gpu.bound(work, 1, 1.0, name, bf16=True)
        assert row["bound"] == f"unknown card: {name}" and "bound_per_s" not in row
        assert "pct_of_bound" not in row
    assert gpu.bound(work, 1, 1.0, None, bf16=True)["bound"] == "no GPU peak"


def test_the_quick_run_on_a_cpu_counts_every_row_and_names_no_gpu_peak(tmp_path):
    out = tmp_path / "results.json"
    run = subprocess.run(
        [sys.executable, "bench/gpu.py", "--quick", "--e2e", "no", "--modes", "cuda-graph"]
        + ["--out", str(out)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-2000:]
    result = json.loads(out.read_text())
    assert result["complete"] and not result["failed"]
    rows = result["rows"]
    assert set(rows) == {
        "extraction_encoder_clip-vit-b32",
        "extraction_encoder_clip-vit-b32_bf16",
        "extraction_encoder_effnet-lite0",
        "extraction_restormer_clip_bf16",  # its compiled twin runs on a GPU only
        "training_bf16_b2_c32",
        "training_bf16_b2_c32_contiguous",
        "training_bf16_b16_c256_cuda-graph",
    }
    assert rows["extraction_encoder_clip-vit-b32_bf16"]["dtype"].startswith("bfloat16")
    for key, row in rows.items():
        assert row["flops"] > 0 and row["bytes"] > 0, key
        assert row["bound"] == "no GPU peak" and "pct_of_bound" not in row, key
