"""What the commands say, through `logging` (common/log.py): -v/-q on every entry point and
subcommand, plain lines on stdout, warnings on stderr, no progress bar under -q, the details under
-v, and no function that takes a `log=print` callback any more."""

import ast
import contextlib
import io
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("pipeline", "training", "stores", "slurm")
BENCH = ("run.py", "gpu.py", "scale.py", "stress.py", "metadata.py")


def help_of(main, argv) -> str:
    out = io.StringIO()
    with contextlib.redirect_stdout(out), pytest.raises(SystemExit) as e:
        main([*argv, "--help"])
    assert e.value.code == 0
    return out.getvalue()


def says_verbosity(text: str) -> bool:
    return "-v, --verbose" in text and "-q, --quiet" in text


@pytest.mark.parametrize("package", PACKAGES)
def test_every_subcommand_takes_v_and_q(package):
    main = __import__(f"{package}.__main__", fromlist=["main"]).main
    top = help_of(main, [])
    subcommands = re.search(r"\{([\w,-]+)\}", top).group(1).split(",")
    assert says_verbosity(top) and subcommands
    missing = [s for s in subcommands if not says_verbosity(help_of(main, [s]))]
    assert not missing, f"python -m {package} {missing}: no -v/-q"


@pytest.mark.parametrize("script", BENCH)
def test_every_benchmark_script_takes_v_and_q(script):
    out = subprocess.run(
        [sys.executable, f"bench/{script}", "--help"], cwd=ROOT, capture_output=True, text=True
    )
    assert out.returncode == 0 and says_verbosity(out.stdout), out.stderr[-500:]


def features(root: Path, clip: Path, *flags: str) -> subprocess.CompletedProcess:
    argv = ["features", "--data", "demo", "--splits", "test", "--store-root", str(root)]
    return subprocess.run(
        [sys.executable, "-m", "pipeline", *argv, "--encoder", f"openclip:{clip}", *flags],
        cwd=ROOT,
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        timeout=600,
    )


def test_features_says_steps_by_default_details_with_v_and_only_warnings_with_q(
    tmp_path, tiny_clip
):
    quiet = features(tmp_path / "q", tiny_clip, "-q")
    assert quiet.returncode == 0, quiet.stderr[-2000:]
    assert quiet.stdout == ""  # nothing but warnings, on stderr
    assert all(line.startswith("WARNING: ") for line in quiet.stderr.splitlines()), quiet.stderr
    assert "img/s" not in quiet.stderr  # no progress bar

    default = features(tmp_path / "d", tiny_clip)
    assert default.returncode == 0, default.stderr[-2000:]
    assert "computing pairs" in default.stdout and "complete" in default.stdout
    assert "img/s" in default.stderr and "[pipeline." not in default.stdout

    again = features(tmp_path / "d", tiny_clip, "-v")  # the no-op, with the details
    assert again.returncode == 0, again.stderr[-2000:]
    assert "complete; nothing to compute" in again.stdout
    assert re.search(r"\[pipeline\.plan\] test: \d+ samples .* pairs key \w+", again.stdout)

    silent = features(tmp_path / "d", tiny_clip, "-qq")
    assert (silent.returncode, silent.stdout, silent.stderr) == (0, "", "")


def test_an_error_is_said_whatever_the_verbosity(tmp_path):
    out = subprocess.run(
        [sys.executable, "-m", "stores", "verify", str(tmp_path / "none"), "-qq"],
        cwd=ROOT,
        capture_output=True,
        text=True,
    )
    assert out.returncode != 0 and "none" in out.stderr


def test_no_function_takes_a_print_callback():
    """The messages go through `logging.getLogger(__name__)`, not a `log=print` parameter (and
    no call passes one)."""
    found = []
    for package in (*PACKAGES, "common", "ptgrm", "bench"):
        for path in (ROOT / package).rglob("*.py"):
            for node in ast.walk(ast.parse(path.read_text())):
                if isinstance(node, ast.Call) and any(k.arg == "log" for k in node.keywords):
                    found.append(f"{path.relative_to(ROOT)}:{node.lineno} call with log=")
                if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                    a = node.args
                    positional = a.args[len(a.args) - len(a.defaults) :]
                    named = dict(zip([x.arg for x in positional], a.defaults))
                    named.update((x.arg, d) for x, d in zip(a.kwonlyargs, a.kw_defaults))
                    if isinstance(named.get("log"), ast.Name) and named["log"].id == "print":
                        found.append(f"{path.relative_to(ROOT)}:{node.lineno} {node.name}")
    assert not found, found
