"""The import rules of docs/design.md, checked two ways, each shown to fail on a planted violation.

1. ``fcsae`` and ``results_schema`` never import ray (Ray lives in ``orchestrator``);
2. data modules never import training modules;
3. training modules never import the evals;
4. ``results_schema`` never imports torch.

The static check parses a module's every import statement, function-level
ones included (the project imports heavy modules lazily), and follows the
import-time imports of what it loads transitively. The runtime check imports each group in a fresh interpreter and
inspects ``sys.modules``, which also sees what third-party packages pull in.
"""

from __future__ import annotations

import ast
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PACKAGES = ("fcsae", "results_schema")
DATA = ("fcsae.corpus", "fcsae.corpus_sources", "fcsae.activations", "fcsae.lm")
TRAINING = ("fcsae.sae", "fcsae.trainer", "fcsae.tracker", "fcsae.split", "fcsae.policy", "fcsae.resample")
# fcsae.policy is also the torch-free table fcsae.config validates against (every module reads the config), so
# data modules may load it; it names the training code as strings and imports none of it.
TRAINING_CODE = tuple(m for m in TRAINING if m != "fcsae.policy")


def _rules(modules: list[str]) -> list[tuple[str, list[str], tuple[str, ...]]]:
    """(rule, the modules it constrains, forbidden module prefixes)."""
    return [
        ("fcsae and results_schema never import ray", modules, ("ray",)),
        ("data modules never import training modules", list(DATA), TRAINING_CODE),
        ("training modules never import the evals", list(TRAINING), ("fcsae.evals",)),
        ("results_schema never imports torch", [m for m in modules if m.startswith("results_schema")], ("torch",)),
    ]


def _modules(root: Path) -> dict[str, Path]:
    out = {}
    for pkg in PACKAGES:
        for path in sorted((root / pkg).rglob("*.py")):
            parts = list(path.relative_to(root).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            out[".".join(parts)] = path
    return out


def _walk_import_time(tree: ast.AST):
    """The nodes that run when the module is imported (function bodies excluded)."""
    todo = [tree]
    while todo:
        node = todo.pop()
        yield node
        todo.extend(c for c in ast.iter_child_nodes(node) if not isinstance(c, (ast.FunctionDef, ast.AsyncFunctionDef)))


def _imports(name: str, path: Path, lazy: bool = True) -> set[str]:
    """Every module an ``import``/``from`` in the file names (relative imports resolved); ``lazy``: also in functions."""
    found = set()
    pkg = name if path.name == "__init__.py" else name.rpartition(".")[0]
    tree = ast.parse(path.read_text())
    for node in (ast.walk(tree) if lazy else _walk_import_time(tree)):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(pkg.split(".")[:len(pkg.split(".")) - node.level + 1] + ([base] if base else []))
            found.add(base)
            found.update(f"{base}.{a.name}" for a in node.names)  # ``from fcsae import trainer``
    return found


def _hits(names, forbidden) -> list[str]:
    return sorted(n for n in names if any(n == f or n.startswith(f + ".") for f in forbidden))


def static_violations(root: Path) -> list[str]:
    """Rule violations found by parsing the sources under ``root``.

    A constrained module's own imports count wherever they are (function-level
    ones included); what it loads counts by its import-time imports, followed
    transitively (a function of another module that is never called loads nothing).
    """
    mods = _modules(root)
    own = {m: _imports(m, p) for m, p in mods.items()}
    at_import = {m: _imports(m, p, lazy=False) for m, p in mods.items()}

    def closure(start: str) -> set[str]:
        seen, todo = set(), [start]
        while todo:
            m = todo.pop()
            for dep in (own if m == start else at_import).get(m, ()):
                if dep not in seen:
                    seen.add(dep)
                    if dep in mods:
                        todo.append(dep)
        return seen

    problems = []
    for rule, constrained, forbidden in _rules(list(mods)):
        for m in constrained:
            bad = _hits(closure(m), forbidden)
            if bad:
                problems.append(f"{rule}: {m} imports {', '.join(bad)}")
    return problems


_PROBE = textwrap.dedent("""
    import importlib, sys
    constrained, forbidden = sys.argv[1].split(","), tuple(sys.argv[2].split(","))
    for m in constrained:
        importlib.import_module(m)
    bad = sorted(n for n in sys.modules if any(n == f or n.startswith(f + ".") for f in forbidden))
    print(",".join(bad))
""")


def runtime_violations(root: Path) -> list[str]:
    """Rule violations seen in ``sys.modules`` after importing each rule's modules in a fresh interpreter."""
    problems = []
    for rule, constrained, forbidden in _rules(list(_modules(root))):
        out = subprocess.run([sys.executable, "-c", _PROBE, ",".join(constrained), ",".join(forbidden)], cwd=root,
                             env={"PYTHONPATH": str(root), "PATH": "/usr/bin:/bin"}, capture_output=True, text=True,
                             check=True).stdout.strip()
        if out:
            problems.append(f"{rule}: importing them loads {out}")
    return problems


def test_static_rules_hold():
    assert static_violations(REPO) == []


@pytest.mark.slow  # a fresh interpreter per rule imports torch, transformers and transformer_lens
def test_runtime_rules_hold():
    assert runtime_violations(REPO) == []


PLANTS = {  # file -> line added; each breaks one rule
    "results_schema/store.py": "import ray  # planted\n",
    "fcsae/corpus.py": "def _planted():\n    from fcsae import trainer  # noqa\n",
    "fcsae/tracker.py": "import fcsae.evals.core  # planted\n",
    "results_schema/schema.py": "import torch  # planted\n",
}


@pytest.fixture(scope="module")
def planted(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("planted")
    for pkg in PACKAGES:
        shutil.copytree(REPO / pkg, root / pkg, ignore=shutil.ignore_patterns("__pycache__"))
    for rel, line in PLANTS.items():
        with open(root / rel, "a") as f:
            f.write("\n" + line)
    return root


def test_static_check_fails_on_each_planted_violation(planted):
    problems = static_violations(planted)
    assert any(p.startswith("fcsae and results_schema never import ray: results_schema.store") for p in problems)
    assert any(p.startswith("data modules never import training modules: fcsae.corpus imports") and "fcsae.trainer" in p
               for p in problems)
    assert any(p.startswith("training modules never import the evals: fcsae.tracker imports fcsae.evals")
               for p in problems)
    assert any("results_schema never imports torch: results_schema.schema imports torch" in p for p in problems)


@pytest.mark.slow
def test_runtime_check_fails_on_planted_violations(planted):
    problems = runtime_violations(planted)
    rules = {p.split(":")[0] for p in problems}
    # corpus's planted import is inside a function: only the static check can see it.
    assert rules == {"fcsae and results_schema never import ray", "training modules never import the evals",
                     "results_schema never imports torch"}


def test_plotting_import_leaves_matplotlib_global_state_alone():
    code = "import sys, fcsae.plotting; assert 'matplotlib.pyplot' not in sys.modules, 'pyplot imported'"
    subprocess.run([sys.executable, "-c", code], cwd=REPO, check=True)
