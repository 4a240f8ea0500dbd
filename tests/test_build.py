"""BUILD stays in step with the code (Bazel itself cannot run here).

No network and no Bazel on our machines, so `bazel build` never checks the
BUILD file; this test reads it as text instead: every module of the package
is in exactly one py_library, every test file has a py_test, and every
`from tf_dpsat import X` of a module is a dep of that module's target.
"""

import ast
import pathlib
import re

ROOT = pathlib.Path(__file__).resolve().parent.parent
BUILD = (ROOT / "BUILD").read_text()


def _libraries():
    """{target name: (srcs, deps)} of every py_library in BUILD."""
    targets = {}
    for body in re.findall(r"py_library\((.*?)\n\)", BUILD, re.S):
        name = re.search(r'name = "(\w+)"', body).group(1)
        srcs = re.findall(r'"(tf_dpsat/[\w/]+\.py)"', body)
        deps = set(re.findall(r'":(\w+)"', body))
        targets[name] = (srcs, deps)
    return targets


def _module_target(path: str) -> str:
    """The target a module's imports resolve to: tf_dpsat/x.py, x/ -> x."""
    parts = pathlib.PurePosixPath(path).parts
    return parts[1] if len(parts) > 2 else pathlib.PurePosixPath(path).stem


def test_every_module_is_in_one_library():
    owners = {}
    for name, (srcs, _) in _libraries().items():
        for src in srcs:
            owners.setdefault(src, []).append(name)
    modules = sorted(str(p.relative_to(ROOT)) for p in
                     (ROOT / "tf_dpsat").rglob("*.py"))
    assert [m for m in modules if len(owners.get(m, [])) != 1] == []
    assert [s for s in owners if not (ROOT / s).exists()] == []


def test_every_test_file_has_a_test_target():
    block = BUILD[BUILD.index("_TEST_DEPS = {"):]
    block = block[:block.index("\n}\n")]
    targets = set(re.findall(r'^    "(test_\w+)"', block, re.M))
    files = {p.stem for p in (ROOT / "tests").glob("test_*.py")}
    assert sorted(files - targets) == [] and sorted(targets - files) == []


def test_imports_of_the_package_are_deps():
    missing = []
    for name, (srcs, deps) in _libraries().items():
        for src in srcs:
            tree = ast.parse((ROOT / src).read_text())
            for node in ast.walk(tree):
                if isinstance(node, ast.ImportFrom) and node.module and (
                        node.module == "tf_dpsat" or
                        node.module.startswith("tf_dpsat.")):
                    names = ([a.name for a in node.names]
                             if node.module == "tf_dpsat"
                             else [node.module.split(".")[1]])
                    for module in names:
                        package = ROOT / "tf_dpsat"
                        is_module = ((package / f"{module}.py").exists() or
                                     (package / module).is_dir())
                        if is_module and module != name and module not in deps:
                            missing.append(f"{src} imports {module}")
    assert missing == []
