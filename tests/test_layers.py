"""The package's import layers (STYLE.md: library <- models / io <- run <- main), read from the
source with `ast`, every import at any depth (inside functions too: a lazy import that dodges a
cycle is still an edge):

- no import cycle among score_sde modules;
- `ml_collections` only under score_sde/run/ and in score_sde/main.py (the config edge);
- the library (score_sde/*.py but main.py) imports no score_sde.models / io / run / main;
- score_sde.models and score_sde.io import neither each other nor run / main.

`from pkg import sub` counts as importing the module pkg.sub (not pkg) when pkg.sub is one.
The checker itself is tested on a planted package with one violation of each kind.
"""

from __future__ import annotations

import ast
import pathlib

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent  # the repository: ROOT/score_sde
PACKAGE = "score_sde"

# layer -> the layers it must not import.
FORBIDDEN = {
    "library": ("models", "io", "run", "main"),
    "models": ("io", "run", "main"),
    "io": ("models", "run", "main"),
    "run": ("main",),
    "main": (),
}
CONFIG_LIBRARY = "ml_collections"
CONFIG_LAYERS = ("run", "main")


def find_modules(root: pathlib.Path) -> dict[str, pathlib.Path]:
  """Dotted module name -> file, for every .py under `root/score_sde` (a package's
  `__init__.py` is the package's name)."""
  modules = {}
  for path in sorted((root / PACKAGE).rglob("*.py")):
    parts = path.relative_to(root).with_suffix("").parts
    if parts[-1] == "__init__":
      parts = parts[:-1]
    modules[".".join(parts)] = path
  return modules


def _owning_module(dotted: str, modules: dict[str, pathlib.Path]) -> str:
  """The longest prefix of `dotted` that is a module of `modules`, e.g.
  'score_sde.models.build.MODELS' -> 'score_sde.models.build'."""
  parts = dotted.split(".")
  for n in range(len(parts), 0, -1):
    prefix = ".".join(parts[:n])
    if prefix in modules:
      return prefix
  return PACKAGE


def imports_of(name: str, path: pathlib.Path, modules: dict[str, pathlib.Path]
               ) -> tuple[set[str], set[str]]:
  """`(internal, external)`: the score_sde modules `name` imports (resolved to modules of
  `modules`, itself excluded) and the dotted names of every other import, at any depth."""
  package = name if path.name == "__init__.py" else name.rpartition(".")[0]
  internal, external = set(), set()
  for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
    if isinstance(node, ast.Import):
      targets = [alias.name for alias in node.names]
    elif isinstance(node, ast.ImportFrom):
      if node.level:  # relative: level 1 is this module's package, 2 its parent, ...
        base = package.split(".")[:len(package.split(".")) - node.level + 1]
        module = ".".join(base + ([node.module] if node.module else []))
      else:
        module = node.module
      targets = [f"{module}.{alias.name}" if f"{module}.{alias.name}" in modules else module
                 for alias in node.names]
    else:
      continue
    for target in targets:
      if target == PACKAGE or target.startswith(PACKAGE + "."):
        internal.add(_owning_module(target, modules))
      else:
        external.add(target)
  internal.discard(name)
  return internal, external


def import_graph(root: pathlib.Path) -> tuple[dict[str, set[str]], dict[str, set[str]]]:
  """`(graph, external)`: module -> the score_sde modules it imports, and module -> its other
  imports."""
  modules = find_modules(root)
  graph, external = {}, {}
  for name, path in modules.items():
    graph[name], external[name] = imports_of(name, path, modules)
  return graph, external


def find_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
  """One cycle `[a, b, ..., a]` through each back edge of a depth-first search (empty: the
  graph is acyclic)."""
  state, stack, cycles = {}, [], []

  def visit(u):
    state[u] = "open"
    stack.append(u)
    for v in sorted(graph.get(u, ())):
      if state.get(v) == "open":
        cycles.append(stack[stack.index(v):] + [v])
      elif v not in state:
        visit(v)
    stack.pop()
    state[u] = "done"

  for u in sorted(graph):
    if u not in state:
      visit(u)
  return cycles


