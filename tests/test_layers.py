"""The package's layers import only downward, inside functions too (README's layout section names them)."""
import ast
import os

import selftrain_d2

# Lowest first. A subpackage may import those of lower layers, never a higher one nor another of its own layer.
LAYERS = [
    ("utils", "version"),
    ("config",),
    ("data",),
    ("modeling", "solver", "evaluation"),
    ("teacher",),
    ("pseudo_labels", "distill"),
    ("engine",),
    ("orchestration",),
    ("cli",),
]


def _imported_modules(tree, package):
    """``(line, absolute module)`` of every import in a module's syntax tree, relative ones resolved against
    ``package`` (the dotted name of the module's package)."""
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield node.lineno, alias.name
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                module = ".".join(base + ([node.module] if node.module else []))
                if node.module:
                    yield node.lineno, module
                else:
                    for alias in node.names:
                        yield node.lineno, f"{module}.{alias.name}"
            else:
                yield node.lineno, node.module


def layer_violations(root, name, layers):
    """``["file:line: a imports b"]`` for each import in the package at ``root`` (named ``name``) that goes
    sideways or up the ``layers``; modules of the package's own ``__init__`` are exempt (it composes all)."""
    rank = {sub: i for i, group in enumerate(layers) for sub in group}
    problems = []
    for folder, _, files in os.walk(root):
        for file in sorted(files):
            if not file.endswith(".py"):
                continue
            path = os.path.join(folder, file)
            rel = os.path.relpath(path, root)[: -len(".py")].split(os.sep)
            if rel == ["__init__"]:
                continue
            source = rel[0]
            package = ".".join([name] + rel[:-1]) if rel[-1] != "__init__" or len(rel) > 1 else name
            with open(path) as f:
                tree = ast.parse(f.read(), path)
            for line, module in _imported_modules(tree, package):
                parts = module.split(".")
                if parts[0] != name or len(parts) == 1 or parts[1] == source:
                    continue
                target = parts[1]
                if source not in rank or target not in rank:
                    problems.append(f"{path}:{line}: {source} or {target} is in no layer")
                elif rank[target] >= rank[source]:
                    problems.append(f"{path}:{line}: {source} imports {target}")
    return problems


def test_the_package_imports_only_downward():
    root = os.path.dirname(selftrain_d2.__file__)
    subpackages = {e[:-3] if e.endswith(".py") else e for e in os.listdir(root)
                   if (e.endswith(".py") and e != "__init__.py") or os.path.isfile(os.path.join(root, e, "__init__.py"))}
    assert subpackages == {sub for group in LAYERS for sub in group}, "a new subpackage needs its place in LAYERS"
    assert layer_violations(root, "selftrain_d2", LAYERS) == []


def test_a_wrong_import_is_found(tmp_path):
    """The check itself: upward, sideways and function-level imports in a small package are all reported."""
    pkg = tmp_path / "pkg"
    for sub in ("low", "mid", "side", "high"):
        (pkg / sub).mkdir(parents=True)
        (pkg / sub / "__init__.py").write_text("")
    (pkg / "__init__.py").write_text("from . import high\n")  # the root composes everything: allowed
    (pkg / "mid" / "a.py").write_text("from ..low import x\nimport pkg.high.b\n")
    (pkg / "mid" / "c.py").write_text("def f():\n    from ..side import y\n    from . import a\n")
    (pkg / "high" / "b.py").write_text("from pkg.mid import a\nfrom ..low.z import w\n")
    problems = layer_violations(str(pkg), "pkg", [("low",), ("mid", "side"), ("high",)])
    assert [p.split(os.sep)[-1] for p in problems] == ["a.py:2: mid imports high", "c.py:2: mid imports side"]
