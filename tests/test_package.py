"""The package's shape: no import cycles, a read side that never loads the writer, documented commands.

The imports are read from the source with `ast`, not by importing, so a cycle hidden behind a
function-level import is found too.
"""

from __future__ import annotations

import ast
import re

import pytest
from conftest import REPO

from caffe_lmdb.cli import build_parser

PACKAGE = REPO / "caffe_lmdb"
GENERATED = {"caffe_pb2", "caffe2_pb2"}

#: What reading an LMDB must never load: the conversion machinery (rings, allocator, the pipeline, the writer).
CONVERSION_MACHINERY = {"workers", "allocator", "conversion", "atomic_lmdb", "encode"}
READ_SIDE = {"dataset", "samplers", "inspection", "mean", "exporting", "grid_sheet", "tool_reading", "keys", "safe_lmdb", "datum",
             "image_files", "reader", "lmdb_dataset", "layouts", "key_index", "layout_datum", "layout_lsun",
             "layout_crnn", "layout_stylegan2",
             "layout_caffe2", "layout_basicsr", "safe_unpickle",
             "legacy_records", "layout_tensorpack", "text_targets",
             "served_lmdb", "serve_images"}

#: Imported inside functions on purpose: heavy (torch) or optional (cv2, msgpack) dependencies.
LAZY_ALLOWED = {"torch", "cv2", "msgpack", "importlib", "google.protobuf.unknown_fields", "warnings", "multiprocessing"}


def _modules() -> dict[str, ast.Module]:
    return {path.stem: ast.parse(path.read_text(encoding="utf-8"))
            for path in sorted(PACKAGE.glob("*.py")) if path.stem not in GENERATED}


def _internal_target(node: ast.ImportFrom) -> list[str]:
    """The package modules an `from . import x` / `from .x import y` names."""
    if node.level != 1:
        return []
    if node.module:
        return [node.module.split(".")[0]]
    return [alias.name for alias in node.names]


def _imports(tree: ast.Module, *, top_level_only: bool) -> set[str]:
    nodes = tree.body if top_level_only else list(ast.walk(tree))
    found = set()
    for node in nodes:
        if isinstance(node, ast.ImportFrom):
            found.update(_internal_target(node))
        if isinstance(node, ast.If) and top_level_only:  # `if TYPE_CHECKING:` style blocks still count
            found.update(_imports(ast.Module(body=node.body, type_ignores=[]), top_level_only=True))
    return found - GENERATED


def _graph(top_level_only: bool) -> dict[str, set[str]]:
    modules = _modules()
    return {name: _imports(tree, top_level_only=top_level_only) & set(modules) for name, tree in modules.items()}


def _reachable(graph: dict[str, set[str]], start: str) -> set[str]:
    seen, stack = set(), [start]
    while stack:
        for nxt in graph.get(stack.pop(), ()):
            if nxt not in seen:
                seen.add(nxt)
                stack.append(nxt)
    return seen


def test_no_import_cycles_even_through_function_level_imports():
    graph = _graph(top_level_only=False)
    graph.pop("__init__", None)  # its lazy names import the modules on first use, not at import
    for name in graph:
        assert name not in _reachable(graph, name), f"import cycle through caffe_lmdb.{name}"


@pytest.mark.parametrize("module", sorted(READ_SIDE))
def test_the_read_side_never_reaches_the_conversion_machinery(module):
    reached = _reachable(_graph(top_level_only=False), module)
    assert not reached & CONVERSION_MACHINERY, f"{module} reaches {sorted(reached & CONVERSION_MACHINERY)}"


def test_no_function_level_imports_but_heavy_or_optional_dependencies():
    torch_modules = {name for name, tree in _modules().items()
                     if any((isinstance(n, ast.Import) and any(a.name == "torch" for a in n.names))
                            or (isinstance(n, ast.ImportFrom) and (n.module or "").startswith("torch"))
                            for n in tree.body)}
    late = []
    for name, tree in _modules().items():
        for function in ast.walk(tree):
            if not isinstance(function, ast.FunctionDef | ast.AsyncFunctionDef):
                continue
            for node in ast.walk(function):
                if isinstance(node, ast.Import):
                    targets = [alias.name for alias in node.names]
                elif isinstance(node, ast.ImportFrom):
                    targets = _internal_target(node) or [node.module or ""]
                else:
                    continue
                for target in targets:
                    if target in LAZY_ALLOWED or target.split(".")[0] in LAZY_ALLOWED or target in torch_modules \
                            or target in GENERATED or (name == "proto" and target == ""):
                        continue
                    late.append(f"{name}.{function.name}: {target}")
    assert not late, "\n".join(late)