def layer(name: str) -> str:
  """'main', 'run', 'models', 'io' or 'library' (score_sde itself and its top-level modules)."""
  if name == f"{PACKAGE}.main":
    return "main"
  for sub in ("run", "models", "io"):
    if name == f"{PACKAGE}.{sub}" or name.startswith(f"{PACKAGE}.{sub}."):
      return sub
  return "library"


def layer_violations(graph: dict[str, set[str]]) -> list[str]:
  """'importer -> imported (layer -> layer)' for every import `FORBIDDEN` rules out."""
  return [f"{u} -> {v} ({layer(u)} -> {layer(v)})"
          for u in sorted(graph) for v in sorted(graph[u])
          if layer(v) in FORBIDDEN[layer(u)]]


def config_violations(external: dict[str, set[str]]) -> list[str]:
  """The modules outside `CONFIG_LAYERS` that import `ml_collections`."""
  return sorted(name for name, names in external.items()
                if layer(name) not in CONFIG_LAYERS
                and any(n == CONFIG_LIBRARY or n.startswith(CONFIG_LIBRARY + ".")
                        for n in names))


@pytest.fixture(scope="module")
def package_graph():
  return import_graph(ROOT)


# ---- the package ------------------------------------------------------------------------


def test_the_graph_sees_the_package(package_graph):
  # Guards the checks below against reading nothing: known modules and known edges.
  graph, external = package_graph
  for name in ("score_sde", "score_sde.sde", "score_sde.models", "score_sde.models.ncsnpp",
               "score_sde.io.datasets", "score_sde.run.experiment", "score_sde.main"):
    assert name in graph, name
  assert "score_sde.models" in graph["score_sde.run.experiment"]
  assert "ml_collections" in external["score_sde.run.experiment"]
  assert graph["score_sde.main"] & {m for m in graph if layer(m) == "run"}  # lazy imports too


def test_no_import_cycle(package_graph):
  graph, _ = package_graph
  cycles = find_cycles(graph)
  assert not cycles, "import cycles:\n" + "\n".join(" -> ".join(c) for c in cycles)


def test_ml_collections_only_in_run_and_main(package_graph):
  _, external = package_graph
  bad = config_violations(external)
  assert not bad, f"{CONFIG_LIBRARY} imported outside score_sde/run/ and main.py: {bad}"


@pytest.mark.parametrize("importer", ["library", "models", "io"])
def test_imports_point_down(package_graph, importer):
  graph, _ = package_graph
  bad = [v for v in layer_violations(graph) if f"({importer} ->" in v]
  assert not bad, f"{importer} imports {FORBIDDEN[importer]}:\n" + "\n".join(bad)


def test_only_the_command_line_is_on_top(package_graph):
  graph, _ = package_graph  # nothing imports score_sde.main
  bad = [v for v in layer_violations(graph) if v.endswith("-> main)")]
  assert not bad, "\n".join(bad)


# ---- the checker, on a planted package --------------------------------------------------

PLANTED = {
    "__init__.py": "",
    "sde.py": "import jax\n\ndef f():\n  from score_sde.models import net\n",
    "losses.py": "from score_sde import sde\nfrom score_sde.io import files\n",
    "models/__init__.py": "from score_sde.models.net import Net\n",
    "models/net.py": "from . import util\nfrom .. import sde\n",
    "models/util.py": "import ml_collections\n",
    "io/__init__.py": "",
    "io/files.py": "def g():\n  import score_sde.run.edge\n  from score_sde.models.util import x\n",
    "run/__init__.py": "",
    "run/edge.py": "import ml_collections.config_dict\nfrom score_sde import losses\n",
    "main.py": "import ml_collections\nfrom score_sde.run import edge\n",
}


