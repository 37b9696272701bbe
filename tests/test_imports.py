"""No import circle in sparsejax/ (imports under ``if TYPE_CHECKING`` aside)."""

import ast
import pathlib

import sparsejax

ROOT = pathlib.Path(sparsejax.__file__).parent


def _modules() -> dict[str, pathlib.Path]:
  out = {}
  for f in ROOT.rglob("*.py"):
    parts = f.relative_to(ROOT.parent).with_suffix("").parts
    name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
    out[name] = f
  return out


def _imports(path: pathlib.Path, modules) -> set[str]:
  """Every sparsejax module ``path`` imports, at the top or inside a function."""
  found = set()

  def visit(node):
    for child in ast.iter_child_nodes(node):
      if isinstance(child, ast.If) and "TYPE_CHECKING" in ast.unparse(child.test):
        continue
      if (
        isinstance(child, ast.ImportFrom)
        and child.level == 0
        and (child.module or "").startswith("sparsejax")
      ):
        for alias in child.names:
          sub = f"{child.module}.{alias.name}"
          found.add(sub if sub in modules else child.module)
      elif isinstance(child, ast.Import):
        found.update(a.name for a in child.names if a.name.startswith("sparsejax"))
      visit(child)

  visit(ast.parse(path.read_text()))
  return {m for m in found if m in modules and m != "sparsejax"}


def test_no_import_circle_in_sparsejax():
  modules = _modules()
  graph = {name: _imports(path, modules) - {name} for name, path in modules.items()}
  state: dict[str, int] = {}  # 1: on the current path, 2: done

  def visit(name, path):
    state[name] = 1
    for dep in sorted(graph[name]):
      if state.get(dep) == 1:
        cycle = path[path.index(dep) :] + [dep]
        raise AssertionError("import circle: " + " -> ".join(cycle))
      if dep not in state:
        visit(dep, path + [dep])
    state[name] = 2

  for name in sorted(graph):
    if name not in state:
      visit(name, [name])


def test_budgets_and_the_selection_sit_below_masks():
  modules = _modules()
  for low in ("sparsejax.budgets", "sparsejax._select", "sparsejax._sort_keys"):
    deps = _imports(modules[low], modules)
    assert not deps & {"sparsejax.masks", "sparsejax.nm", "sparsejax.scores", "sparsejax.dst"}, (
      low,
      deps,
    )
  assert "sparsejax.nm" not in _imports(modules["sparsejax.masks"], modules)