def _commands() -> dict[str, object]:
    action = next(action for action in build_parser()._actions if action.dest == "command")
    return action.choices


@pytest.mark.parametrize("command", sorted(_commands()))
def test_every_command_has_an_example_and_is_in_the_readme(command):
    parser = _commands()[command]
    assert f"Example: caffe-lmdb {command}" in " ".join(parser.format_help().split())
    readme = (REPO / "README.md").read_text(encoding="utf-8")
    assert re.search(rf"caffe-lmdb {command}\b", readme), f"README.md never shows `caffe-lmdb {command}`"


def test_each_command_has_a_library_call_of_the_same_name():
    import caffe_lmdb

    for name in ("convert", "merge", "migrate", "info", "verify", "compute_mean", "export", "grid", "serve"):
        assert callable(getattr(caffe_lmdb, name)) and name in caffe_lmdb.__all__


def _layout() -> dict[str, set[str]]:
    """The Layout section of docs/development.md: folder -> the `.py` files listed under it (two-space indent)."""
    page = (REPO / "docs" / "development.md").read_text(encoding="utf-8")
    layout = page.split("## Layout", 1)[1].split("```")[1]
    listed: dict[str, set[str]] = {}
    folder = ""
    for line in layout.splitlines():
        if re.match(r"^\S+/ ", line):
            folder = line.split("/", 1)[0]
        elif match := re.match(r"^  (\w+)\.py\b", line):
            listed.setdefault(folder, set()).add(match.group(1))
    return listed


def test_the_layout_lists_every_module_and_no_other():
    listed = _layout()["caffe_lmdb"]
    modules = {path.stem for path in PACKAGE.glob("*.py")} - GENERATED
    assert listed - GENERATED == modules, f"missing: {sorted(modules - listed)}, gone: {sorted(listed - modules)}"


@pytest.mark.parametrize("folder", ["benchmarks", "tools", "tests"])
def test_the_layout_lists_every_script_benchmark_and_test_helper(folder):
    listed = _layout()[folder]
    files = {path.stem for path in (REPO / folder).glob("*.py")}
    if folder == "tests":
        files = {name for name in files if not name.startswith("test_")}  # the helpers; tests are test_<topic>.py
    assert listed == files, f"missing: {sorted(files - listed)}, gone: {sorted(listed - files)}"


def test_only_optional_torch_asks_whether_torch_was_imported():
    # torch_if_imported is the one place that looks torch up in sys.modules (and says why)
    asking = [name for name, tree in _modules().items() if name != "optional_torch"
              for node in ast.walk(tree)
              if isinstance(node, ast.Attribute) and node.attr == "modules"
              and isinstance(node.value, ast.Name) and node.value.id == "sys"]
    assert not asking, f"sys.modules read outside optional_torch.py: {sorted(set(asking))}"


def test_numpy_work_never_imports_torch(tmp_path):
    import os
    import subprocess
    import sys

    script = f"""
import sys
import numpy as np
from caffe_lmdb import write_dataset
from caffe_lmdb.optional_torch import torch_if_imported
from caffe_lmdb.transform import CaffeTransform
image = np.zeros((4, 5, 3), np.uint8)
write_dataset([(image, 1), (image, 2)], {str(tmp_path / "o.lmdb")!r}, workers=0, progress=False)
out = CaffeTransform(crop_size=2, mirror=True, seed=1)(np.zeros((3, 4, 5), np.uint8))
assert out.shape == (3, 2, 2) and torch_if_imported() is None and "torch" not in sys.modules
"""
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120,
                            cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)})
    assert result.returncode == 0, result.stderr


# ---------------------------------------------------------------- import circles across the repository

#: The folders whose modules import one another: the library, the benchmarks and the scripts.
IMPORTING_FOLDERS = ("caffe_lmdb", "benchmarks", "tools")


def _repository_modules() -> dict[str, ast.Module]:
    """`caffe_lmdb.keys`, `benchmarks.bench`, `tools.convert`, ... (a package's `__init__` is the package)."""
    modules = {f"caffe_lmdb.{name}": ast.Module(body=[], type_ignores=[]) for name in GENERATED}  # imports none of ours
    for folder in IMPORTING_FOLDERS:
        for path in sorted((REPO / folder).glob("*.py")):
            if path.stem in GENERATED:
                continue
            name = folder if path.stem == "__init__" else f"{folder}.{path.stem}"
            modules[name] = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    return modules


