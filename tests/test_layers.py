"""The package's layers: every module's imports (top-level and inside functions) go to its own layer
or below, there is no import cycle, and library modules define no commands and print nothing.

  1 config   the schema, loading, validation, the error types
  2 math     the model, its ops, losses, masking, LoRA, the optimizer, FLOPs, the step, decoding,
             the scaling-law fits
  3 parallel the mesh, logical rules, shardings, multi-host
  4 run      the workdir layout, checkpoints, data, the run builder, the loop, metrics, evaluation
  5 apps     train, finetune, convert, bench, sweep, fit, coordcheck, and the commands
"""
import ast
import os

import pytest

from conftest import ROOT

PACKAGE = os.path.join(ROOT, "lmjax")

# module (or package prefix) -> layer; a module not listed is an error, so every new module gets
# a place
LAYERS = {
    "lmjax": 1, "lmjax.errors": 1, "lmjax.schema": 1, "lmjax.config": 1,
    "lmjax.ops": 2, "lmjax.model": 2, "lmjax.flops": 2, "lmjax.trees": 2, "lmjax.lora": 2,
    "lmjax.masking": 2, "lmjax.losses": 2, "lmjax.frozen": 2, "lmjax.optim": 2, "lmjax.step": 2, "lmjax.decode": 2, "lmjax.quantize": 2,
    "lmjax.scaling": 2, "lmjax.scaling.law": 2, "lmjax.scaling.lbfgs": 2,
    "lmjax.scaling.report": 2,
    "lmjax.sharding": 3, "lmjax.distributed": 3,
    "lmjax.workdir": 4, "lmjax.checkpoint": 4, "lmjax.data": 4, "lmjax.builder": 4,
    "lmjax.loop": 4, "lmjax.metrics": 4, "lmjax.evaluate": 4, "lmjax.lock": 4, "lmjax.engine": 4, "lmjax.openai_api": 4,
    "lmjax.train": 5, "lmjax.finetune": 5, "lmjax.fit": 5, "lmjax.cli": 5, "lmjax.classifier": 5, "lmjax.generate": 5,
    "lmjax.hf": 5, "lmjax.bench": 5, "lmjax.aot": 5, "lmjax.memory": 5, "lmjax.mup": 5, "lmjax.prune": 5, "lmjax.compress": 5, "lmjax.server": 5, "lmjax.harness": 5, "lmjax.sweep": 5,
    "lmjax.plotting": 5, "lmjax.scaling.plots": 5, "lmjax.commands": 5, "lmjax.__main__": 5,
}
# where the few prints of the library live: progress lines (process 0) and the commands' output
MAY_PRINT = ("lmjax.metrics", "lmjax.commands")


def layer_of(module: str) -> int:
  """The layer of the longest listed prefix of `module`."""
  parts = module.split(".")
  for n in range(len(parts), 0, -1):
    if ".".join(parts[:n]) in LAYERS:
      return LAYERS[".".join(parts[:n])]
  raise KeyError(module)


def module_files():
  for directory, _, files in os.walk(PACKAGE):
    for name in sorted(files):
      if name.endswith(".py"):
        path = os.path.join(directory, name)
        rel = os.path.relpath(path, ROOT)[:-3].replace(os.sep, ".")
        yield rel.removesuffix(".__init__"), path


def imports_of(module: str, source: str, known: set) -> set:
  """The lmjax modules `source` imports, anywhere in it (`from lmjax import x` names module
  lmjax.x when that is a module, else lmjax itself)."""
  out = set()
  package = module if module in known and any(k.startswith(module + ".") for k in known) else \
      module.rpartition(".")[0]
  for node in ast.walk(ast.parse(source)):
    if isinstance(node, ast.Import):
      out |= {a.name for a in node.names if a.name.split(".")[0] == "lmjax"}
    elif isinstance(node, ast.ImportFrom):
      base = node.module or ""
      if node.level:  # relative: from the importing module's package
        base = ".".join(package.split(".")[:len(package.split(".")) - node.level + 1] +
                        ([base] if base else []))
      if base.split(".")[0] != "lmjax":
        continue
      for alias in node.names:
        full = f"{base}.{alias.name}"
        out.add(full if full in known else base)
  return out - {module}


def import_graph() -> dict:
  files = dict(module_files())
  known = set(files)
  return {m: imports_of(m, open(p).read(), known) for m, p in files.items()}


def upward_imports(graph: dict, layer) -> list:
  return [(m, dep) for m, deps in graph.items() for dep in deps if layer(dep) > layer(m)]


def find_cycle(graph: dict) -> list | None:
  """One import cycle as [a, b, ..., a], or None (depth-first search)."""
  state, stack = {}, []

  def visit(m):
    state[m] = "open"
    stack.append(m)
    for dep in sorted(graph.get(m, ())):
      if state.get(dep) == "open":
        return stack[stack.index(dep):] + [dep]
      if dep not in state and (found := visit(dep)):
        return found
    stack.pop()
    state[m] = "done"
    return None

  for m in sorted(graph):
    if m not in state and (found := visit(m)):
      return found
  return None


def test_the_checks_catch_cycles_and_upward_imports():
  assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
  assert find_cycle({"a": {"b"}, "b": {"c"}, "c": set()}) is None
  layers = {"low": 1, "high": 2}
  assert upward_imports({"low": {"high"}, "high": set()}, layers.get) == [("low", "high")]
  assert upward_imports({"high": {"low"}, "low": set()}, layers.get) == []
  # imports inside functions count, and `from lmjax import x` is module lmjax.x
  source = "def f():\n  from lmjax import train\n  import lmjax.sweep.plan\n"
  assert imports_of("lmjax.model", source, {"lmjax.train", "lmjax.sweep.plan"}) == {
      "lmjax.train", "lmjax.sweep.plan"}


def test_every_module_has_a_layer():
  missing = []
  for module, _ in module_files():
    try:
      layer_of(module)
    except KeyError:
      missing.append(module)
  assert not missing, f"give these modules a layer in LAYERS: {missing}"


def test_imports_go_down_the_layers():
  graph = import_graph()
  assert graph["lmjax.builder"] >= {"lmjax.sharding", "lmjax.model", "lmjax.checkpoint"}
  assert not upward_imports(graph, layer_of), upward_imports(graph, layer_of)


def test_no_import_cycles():
  cycle = find_cycle(import_graph())
  assert cycle is None, " -> ".join(cycle)


def test_the_library_defines_no_commands_and_prints_nothing():
  offenders = []
  for module, path in module_files():
    tree = ast.parse(open(path).read())
    for node in ast.walk(tree):
      if isinstance(node, ast.FunctionDef) and node.name.startswith("main") and \
          not module.startswith("lmjax.commands"):
        offenders.append(f"{module}.{node.name}")
      if (isinstance(node, ast.Call) and getattr(node.func, "id", None) == "print" and
          not module.startswith(MAY_PRINT)):
        offenders.append(f"{module}:{node.lineno} print")
  assert not offenders, offenders


@pytest.mark.parametrize("limit_lines,limit_function", [(420, 60)])
def test_modules_and_functions_stay_small(limit_lines, limit_function):
  """No module holds several concerns' worth of code, no function several steps' worth."""
  long_modules, long_functions = [], []
  for module, path in module_files():
    source = open(path).read()
    if source.count("\n") > limit_lines:
      long_modules.append((module, source.count("\n")))
    for node in ast.walk(ast.parse(source)):
      if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
        length = node.end_lineno - node.lineno + 1
        if length > limit_function:
          long_functions.append((f"{module}.{node.name}", length))
  assert not long_modules and not long_functions, (long_modules, long_functions)
