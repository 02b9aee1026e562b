"""Who imports what (docs/design.md, "Who imports what"), read from the source with `ast`: the
rules between the top-level folders, no import cycle between modules, and every third-party import
declared in pyproject.toml. Lazy imports inside functions count like the others."""

import ast
import re
import sys
import tomllib
from collections import defaultdict
from importlib.metadata import packages_distributions
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("common", "stores", "ptgrm", "pipeline", "training", "slurm")
# folder -> the project folders its modules may import (itself included)
MAY_IMPORT = {
    "common": {"common"},
    "stores": {"stores", "common"},
    "ptgrm": {"ptgrm", "stores", "common"},
    "pipeline": {"pipeline", "ptgrm", "stores", "common"},
    "training": {"training", "ptgrm", "stores", "common"},
    "slurm": {"slurm", "pipeline", "training", "ptgrm", "stores", "common"},
    "bench": {"bench", "slurm", "pipeline", "training", "ptgrm", "stores", "common"},
}
# folder -> third-party modules it must never import (frozen networks stay in stage 1)
NEVER = {
    "common": {"open_clip", "diffusers", "transformers", "zarr"},
    "training": {"open_clip", "diffusers", "transformers"},
    "ptgrm": {"open_clip", "diffusers", "transformers"},
    "stores": {"open_clip", "diffusers", "transformers"},
}
# imported only when installed, each behind an ImportError fallback
OPTIONAL = {"transformers"}
MADE_BY_TESTS = {"ptg_user_net"}  # user modules the tests write and import


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def modules(folders) -> dict[str, Path]:
    return {module_name(p): p for f in folders for p in sorted((ROOT / f).rglob("*.py"))}


def imports(name: str, path: Path) -> list[tuple[str, int, bool]]:
    """(absolute module name, line, at module level) of every import in one file."""
    tree = ast.parse(path.read_text(), str(path))
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    top_level = {id(n) for n in tree.body} | {
        id(c) for n in tree.body if isinstance(n, ast.If) for c in n.body
    }
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out += [(a.name, node.lineno, id(node) in top_level) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: resolved against this module's package
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                module = ".".join(base + ([node.module] if node.module else []))
            else:
                module = node.module
            out.append((module, node.lineno, id(node) in top_level))
            # `from . import submit`, `from pipeline import networks`: the submodule is what is imported
            out += [(f"{module}.{a.name}", node.lineno, id(node) in top_level) for a in node.names]
    return out


def project_graph(mods: dict[str, Path]) -> dict[str, set[str]]:
    graph = defaultdict(set)
    for name, path in mods.items():
        for target, _, _ in imports(name, path):
            if target in mods and target != name:
                graph[name].add(target)
    return graph


def test_each_folder_imports_only_what_its_rules_allow():
    bad = {}  # (file, line) -> what is wrong: one line per import statement
    for name, path in modules(MAY_IMPORT).items():
        folder = name.split(".")[0]
        for target, line, top in imports(name, path):
            head, where = target.split(".")[0], f"{path.relative_to(ROOT)}:{line} imports {target}"
            if head in MAY_IMPORT and head not in MAY_IMPORT[folder]:
                bad.setdefault(
                    (path, line),
                    f"{where} ({folder} may import {', '.join(sorted(MAY_IMPORT[folder]))})",
                )
            if head in NEVER.get(folder, ()):
                bad.setdefault((path, line), f"{where} (a frozen network's library)")
            if folder in ("stores", "common") and head == "torch" and top:
                bad.setdefault((path, line), f"{where} at module level ({folder} is torch-free)")
    assert not bad, "\n".join(bad.values())


def test_the_rules_see_the_imports_they_judge():
    """The parser resolves relative, lazy and `from . import x` imports (else the rules prove nothing)."""
    found = {t for t, _, _ in imports("pipeline.restore", ROOT / "pipeline" / "restore.py")}
    assert {"ptgrm.refine", "pipeline.encoders", "pipeline.networks", "common.privacy"} <= found
    assert "slurm.submit" in {
        t for t, _, _ in imports("slurm.features", ROOT / "slurm" / "features.py")
    }
    assert "ptgrm.model" in project_graph(modules(PACKAGES))["ptgrm.refine"]


def test_no_import_cycle_between_modules():
    mods = modules((*PACKAGES, "bench"))
    graph = project_graph(mods)
    state, cycles = {}, []

    def visit(node: str, stack: list[str]) -> None:
        state[node] = "open"
        for nxt in sorted(graph[node]):
            if state.get(nxt) == "open":
                cycles.append(
                    " -> ".join(stack[stack.index(nxt) :] + [node, nxt])
                    if nxt in stack
                    else f"{node} -> {nxt}"
                )
            elif nxt not in state:
                visit(nxt, stack + [node])
        state[node] = "done"

    for m in sorted(mods):
        if m not in state:
            visit(m, [])
    # a package's __init__ importing its own modules is how packages work, not a cycle
    cycles = [c for c in cycles if not re.fullmatch(r"(\w+) -> \1\.\w+ -> \1", c)]
    assert not cycles, "\n".join(cycles)


def declared() -> set[str]:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    specs = project["dependencies"] + [
        d for extra in project.get("optional-dependencies", {}).values() for d in extra
    ]
    return {normalise(re.match(r"[A-Za-z0-9_.-]+", s).group(0)) for s in specs}


def normalise(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def test_pyproject_declares_every_third_party_import():
    deps, dists = declared(), packages_distributions()
    own = (
        set(PACKAGES)
        | {"bench", "__future__"}
        | MADE_BY_TESTS
        | {p.stem for p in (ROOT / "tests").glob("*.py")}
    )
    missing = []
    for name, path in modules((*PACKAGES, "bench", "tests")).items():
        for target, line, _ in imports(name, path):
            head = target.split(".")[0]
            if head in own or head in sys.stdlib_module_names:
                continue
            providers = {normalise(d) for d in dists.get(head, [])} or {
                normalise(h) for h in {head} & OPTIONAL
            }
            if not providers & deps:
                missing.append(
                    f"{path.relative_to(ROOT)}:{line} imports {head} (distribution "
                    f"{', '.join(sorted(providers)) or 'unknown'}), not declared in pyproject.toml"
                )
    assert not missing, "\n".join(sorted(set(missing)))


def test_importing_the_libraries_changes_no_environment_variable():
    """`common`, `stores` and `ptgrm` may be imported by anyone (a notebook, another tool): their
    import sets nothing. Only `common.startup`, imported first by the entry points, sets the
    OpenMP variables."""
    import subprocess

    check = (
        "import os, sys; before = dict(os.environ); import {mods}; "
        "sys.exit(sorted(set(os.environ.items()) ^ set(before.items())) != [])"
    )
    libs = "common, common.runtime, common.privacy, common.metrics, stores, stores.stats, ptgrm"
    env = {k: v for k, v in __import__("os").environ.items() if not k.startswith(("OMP_", "GOMP_"))}
    run = [sys.executable, "-c", check.format(mods=libs)]
    assert subprocess.run(run, cwd=ROOT, env=env).returncode == 0
    startup = [sys.executable, "-c", check.format(mods="common.startup")]
    assert subprocess.run(startup, cwd=ROOT, env=env).returncode == 1  # the one that does
