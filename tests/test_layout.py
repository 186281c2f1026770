"""The shape of the tree: dependencies point one way, from the pipeline down to the core.

Layers, bottom to top (a module may import its own layer and the ones below, never above):
  0 core      jaxlm/*.py (model, sharding, config, checkpoint, generate, tokenizer, ...)
  1 steps     jaxlm.mt, jaxlm.data, jaxlm.train, jaxlm.synth, jaxlm.judge, jaxlm.eval
  2 sae       sae, sae.analysis
  3 top       jaxlm.pipeline, jaxlm.cli
Every import counts, also one inside a function (a lazy import is still a dependency).
"""

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
STEPS = ("jaxlm.mt", "jaxlm.data", "jaxlm.train", "jaxlm.synth", "jaxlm.judge", "jaxlm.eval")
TOP = ("jaxlm.pipeline", "jaxlm.cli")
NAMES = {0: "the core", 1: "a step package", 2: "sae", 3: "the top layer"}


def layer(module: str) -> int | None:
    """The layer of a jaxlm/sae module; None for anything else (third-party, stdlib)."""
    under = lambda prefixes: any(module == p or module.startswith(p + ".") for p in prefixes)  # noqa: E731
    if under(TOP):
        return 3
    if module == "sae" or module.startswith("sae."):
        return 2
    if under(STEPS):
        return 1
    if module == "jaxlm" or module.startswith("jaxlm."):
        return 0
    return None


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports(path: Path) -> list[tuple[int, str]]:
    """(line, imported module) for every import in the file, at any depth."""
    out = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            out += [(node.lineno, a.name) for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            # `from sae import activations` imports sae.activations: count the submodule too
            out += [(node.lineno, node.module)]
            out += [(node.lineno, f"{node.module}.{a.name}") for a in node.names]
    return out


def _sources() -> list[Path]:
    return sorted(p for d in ("jaxlm", "sae") for p in (ROOT / d).rglob("*.py"))


def test_every_module_has_a_layer():
    assert all(layer(module_name(p)) is not None for p in _sources())


@pytest.mark.parametrize("path", _sources(), ids=lambda p: str(p.relative_to(ROOT)))
def test_imports_point_down(path):
    me = module_name(path)
    mine = layer(me)
    bad = []
    for line, target in imports(path):
        theirs = layer(target)
        if theirs is not None and theirs > mine:
            bad.append(f"{path.relative_to(ROOT)}:{line}: {me} ({NAMES[mine]}) imports "
                       f"{target} ({NAMES[theirs]})")  # fmt: skip
    assert not bad, "\n".join(bad)


def test_the_checker_sees_a_violation(tmp_path):
    """The rule above can fail: a core module importing sae, lazily, is caught."""
    bad = ROOT / "jaxlm" / "_probe_layout.py"
    assert not bad.exists()
    fake = tmp_path / "jaxlm" / "core.py"
    fake.parent.mkdir()
    fake.write_text("def f():\n    from sae.analysis import tsea\n")
    found = [t for _, t in imports(fake) if (layer(t) or 0) > layer("jaxlm.core")]
    assert found == ["sae.analysis", "sae.analysis.tsea"]


def test_package_data_ships_the_rules_table():
    """The sharding rules live inside the package, so a non-editable install can import them."""
    import tomllib

    from jaxlm import sharding

    assert sharding.RULES_PATH.parent == ROOT / "jaxlm" and sharding.RULES_PATH.is_file()
    cfg = tomllib.loads((ROOT / "pyproject.toml").read_text())
    assert "sharding.yaml" in cfg["tool"]["setuptools"]["package-data"]["jaxlm"]
