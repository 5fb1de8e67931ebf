"""The layout: every import goes down, nothing imports a script, nothing loads a module from a string.

Layers, bottom to top (README "Layout"): ``modeling_cgns`` (the Hugging Face library) < ``data_scripts``
(datasets) < ``cgns`` (the application). Inside ``cgns``: ``configs`` and ``processes`` < ``pretraining`` and
``downstream`` (siblings: neither imports the other) < ``experiments`` < ``cli``. The downstream protocols
never import each other: what two of them share lives below them (``common``, ``embeddings``, ``prompts``).
The root scripts (``train_pretrain.py``, ``train_downstream.py``, ``demo.py``) are entry points only.
"""
import ast
import os
from typing import Iterator, List, Tuple

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACKAGES = ("modeling_cgns", "data_scripts", "cgns")
SCRIPTS = ("train_pretrain", "train_downstream", "demo")
# rank of each project namespace; a module may import only namespaces of its own rank or below
RANKS = {"modeling_cgns": 0, "data_scripts": 1, "cgns.configs": 2, "cgns.processes": 2, "cgns.pretraining": 3,
         "cgns.downstream": 3, "cgns.experiments": 4, "cgns.cli": 5, "cgns.__main__": 5, "cgns": 5}
SIBLINGS = {"cgns.pretraining": "cgns.downstream", "cgns.downstream": "cgns.pretraining"}
PROTOCOLS = ("classification", "detection", "segmentation", "retrieval", "zero_shot", "grounding", "visualize")
# the conversion command line ships beside the converter, as transformers' convert_* scripts do
ARGPARSE_ALLOWED = {"modeling_cgns.convert_mgca"}


def python_files(folder: str, root: str = ROOT) -> Iterator[str]:
    for base, dirs, files in os.walk(os.path.join(root, folder)):
        dirs[:] = [d for d in dirs if d != "__pycache__"]
        yield from (os.path.join(base, f) for f in sorted(files) if f.endswith(".py"))


def module_name(path: str, root: str = ROOT) -> str:
    rel = os.path.relpath(path, root)[:-len(".py")].replace(os.sep, ".")
    return rel[:-len(".__init__")] if rel.endswith(".__init__") else rel


