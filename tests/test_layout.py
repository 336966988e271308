"""The package's shape: an acyclic import graph and a data wing without jax.

The graph counts every import of a package module wherever it is written
(module level, inside functions, under ``TYPE_CHECKING``): a cycle hidden in
a function-level import is still a cycle in the design.
"""

from __future__ import annotations

import ast
import pathlib
import subprocess
import sys

import pytest

PACKAGE = "mlimages_jax"
ROOT = pathlib.Path(__file__).resolve().parents[1] / PACKAGE
# The TFDS builders: imported (and shipped) as mlimages_jax.datasets.<name>.
BUILDERS = ROOT.parent / "tfds_builder"


def _module_name(path: pathlib.Path) -> str:
  if path.is_relative_to(BUILDERS):
    path = ROOT / "datasets" / path.relative_to(BUILDERS)
  parts = path.relative_to(ROOT.parent).with_suffix("").parts
  return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _modules() -> dict[str, pathlib.Path]:
  return {_module_name(p): p
          for p in sorted(ROOT.rglob("*.py")) + sorted(BUILDERS.rglob("*.py"))}


def import_graph(modules: dict[str, pathlib.Path]) -> dict[str, set[str]]:
  """Module -> the package modules it imports (``from a import b`` names
  the submodule ``a.b`` when that is a module, else the module ``a``)."""
  graph: dict[str, set[str]] = {}
  for name, path in modules.items():
    is_package = path.name == "__init__.py"
    edges: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
      if isinstance(node, ast.Import):
        targets = [alias.name for alias in node.names]
      elif isinstance(node, ast.ImportFrom):
        base = node.module or ""
        if node.level:
          anchor = name.split(".")
          anchor = anchor[:len(anchor) - node.level + is_package]
          base = ".".join(anchor + ([base] if base else []))
        targets = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in modules
                   else base for alias in node.names]
      else:
        continue
      edges.update(t for t in targets if t in modules and t != name)
    graph[name] = edges
  return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
  """One cycle as [a, b, ..., a], or None (iterative depth-first search)."""
  state: dict[str, int] = {}  # 1: on the current path, 2: finished.
  for root in sorted(graph):
    if root in state:
      continue
    path, stack = [root], [iter(sorted(graph[root]))]
    state[root] = 1
    while stack:
      child = next(stack[-1], None)
      if child is None:
        state[path.pop()] = 2
        stack.pop()
      elif state.get(child) == 1:
        return path[path.index(child):] + [child]
      elif child not in state:
        state[child] = 1
        path.append(child)
        stack.append(iter(sorted(graph[child])))
  return None


def test_cycle_finder_finds_a_planted_cycle():
  graph = {"a": {"b"}, "b": {"c"}, "c": {"a", "d"}, "d": set()}
  assert find_cycle(graph) == ["a", "b", "c", "a"]
  assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_graph_sees_function_level_and_type_checking_imports(tmp_path):
  package = tmp_path / "pkg"
  package.mkdir()
  (package / "__init__.py").write_text("")
  (package / "a.py").write_text(
      "from typing import TYPE_CHECKING\n"
      "if TYPE_CHECKING:\n  from pkg.b import Thing\n")
  (package / "b.py").write_text("def f():\n  from pkg import a\n")
  modules = {f"pkg.{p.stem}" if p.stem != "__init__" else "pkg": p
             for p in package.glob("*.py")}
  graph = import_graph(modules)
  assert graph["pkg.a"] == {"pkg.b"} and graph["pkg.b"] == {"pkg.a"}
  assert find_cycle(graph) is not None


def test_package_has_no_import_cycle():
  graph = import_graph(_modules())
  assert len(graph) > 40  # Every module was found.
  assert "mlimages_jax.train.steps" in graph["mlimages_jax.train.loop"]
  assert graph["mlimages_jax.datasets.ml_images"] == {
      "mlimages_jax.datasets.ml_images.ml_images_dataset_builder"}
  cycle = find_cycle(graph)
  assert cycle is None, "import cycle: " + " -> ".join(cycle)


# The data wing and its command-line tools must start fast: no jax, no
# tensorflow (and no flax/optax/orbax, which import jax).
LIGHT_MODULES = sorted(
    [name for name in _modules()
     if name.split(".")[1:2] in (["data"], ["acquire"])]
    + ["mlimages_jax.fileio", "mlimages_jax.cli", "mlimages_jax.cli.hierarchy",
       "mlimages_jax.cli.labels", "mlimages_jax.cli.acquire"])


