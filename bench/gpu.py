"""GPU benchmark: extraction images/s and PTG-RM training steps/s with bf16 autocast.

Run: `bash bench/gpu.sh` (writes bench/results-gpu.json, naming the GPU). Random weights at real
sizes (ViT-B/32, a Restormer-size target); under 8 minutes on one H100-class GPU.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from pipeline.networks import restormer_config  # noqa: E402
from pipeline.restormer import Restormer  # noqa: E402
from training.losses import charbonnier  # noqa: E402
from training.model import PTGRM, PTGRMConfig  # noqa: E402


def timed(fn, repeats: int, device) -> float:
    fn()  # warm-up (cudnn autotune, compilation)
    if device.type == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(repeats):
        fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return (time.perf_counter() - t0) / repeats


@torch.no_grad()
def extraction(device, batch: int, size: int, repeats: int) -> dict:
    import open_clip

    target = Restormer(**restormer_config("deblur")).to(device).eval()
    clip = open_clip.create_model("ViT-B-32-quickgelu", pretrained=None).to(device).eval()
    x = torch.rand(batch, 3, size, size, device=device)
    amp = torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")

    def step():
        with amp:
            target(x)
            views = torch.nn.functional.interpolate(x, size=(224, 224), mode="bicubic", antialias=True)
            clip.encode_image(torch.cat([views, views.flip(-1), views.flip(-2), views.flip(-1).flip(-2)]))

    t = timed(step, repeats, device)
    return {"images_per_s": batch / t, "batch": batch, "size": size, "seconds_per_batch": t}


def training(device, batch: int, crop: int, repeats: int, compile_model: bool) -> dict:
    torch.manual_seed(0)
    model = PTGRM(PTGRMConfig()).to(device).to(memory_format=torch.channels_last)
    net = torch.compile(model) if compile_model else model
    opt = torch.optim.Adam(model.parameters(), 1e-4, betas=(0.9, 0.99))
    lq, base, gt = (torch.rand(batch, 3, crop, crop, device=device).contiguous(memory_format=torch.channels_last)
                    for _ in range(3))
    g = torch.nn.functional.normalize(torch.randn(batch, 512, device=device), dim=-1)

    def step():
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            out = net(base, lq, g)
        loss = charbonnier(out.float(), gt)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    t = timed(step, repeats, device)
    return {"steps_per_s": 1 / t, "samples_per_s": batch / t, "batch": batch, "crop": crop, "compile": compile_model}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python bench/gpu.py", description=__doc__)
    p.add_argument("--out", default=str(ROOT / "bench" / "results-gpu.json"))
    p.add_argument("--quick", action="store_true", help="tiny sizes (checks the script on a CPU)")
    args = p.parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    name = torch.cuda.get_device_name(0) if device.type == "cuda" else "cpu"
    q = args.quick
    result = {"date": time.strftime("%Y-%m-%d"), "device": name, "torch": torch.__version__, "complete": False,
              "rows": {}}

    def record(key: str, value: dict) -> None:  # written after every row: a run stopped by its time limit keeps them
        result["rows"][key] = value
        Path(args.out).write_text(json.dumps(result, indent=1))
        print(key, json.dumps(value), flush=True)

    record("extraction_restormer_clip_bf16", extraction(device, 2 if q else 16, 64 if q else 512, 1 if q else 10))
    for batch, crop in ([(2, 64)] if q else [(16, 256), (32, 256), (8, 512)]):
        record(f"training_bf16_b{batch}_c{crop}", training(device, batch, crop, 1 if q else 30, False))
    if not q and device.type == "cuda":
        record("training_bf16_compiled_b32_c256", training(device, 32, 256, 30, True))
    result["complete"] = True
    Path(args.out).write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