def imports_of(path: str, root: str = ROOT) -> List[Tuple[int, str]]:
    """(line, absolute module name) of every import in the file, relative imports resolved."""
    name = module_name(path, root)
    package = name if path.endswith("__init__.py") else name.rpartition(".")[0]
    found = []
    for node in ast.walk(ast.parse(open(path).read(), path)):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[:len(package.split(".")) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module
            found.append((node.lineno, target))
            # `from pkg import submodule` imports the submodule too
            found += [(node.lineno, f"{target}.{alias.name}") for alias in node.names]
    return found


def namespace(module: str) -> str:
    """The RANKS key that owns ``module`` (the longest matching prefix); '' outside the project."""
    keys = [k for k in RANKS if module == k or module.startswith(k + ".")]
    return max(keys, key=len) if keys else ""


def project_modules() -> List[str]:
    return [path for package in PACKAGES for path in python_files(package)]


def test_the_walk_sees_every_layer():
    names = {module_name(p) for p in project_modules()}
    assert {"modeling_cgns.modeling_cgns", "data_scripts.synthetic_cxr", "cgns.cli", "cgns.pretraining.loop",
            "cgns.downstream.classification", "cgns.experiments.demo", "cgns.configs"} <= names
    # the resolver: a relative import inside cgns/downstream names its sibling module
    resolved = {m for _, m in imports_of(os.path.join(ROOT, "cgns", "downstream", "zero_shot.py"))}
    assert "cgns.downstream.embeddings" in resolved and "modeling_cgns.metrics" in resolved


def upward_imports(root: str = ROOT) -> List[str]:
    upward = []
    for path in [p for package in PACKAGES for p in python_files(package, root)]:
        own = namespace(module_name(path, root))
        for line, target in imports_of(path, root):
            other = namespace(target)
            if not other or other == own or own.startswith(other + ".") or other.startswith(own + "."):
                continue
            if RANKS[other] > RANKS[own] or SIBLINGS.get(own) == other:
                upward.append(f"{os.path.relpath(path, root)}:{line} imports {target} ({own} -> {other})")
    return sorted(set(upward))


def test_every_import_goes_down():
    upward = upward_imports()
    assert not upward, "upward or sideways imports:\n" + "\n".join(upward)


def test_a_planted_upward_import_is_caught(tmp_path):
    """The check itself: a library module importing the application, and one protocol family importing its
    sibling, are reported; a downward import is not."""
    (tmp_path / "modeling_cgns").mkdir()
    (tmp_path / "modeling_cgns" / "bad.py").write_text("from cgns.pretraining import loop\nimport torch\n")
    (tmp_path / "cgns" / "downstream").mkdir(parents=True)
    (tmp_path / "cgns" / "downstream" / "x.py").write_text("from ..pretraining import loop\nfrom . import common\n"
                                                           "import modeling_cgns\n")
    found = upward_imports(str(tmp_path))
    assert found == ["cgns/downstream/x.py:1 imports cgns.pretraining (cgns.downstream -> cgns.pretraining)",
                     "cgns/downstream/x.py:1 imports cgns.pretraining.loop (cgns.downstream -> cgns.pretraining)",
                     "modeling_cgns/bad.py:1 imports cgns.pretraining (modeling_cgns -> cgns.pretraining)",
                     "modeling_cgns/bad.py:1 imports cgns.pretraining.loop (modeling_cgns -> cgns.pretraining)"]


def test_nothing_imports_a_script_or_the_tests():
    offenders = []
    folders = PACKAGES + ("benchmarks", "tests")
    for path in [p for folder in folders for p in python_files(folder)] + [os.path.join(ROOT, f"{s}.py")
                                                                             for s in SCRIPTS]:
        in_tests = os.path.relpath(path, ROOT).startswith("tests" + os.sep)
        for line, target in imports_of(path):
            top = target.split(".")[0]
            if top in SCRIPTS or top in ("pretrain_callbacks", "downstream"):
                offenders.append(f"{os.path.relpath(path, ROOT)}:{line} imports the script {target}")
            if not in_tests and (top == "tests" or top in ("oracles", "tiny", "gloo")):
                offenders.append(f"{os.path.relpath(path, ROOT)}:{line} imports test code {target}")
    assert not offenders, "\n".join(offenders)


def test_protocols_do_not_import_each_other():
    sideways = []
    for name in PROTOCOLS:
        path = os.path.join(ROOT, "cgns", "downstream", f"{name}.py")
        for line, target in imports_of(path):
            if target.startswith("cgns.downstream.") and target.split(".")[2] in PROTOCOLS + ("cli", "protocols"):
                sideways.append(f"{name}.py:{line} imports {target}")
    assert not sideways, "\n".join(sideways)


@pytest.mark.parametrize("folder", PACKAGES + ("benchmarks",))
def test_no_string_imports_and_no_path_patching(folder):
    offenders = []
    for path in python_files(folder):
        tree = ast.parse(open(path).read(), path)
        for node in ast.walk(tree):
            if isinstance(node, ast.Call):
                func = ast.unparse(node.func)
                if func in ("importlib.import_module", "import_module", "__import__", "sys.path.insert",
                            "sys.path.append", "importlib.util.spec_from_file_location"):
                    offenders.append(f"{os.path.relpath(path, ROOT)}:{node.lineno} calls {func}")
    assert not offenders, "\n".join(offenders)


def test_the_library_knows_no_accelerate_argparse_or_application():
    offenders = []
    for path in python_files("modeling_cgns"):
        for line, target in imports_of(path):
            top = target.split(".")[0]
            if top == "accelerate" or (top == "argparse" and module_name(path) not in ARGPARSE_ALLOWED):
                offenders.append(f"{os.path.relpath(path, ROOT)}:{line} imports {target}")
    assert not offenders, "\n".join(offenders)


def test_the_root_scripts_are_entry_points_only():
    for script in SCRIPTS:
        tree = ast.parse(open(os.path.join(ROOT, f"{script}.py")).read())
        defined = [n for n in tree.body if isinstance(n, (ast.FunctionDef, ast.ClassDef))]
        assert not defined, f"{script}.py defines {[n.name for n in defined]}: the code belongs in cgns/"
        assert len(open(os.path.join(ROOT, f"{script}.py")).read().splitlines()) <= 15, script