def test_data_wing_imports_neither_jax_nor_tensorflow():
  code = ("import importlib, sys\n"
          f"for name in {LIGHT_MODULES!r}:\n"
          "  importlib.import_module(name)\n"
          "heavy = sorted({m.split('.')[0] for m in sys.modules} & "
          "{'jax', 'jaxlib', 'tensorflow', 'flax', 'optax', 'orbax'})\n"
          "print(heavy)\n")
  out = subprocess.run([sys.executable, "-c", code], capture_output=True,
                       text=True, check=True).stdout
  assert out.strip() == "[]", f"the data wing imported {out.strip()}"


def test_recipes_load_without_jax_or_tensorflow():
  """A config file is read at flag parsing: it must stay instant."""
  code = ("import importlib.util, sys\n"
          "for name in ('pretrain', 'finetune_imagenet'):\n"
          "  spec = importlib.util.spec_from_file_location(\n"
          "      name, f'configs/{name}.py')\n"
          "  module = importlib.util.module_from_spec(spec)\n"
          "  spec.loader.exec_module(module)\n"
          "  module.get_config('demo')\n"
          "heavy = sorted({m.split('.')[0] for m in sys.modules} & "
          "{'jax', 'jaxlib', 'tensorflow', 'flax', 'optax', 'orbax'})\n"
          "print(heavy)\n")
  out = subprocess.run([sys.executable, "-c", code], capture_output=True,
                       text=True, check=True, cwd=ROOT.parent).stdout
  assert out.strip() == "[]", f"loading a recipe imported {out.strip()}"


# Who may import whom, from the diagram in docs/ARCHITECTURE.md: each
# top-level module or package of mlimages_jax and the ones below it that it
# may import. Everything not listed is forbidden, so a new package is
# forbidden to all until placed here (test_every_package_has_a_floor).
MAY_IMPORT = {
    "fileio": (),
    "fast_exit": (),  # Called by the process entry points only.
    "decoding": (),  # The decode policy for users' images: a bottom floor.
    "data": ("fileio",),
    "acquire": ("data", "decoding", "fileio"),
    "datasets": ("data", "decoding", "fileio"),
    "models": ("fileio",),
    "inputs": ("data", "datasets", "decoding", "fileio"),
    "checkpoints": ("data", "models", "fileio"),
    "inference": ("checkpoints", "inputs", "models", "data", "decoding",
                  "fileio"),
    "evaluation": ("inference", "inputs", "data", "fileio"),
    "export": ("checkpoints", "inference", "inputs", "models", "fileio"),
    "train": ("checkpoints", "evaluation", "inference", "inputs", "models",
              "datasets", "data", "fileio"),
    "cli": ("acquire", "checkpoints", "data", "evaluation", "export",
            "inference", "inputs", "fast_exit", "fileio"),
    "__main__": ("cli",),
}


def _floor(module: str) -> str:
  """The top-level module or package of mlimages_jax holding `module`."""
  return (module.split(".") + [""])[1]


def upward_imports(graph: dict[str, set[str]], floor: str) -> list[str]:
  """The imports from `floor` of modules it may not import."""
  return sorted(f"{source} -> {target}" for source, targets in graph.items()
                if _floor(source) == floor for target in targets
                if _floor(target) not in (floor, "", *MAY_IMPORT[floor]))


def test_every_package_has_a_floor():
  """No package can be left out of the table, and the floors are a DAG."""
  on_disk = {_floor(name) for name in _modules()} - {""}
  assert on_disk == set(MAY_IMPORT)
  assert find_cycle({k: set(v) for k, v in MAY_IMPORT.items()}) is None


def test_a_planted_upward_import_is_found():
  """checkpoints importing export (the gap of an older, hand-kept table)."""
  graph = import_graph(_modules())
  graph["mlimages_jax.checkpoints.store"] = graph[
      "mlimages_jax.checkpoints.store"] | {"mlimages_jax.export.pytorch"}
  assert upward_imports(graph, "checkpoints") == [
      "mlimages_jax.checkpoints.store -> mlimages_jax.export.pytorch"]


@pytest.mark.parametrize("floor", sorted(MAY_IMPORT))
def test_lower_layers_do_not_import_higher_ones(floor):
  """Data flows one way: the data wing never imports the model wing, and
  nothing below the training loop imports it."""
  bad = upward_imports(import_graph(_modules()), floor)
  assert not bad, bad
