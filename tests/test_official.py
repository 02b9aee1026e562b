"""The authors' released PTG-RM weights: name table, both directions, errors, run folder, CLI."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from toys import fill_member

from ptgrm.model import PTGRM
from ptgrm.refine import load_model
from stores import Store, make_layout
from training.official import (
    OfficialMismatch,
    export_official,
    import_official,
    import_run,
    load_official,
)

ROOT = Path(__file__).resolve().parents[1]
PREFIX = "refinement11."


def official_shapes() -> dict:
    """Names and shapes of the authors' `refinement2` (nf=16, 512-d CLIP), written out by hand."""
    c3 = lambda o, i: (o, i, 3, 3)  # noqa: E731
    c1 = lambda o, i: (o, i, 1, 1)  # noqa: E731
    shapes = {
        "conv_last2.weight": c3(16, 16),
        "conv_last2.bias": (16,),
        "conv_last3.weight": c3(3, 16),
        "conv_last3.bias": (3,),
        "mapp_space1.weight": (256, 512),
        "mapp_space2.weight": (64, 256),
        "mapp_space11.weight": (256, 512),
        "mapp_space22.weight": (64, 256),
        "mapp_position1.weight": c3(16, 2),
        "mapp_position2.weight": c1(16, 16),
        "mapp_position11.weight": c3(16, 2),
        "mapp_position22.weight": c1(16, 16),
        "mapping11.weight": (16, 80),
        "mapping12.weight": (16, 16),
        "mapp11.weight": c3(144, 96),
        "mapp12.weight": c3(144, 144),
        "mapp1.weight": c3(1, 16),
        "refine11.weight": c1(16, 32),
        "r1.weight": c3(16, 6),
        "r2.weight": c3(16, 16),
        "r22.weight": c3(16, 16),
        "r1_decoder.weight": c3(64, 16),
        "r2_decoder.weight": c3(64, 16),
        "r1norm.weight": (16,),
        "r1norm.bias": (16,),
        "r2norm.weight": (16,),
        "r2norm.bias": (16,),
        "r1_mask.weight": c3(16, 96),
        "r2_mask.weight": c3(1, 16),
        "resnet.conv1.weight": c3(16, 16),
        "resnet.conv1.bias": (16,),
        "resnet.conv2.weight": c3(16, 16),
        "resnet.conv2.bias": (16,),
    }
    for i in range(4):
        shapes.update(
            {
                f"transformer.{i}.{k}": v
                for k, v in {
                    "norm1.body.weight": (16,),
                    "norm1.body.bias": (16,),
                    "attn.temperature": (1, 1, 1),
                    "attn.qkv.weight": c1(48, 16),
                    "attn.qkv_dwconv.weight": (48, 1, 3, 3),
                    "attn.project_out.weight": c1(16, 16),
                    "norm2.body.weight": (16,),
                    "norm2.body.bias": (16,),
                    "ffn.project_in.weight": c1(84, 16),
                    "ffn.dwconv.weight": (84, 1, 3, 3),
                    "ffn.project_out.weight": c1(16, 42),
                }.items()
            }
        )
    return shapes


def official_sd(prefix=PREFIX, seed=0) -> dict:
    g = torch.Generator().manual_seed(seed)
    return {prefix + k: torch.randn(s, generator=g) for k, s in official_shapes().items()}


def joint_network_extras() -> dict:
    """A few keys of the SNR-Aware part of the joint network (its own `transformer` too)."""
    return {
        "conv_first_1.weight": torch.zeros(64, 3, 3, 3),
        "upconv1.bias": torch.zeros(256),
        "transformer.layer_stack.0.slf_attn.w_qs.weight": torch.zeros(1024, 1024),
    }


def test_official_layout_has_the_papers_parameter_count():
    shapes = official_shapes()
    assert len(shapes) == 77
    assert sum(int(np.prod(s)) for s in shapes.values()) == 671_735