def _known(name: str, modules: dict[str, ast.Module]) -> str | None:
    """The repository module `name` imports: itself, or its longest prefix that is one."""
    while name and name not in modules:
        name = name.rpartition(".")[0]
    return name or None


def _repository_imports(name: str, tree: ast.Module, modules: dict[str, ast.Module]) -> set[str]:
    """The repository modules `name` imports anywhere: at module level and inside functions."""
    package = name if name in IMPORTING_FOLDERS else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(_known(alias.name, modules) for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = ".".join(package.split(".")[:len(package.split(".")) - node.level + 1]) if node.level else ""
            base = ".".join(part for part in (base, node.module) if part)
            for alias in node.names:  # `from pkg import module` imports the module, `from pkg import name` pkg
                found.add(_known(f"{base}.{alias.name}", modules) if f"{base}.{alias.name}" in modules
                          else _known(base, modules))
    return found - {None, name}


def _import_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import circle of `graph` as `[a, b, ..., a]`, or None."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return [*path[path.index(nxt):], nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        path.pop()
        state[node] = 2
        return None

    for start in sorted(graph):
        if start not in state and (cycle := visit(start)):
            return cycle
    return None


def test_the_cycle_finder_names_a_circle():
    assert _import_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == ["a", "b", "c", "a"]
    assert _import_cycle({"a": {"b"}, "b": set(), "c": {"a", "b"}}) is None


def test_no_import_circle_anywhere_in_the_repository():
    modules = _repository_modules()
    graph = {name: _repository_imports(name, tree, modules) for name, tree in modules.items()}
    assert graph["tools.bench"] == {"benchmarks.bench"} and "caffe_lmdb.cli" in graph["tools.convert"]
    assert {"caffe_lmdb.workers", "caffe_lmdb.errors"} <= graph["caffe_lmdb.conversion"]
    cycle = _import_cycle(graph)
    assert cycle is None, "import circle: " + " -> ".join(cycle)


# ---------------------------------------------------------------- private names stay in their module; sizes

def _private(name: str) -> bool:
    return name.startswith("_") and not name.startswith("__")


def _imported_names(name: str, tree: ast.Module, modules: dict[str, ast.Module]) -> dict[str, str]:
    """Local name -> the repository module it comes from (an imported module, or a name imported from one)."""
    package = name if name in IMPORTING_FOLDERS else name.rpartition(".")[0]
    bound = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            base = ".".join(package.split(".")[:len(package.split(".")) - node.level + 1]) if node.level else ""
            base = ".".join(part for part in (base, node.module) if part)
            if _known(base, modules) is not None:
                for alias in node.names:
                    bound[alias.asname or alias.name] = f"{base}.{alias.name}" if f"{base}.{alias.name}" in modules \
                        else base
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if _known(alias.name, modules) is not None:
                    bound[alias.asname or alias.name.partition(".")[0]] = alias.name
    return bound


def _methods(tree: ast.Module) -> dict[str, set[str]]:
    """Class name -> the private names it defines (methods) or sets (`self._x = ...`)."""
    classes = {}
    for node in tree.body:
        if isinstance(node, ast.ClassDef):
            names = {item.name for item in node.body if isinstance(item, ast.FunctionDef) and _private(item.name)}
            names |= {target.attr for target in ast.walk(node) if isinstance(target, ast.Attribute)
                      and isinstance(target.ctx, ast.Store) and _private(target.attr)}
            classes[node.name] = names
    return classes


def _foreign_private_uses(name: str, tree: ast.Module, modules: dict[str, ast.Module]) -> list[str]:
    """Where `name` imports, reads or overrides a private name of another repository module."""
    bound = _imported_names(name, tree, modules)
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.names and _known(bound.get(node.names[0].asname or
                                                                                 node.names[0].name, ""), modules):
            found += [f"{name}:{node.lineno} imports {alias.name}" for alias in node.names if _private(alias.name)]
        elif isinstance(node, ast.Attribute) and _private(node.attr) and isinstance(node.value, ast.Name) \
                and node.value.id in bound:
            found.append(f"{name}:{node.lineno} reads {node.value.id}.{node.attr}")
        elif isinstance(node, ast.ClassDef):
            for base in node.bases:
                origin = bound.get(base.id) if isinstance(base, ast.Name) else None
                module = _known(origin, modules) if origin else None
                if module is None or module == name:
                    continue
                theirs = _methods(modules[module]).get(base.id, set())
                mine = _methods(ast.Module(body=[node], type_ignores=[])).get(node.name, set())
                reads = {sub.attr for sub in ast.walk(node) if isinstance(sub, ast.Attribute) and _private(sub.attr)}
                found += [f"{name}:{node.lineno} {node.name} uses {base.id}.{attr}"
                          for attr in sorted((mine | reads) & theirs)]
    return found


def test_the_private_name_check_finds_a_subclass_working_on_its_base():
    modules = {"caffe_lmdb.a": ast.parse("class Base:\n    def _open(self):\n        self._env = 1\n"),
               "caffe_lmdb.b": ast.parse("from .a import Base, _helper\nimport caffe_lmdb.a as a\n"
                                         "class Mine(Base):\n    def _open(self):\n        return self._env\n"
                                         "x = a._secret\n")}
    found = _foreign_private_uses("caffe_lmdb.b", modules["caffe_lmdb.b"], modules)
    assert sorted(f.split(" ", 1)[1] for f in found) == ["Mine uses Base._env", "Mine uses Base._open",
                                                         "imports _helper", "reads a._secret"], found


def test_no_module_reads_or_overrides_another_modules_private_names():
    modules = _repository_modules()
    found = [use for name, tree in modules.items() for use in _foreign_private_uses(name, tree, modules)]
    assert found == []


#: Modules over 800 lines, each with the reason it is still allowed.
LONG_MODULES: dict[str, str] = {}


def test_no_module_over_800_lines():
    long = {path.name: n for path in sorted(PACKAGE.glob("*.py")) if path.stem not in GENERATED
            and (n := len(path.read_text(encoding="utf-8").splitlines())) > 800}
    assert set(long) <= set(LONG_MODULES), long


#: Functions over 100 lines that have no comment saying why, each allowed for now with its reason.
LONG_FUNCTIONS: dict[str, str] = {}


def test_no_function_over_100_lines_unless_a_comment_says_why():
    long = []
    for path in sorted(PACKAGE.glob("*.py")):
        if path.stem in GENERATED:
            continue
        lines = path.read_text(encoding="utf-8").splitlines()
        for node in ast.walk(ast.parse("\n".join(lines))):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef) and node.end_lineno - node.lineno >= 100:
                above = min([node.lineno, *(d.lineno for d in node.decorator_list)]) - 2
                comment = []
                while above >= 0 and lines[above].lstrip().startswith("#"):
                    comment.insert(0, lines[above].strip())
                    above -= 1
                if not (comment and comment[0].startswith("# Over 100 lines:")):
                    long.append(f"{path.stem}.{node.name}")
    assert set(long) <= set(LONG_FUNCTIONS), sorted(set(long) - set(LONG_FUNCTIONS))