def test_the_checker_finds_each_planted_violation(tmp_path):
  for rel, text in PLANTED.items():
    (tmp_path / PACKAGE / rel).parent.mkdir(parents=True, exist_ok=True)
    (tmp_path / PACKAGE / rel).write_text(text)
  graph, external = import_graph(tmp_path)
  # `from pkg import sub` and relative imports resolve to the submodule.
  assert graph["score_sde.losses"] == {"score_sde.sde", "score_sde.io.files"}
  assert graph["score_sde.models.net"] == {"score_sde.models.util", "score_sde.sde"}
  assert graph["score_sde.models"] == {"score_sde.models.net"}
  assert graph["score_sde.io.files"] == {"score_sde.run.edge", "score_sde.models.util"}
  # sde -> models.net -> sde (through an import inside a function) and
  # losses -> io.files -> run.edge -> losses.
  cycles = find_cycles(graph)
  assert {frozenset(c) for c in cycles} == {
      frozenset({"score_sde.sde", "score_sde.models.net"}),
      frozenset({"score_sde.losses", "score_sde.io.files", "score_sde.run.edge"})}, cycles
  assert all(c[0] == c[-1] for c in cycles)
  assert config_violations(external) == ["score_sde.models.util"]
  assert layer_violations(graph) == [
      "score_sde.io.files -> score_sde.models.util (io -> models)",
      "score_sde.io.files -> score_sde.run.edge (io -> run)",
      "score_sde.losses -> score_sde.io.files (library -> io)",
      "score_sde.sde -> score_sde.models.net (library -> models)",
  ]
  # Without the planted edges the same package is clean.
  for rel in ("sde.py", "losses.py", "io/files.py", "models/util.py"):
    (tmp_path / PACKAGE / rel).write_text("import jax\n")
  graph, external = import_graph(tmp_path)
  assert not find_cycles(graph) and not layer_violations(graph)
  assert not config_violations(external)


# ---- scripts/ and tests/ ----------------------------------------------------------------

# The one script allowed to put a directory on sys.path: it imports the modules of a checkout
# of the reference implementation (not this project), which import each other by top-level
# names.
SYS_PATH_ALLOWED = {"benchmark_reference.py"}


def script_violations(name: str, text: str) -> list[str]:
  """What makes a script in scripts/ not thin: argparse (the flags are absl's, parsed by
  `run.cli.parse_flags`), `sys.path` edits, `noqa: E402` (configs/ is installed), a helper
  module shared by scripts (that belongs in the package)."""
  tree = ast.parse(text)
  bad = []
  for node in ast.walk(tree):
    if isinstance(node, ast.Import):
      names = [a.name for a in node.names]
    elif isinstance(node, ast.ImportFrom):
      names = [node.module or ""]
    else:
      continue
    if "argparse" in names:
      bad.append(f"{name}: imports argparse")
    if "common" in names:
      bad.append(f"{name}: imports scripts/common.py")
  if "sys.path" in text and name not in SYS_PATH_ALLOWED:
    bad.append(f"{name}: edits sys.path")
  if "noqa: E402" in text:
    bad.append(f"{name}: imports after code (noqa: E402)")
  if "app.run(" in text and "flags_parser=cli.parse_flags" not in text:
    bad.append(f"{name}: absl without run.cli.parse_flags (one error line, exit 2)")
  return bad


def test_scripts_are_thin_absl_tools():
  scripts = sorted((ROOT / "scripts").glob("*.py"))
  assert len(scripts) > 10
  bad = [v for p in scripts for v in script_violations(p.name, p.read_text())]
  assert not bad, "\n".join(bad)
  assert script_violations("x.py", "import argparse\nimport common  # noqa: E402\n"
                           "sys.path.insert(0, '.')\napp.run(main)\n") == [
      "x.py: imports argparse", "x.py: imports scripts/common.py", "x.py: edits sys.path",
      "x.py: imports after code (noqa: E402)",
      "x.py: absl without run.cli.parse_flags (one error line, exit 2)"]


def test_tests_import_the_package_not_scripts():
  """Tests may run a script as a command (subprocess), never import one: no file of
  scripts/ loaded as a module, no scripts/ directory on sys.path."""
  bad = []
  for path in sorted((ROOT / "tests").glob("*.py")):
    text = path.read_text()
    if path.name == "test_layers.py":
      continue
    if "spec_from_file_location" in text and "scripts" in text:
      bad.append(f"{path.name}: loads a module from scripts/")
    if "sys.path" in text:
      bad.append(f"{path.name}: edits sys.path")
  assert not bad, "\n".join(bad)