def test_import_uses_every_name_once_and_export_round_trips_bit_exact():
    sd = official_sd()
    project = import_official({**sd, **joint_network_extras()})
    assert set(project) == set(PTGRM().state_dict())  # every project parameter filled
    assert sum(v.numel() for v in project.values()) == 671_735
    back = export_official(project)
    assert set(back) == set(sd)  # the same names, nothing else
    assert all(torch.equal(back[k], sd[k]) and back[k].dtype == sd[k].dtype for k in sd)
    bare = import_official({k[len(PREFIX) :]: v for k, v in sd.items()})  # module alone, no prefix
    assert all(torch.equal(bare[k], project[k]) for k in project)
    assert set(export_official(project, prefix="")) == set(official_shapes())


def test_dataparallel_module_prefix_is_accepted():
    sd = official_sd()
    project = import_official({"module." + k: v for k, v in sd.items()})
    assert set(project) == set(PTGRM().state_dict())


def test_name_off_by_one_is_listed_on_both_sides():
    sd = official_sd()
    sd[PREFIX + "transformer.4.attn.qkv.weight"] = sd.pop(PREFIX + "transformer.3.attn.qkv.weight")
    with pytest.raises(OfficialMismatch) as e:
        import_official(sd)
    msg = str(e.value)
    assert (
        "unused source parameters (1)" in msg
        and "transformer.4.attn.qkv.weight (48, 16, 1, 1)" in msg
    )
    assert "unfilled parameters (1)" in msg
    assert "blocks.3.attn.qkv.weight (48, 16, 1, 1) <- expects transformer.3.attn.qkv.weight" in msg


def test_shape_off_by_one_is_listed():
    sd = official_sd()
    sd[PREFIX + "r1_mask.weight"] = torch.zeros(16, 97, 3, 3)
    with pytest.raises(
        OfficialMismatch,
        match=r"r1_mask.weight \(16, 97, 3, 3\) -> mask.0.weight "
        r"expects \(16, 96, 3, 3\)",
    ):
        import_official(sd)


def test_extra_keys_without_the_prefix_are_refused():
    sd = {k[len(PREFIX) :]: v for k, v in official_sd().items()}
    with pytest.raises(OfficialMismatch, match=r"conv_first_1.weight \(64, 3, 3, 3\)"):
        import_official({**sd, "conv_first_1.weight": torch.zeros(64, 3, 3, 3)})


def test_export_refuses_a_project_dict_with_a_missing_parameter():
    project = import_official(official_sd())
    del project["fuse.weight"]
    with pytest.raises(
        OfficialMismatch, match=r"refine11.weight \(16, 32, 1, 1\) <- expects fuse.weight"
    ):
        export_official(project)


def test_load_official_unwraps_common_keys_and_refuses_other_content(tmp_path):
    sd = official_sd()
    for wrapper in ("state_dict", "params", "model"):
        torch.save({wrapper: sd, "iter": 5}, tmp_path / "w.pth")
        loaded = load_official(tmp_path / "w.pth")
        assert set(loaded) == set(sd) and all(torch.equal(loaded[k], sd[k]) for k in sd)
    torch.save({"iter": 5, "note": "nothing"}, tmp_path / "bad.pth")
    with pytest.raises(OfficialMismatch, match="no state dict"):
        load_official(tmp_path / "bad.pth")


class RunsCode:
    def __reduce__(self):
        return (print, ("a checkpoint ran code",))


def test_a_checkpoint_that_would_run_code_is_refused(tmp_path, capsys):
    torch.save({"r1.weight": RunsCode()}, tmp_path / "evil.pth")
    with pytest.raises(OfficialMismatch, match="refused"):
        load_official(tmp_path / "evil.pth")
    assert "ran code" not in capsys.readouterr().out