#: Public functions over the parameter limit, each with why it is not yet under it.
TOO_MANY_PARAMETERS_ALLOWED: set[str] = set()


def _public_functions(tree: ast.Module) -> list[tuple[str, ast.FunctionDef | ast.AsyncFunctionDef]]:
    """Module-level functions and the methods of public classes, dunders (`__init__`) included."""
    found = []

    def walk(body: list[ast.stmt], owner: str) -> None:
        for node in body:
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                private = node.name.startswith("_") and not (node.name.startswith("__") and node.name.endswith("__"))
                if not private:
                    found.append((owner + node.name, node))
            elif isinstance(node, ast.ClassDef) and not node.name.startswith("_") and not owner:
                walk(node.body, node.name + ".")

    walk(tree.body, "")
    return found


def _parameter_count(node: ast.FunctionDef | ast.AsyncFunctionDef, method: bool) -> int:
    """Parameters, `self`/`cls` not counted, `*args` and `**kwargs` one each."""
    args = node.args
    named = [*args.posonlyargs, *args.args, *args.kwonlyargs]
    if method and named and named[0].arg in ("self", "cls"):
        named = named[1:]
    return len(named) + (args.vararg is not None) + (args.kwarg is not None)


def test_no_public_function_has_more_than_12_parameters():
    over = {f"{module}.{name}": count for module, tree in _modules().items() if not module.startswith("_")
            for name, node in _public_functions(tree)
            if (count := _parameter_count(node, "." in name)) > 12}
    assert set(over) - TOO_MANY_PARAMETERS_ALLOWED == set(), over


def test_the_parameter_count_skips_self_and_counts_star_arguments():
    tree = ast.parse("class A:\n    def m(self, a, /, b, *c, d, **e): ...\ndef f(x, *, y): ...\ndef _g(a): ...")
    counts = {name: _parameter_count(node, "." in name) for name, node in _public_functions(tree)}
    assert counts == {"A.m": 5, "f": 2}