def test_imported_run_loads_and_matches_a_ptgrm_with_the_mapped_weights(tmp_path):
    sd = {**official_sd(seed=1), **joint_network_extras()}
    torch.save(sd, tmp_path / "SID.pth")
    run_dir = import_run(tmp_path / "SID.pth", "sid", tmp_path / "runs")
    model, sidecar = load_model(run_dir)
    assert sidecar["params"] == 671_735 and sidecar["weights"] == "pretrained"
    assert sidecar["source"]["official_checkpoint"] == str(tmp_path / "SID.pth")
    assert len(sidecar["source"]["sha256"]) == 64 and sidecar["source"]["ignored"] == 3
    ref = PTGRM().eval()
    ref.load_state_dict(import_official(sd))
    g = torch.Generator().manual_seed(0)
    base, lq = torch.rand(2, 3, 16, 24, generator=g), torch.rand(2, 3, 16, 24, generator=g)
    clip = torch.nn.functional.normalize(torch.randn(2, 512, generator=g), dim=-1)
    with torch.no_grad():
        assert torch.equal(model(base, lq, clip), ref(base, lq, clip))
    with pytest.raises(ValueError, match="already holds a run"):
        import_run(tmp_path / "SID.pth", "sid", tmp_path / "runs")


def tiny_test_store(root: Path, n=2, h=20, w=28) -> Path:
    """A complete test store: pairs, one target and one 512-d CLIP member (random content)."""
    key = "ab" * 32
    hws = [(h, w), (h - 4, w - 2)][:n]
    path = root / f"sid-test-lowlight-{key[:12]}"
    store = Store.open_or_create(
        path,
        {"dataset": "sid", "split": "test", "task": "lowlight", "pairs_key": key},
        make_layout(hws, 8, shard_len=4)[0],
    )
    rng = np.random.default_rng(0)
    img = lambda dtype, draw: [draw((hh, ww, 3)).astype(dtype) for hh, ww in hws]  # noqa: E731
    members = [
        (
            "pairs",
            {},
            {
                "lq": img(np.uint8, lambda s: rng.integers(0, 256, s)),
                "gt": img(np.uint8, lambda s: rng.integers(0, 256, s)),
                "hw": np.array(hws, np.int32),
                "names": [f"img{i}.png" for i in range(n)],
                "meta": ["{}"] * n,
            },
        ),
        (
            f"targets/wiener-{'c' * 12}",
            {"target": "wiener", "weights": None},
            {"base": img(np.float16, rng.random)},
        ),
        (
            f"osf/clip-vit-b32-{'d' * 12}",
            {"encoder": "clip-vit-b32", "weights": "pretrained", "dim": 512},
            {"g": rng.standard_normal((n, 4, 512)).astype(np.float32)},
        ),
    ]
    for name, info, data in members:
        fill_member(store, name, (key if name == "pairs" else name[-12:] * 6)[:64], data, info)
    return path


def cli(*args):
    out = subprocess.run(
        [sys.executable, "-m", "training", *map(str, args)],
        cwd=ROOT,
        capture_output=True,
        text=True,
    )
    assert out.returncode == 0, f"{args}:\n{out.stdout}\n{out.stderr}"
    return out


def test_cli_import_official_then_eval_then_export(tmp_path):
    sd = {**official_sd(seed=2), **joint_network_extras()}
    torch.save(sd, tmp_path / "SID.pth")
    store = tiny_test_store(tmp_path / "stores")
    runs = tmp_path / "runs"
    cli("import-official", tmp_path / "SID.pth", "--run", "sid-official", "--runs-dir", runs)
    out = cli(
        "eval",
        "--task",
        "lowlight",
        "--test-store",
        store,
        "--runs-dir",
        runs,
        "--run",
        "sid-official",
    )
    assert "refined" in out.stdout
    result = json.loads((runs / "sid-official" / "eval.json").read_text())
    assert (
        result["n_images"] == 2 and result["params"] == 671_735 and result["run"] == "sid-official"
    )
    assert result["task"] == "lowlight" and result["source"]["sha256"]
    assert np.isfinite(result["psnr_refined"]) and result["weights"] == "pretrained"

    cli("export-official", "--run", "sid-official", "--runs-dir", runs, tmp_path / "out.pth")
    back = torch.load(tmp_path / "out.pth", map_location="cpu", weights_only=True)
    expected = {k: v for k, v in sd.items() if k.startswith(PREFIX)}
    assert set(back) == set(expected) and all(torch.equal(back[k], expected[k]) for k in expected)


def test_cli_help_of_the_official_commands():
    for cmd in ("import-official", "export-official"):
        assert "official" in cli(cmd, "--help").stdout
