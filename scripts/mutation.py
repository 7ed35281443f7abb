"""A targeted mutation run over the core modules: does a test fail when the code is wrong?

Each mutant is one small change to one module — a comparison flipped (``<`` → ``>=``,
``==`` → ``!=``, ``in`` → ``not in``), ``and`` ↔ ``or``, a call statement dropped, a
``True``/``False`` constant flipped, a function returning early — applied to a copy of the
tree in a temp folder; the tests that guard that module run against the copy
(``PYTHONPATH`` puts it first, for subprocesses too). A mutant the tests do not notice
*survived*: either a promise no test guards, or an equivalent change.

    .venv/bin/python scripts/mutation.py                 # 8 seeded mutants per module
    .venv/bin/python scripts/mutation.py -n 0            # every mutant (long)
    .venv/bin/python scripts/mutation.py -m bridge/log.py -n 20 --seed 3

Prints one line per mutant and the survival rate per module and overall; ``--json FILE``
keeps the results.
"""

from __future__ import annotations

import argparse
import ast
import json
import os
import random
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

#: module → (the tests that guard it, the names of the classes/functions to mutate or None)
TARGETS: dict[str, tuple[list[str], set[str] | None]] = {
    "bridge/queue.py": (["tests/unit/test_queue.py", "tests/unit/test_queue_faults.py"], None),
    "bridge/store.py": (
        [
            "tests/unit/test_queue.py",
            "tests/unit/test_store_faults.py",
            "tests/unit/test_queue_faults.py",
            "tests/unit/test_deadletter_queries.py",
        ],
        None,
    ),
    "bridge/retry.py": (["tests/unit/test_retry.py", "tests/unit/test_dispatch_faults.py"], None),
    "bridge/ordered.py": (["tests/unit/test_ordered.py"], None),
    "bridge/log.py": (["tests/unit/test_log.py"], None),
    "bridge/api.py": (
        ["tests/integration/test_api.py", "tests/integration/test_api_scope.py"],
        None,
    ),
    "bridge/checkpoint.py": (
        ["tests/unit/test_kafka_offsets.py", "tests/unit/test_kafka_source.py"],
        {"SettledPrefix"},
    ),
}

FLIP = {
    ast.Lt: ast.GtE, ast.GtE: ast.Lt, ast.Gt: ast.LtE, ast.LtE: ast.Gt,
    ast.Eq: ast.NotEq, ast.NotEq: ast.Eq, ast.In: ast.NotIn, ast.NotIn: ast.In,
    ast.Is: ast.IsNot, ast.IsNot: ast.Is,
}  # fmt: skip


@dataclass(frozen=True)
class Site:
    kind: str  # compare | boolop | drop-call | constant | return-early
    line: int
    index: int  # the n-th site of this kind in the module (the transformer's counter)
    what: str


def _inside(tree: ast.Module, names: set[str] | None) -> set[int]:
    """ids of the nodes that may be mutated (all, or those inside the named defs)."""
    allowed: set[int] = set()
    decorators: set[int] = set()  # @dataclass(frozen=True, ...): equivalent mutants
    for node in ast.walk(tree):
        for d in getattr(node, "decorator_list", []):
            decorators |= {id(n) for n in ast.walk(d)}
        if names is None or (
            isinstance(node, ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef)
            and node.name in names
        ):
            allowed |= {id(n) for n in ast.walk(node)}
    return allowed - decorators


def _docstring(node: ast.AST) -> bool:
    return isinstance(node, ast.Expr) and isinstance(node.value, ast.Constant)


def _returns_value(fn: ast.AST) -> bool:
    return any(isinstance(n, ast.Return) and n.value is not None for n in ast.walk(fn)) or any(
        isinstance(n, ast.Yield | ast.YieldFrom) for n in ast.walk(fn)
    )


def sites(source: str, names: set[str] | None) -> list[Site]:
    tree = ast.parse(source)
    allowed = _inside(tree, names)
    out: list[Site] = []
    counters: dict[str, int] = {}

    def add(kind: str, node: ast.AST, what: str) -> None:
        n = counters.get(kind, 0)
        counters[kind] = n + 1
        if id(node) in allowed:
            out.append(Site(kind, getattr(node, "lineno", 0), n, what))

    for node in _walk(tree):
        if isinstance(node, ast.Compare) and len(node.ops) == 1 and type(node.ops[0]) in FLIP:
            add("compare", node, f"{type(node.ops[0]).__name__} flipped")
        elif isinstance(node, ast.BoolOp):
            add("boolop", node, f"{type(node.op).__name__} → the other")
        elif isinstance(node, ast.Expr) and isinstance(node.value, ast.Call | ast.Await):
            add("drop-call", node, "call dropped")
        elif isinstance(node, ast.Constant) and isinstance(node.value, bool):
            add("constant", node, f"{node.value} → {not node.value}")
        elif (
            isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef)
            and not _returns_value(node)
            and node.name != "__init__"
        ):
            add("return-early", node, f"{node.name} returns at once")
    return out


def _walk(tree: ast.AST) -> list[ast.AST]:
    """Nodes in a fixed order (the same in ``sites`` and ``Mutate``)."""
    return list(ast.walk(tree))


def mutate(source: str, site: Site) -> str:
    tree = ast.parse(source)
    counters: dict[str, int] = {}

    def hit(kind: str) -> bool:
        n = counters.get(kind, 0)
        counters[kind] = n + 1
        return kind == site.kind and n == site.index

    for node in _walk(tree):
        if isinstance(node, ast.Compare) and len(node.ops) == 1 and type(node.ops[0]) in FLIP:
            if hit("compare"):
                node.ops = [FLIP[type(node.ops[0])]()]
        elif isinstance(node, ast.BoolOp):
            if hit("boolop"):
                node.op = ast.Or() if isinstance(node.op, ast.And) else ast.And()
        elif isinstance(node, ast.Expr) and isinstance(node.value, ast.Call | ast.Await):
            if hit("drop-call"):
                node.value = ast.Constant(None)
        elif isinstance(node, ast.Constant) and isinstance(node.value, bool):
            if hit("constant"):
                node.value = not node.value
        elif (
            isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef)
            and not _returns_value(node)
            and node.name != "__init__"
            and hit("return-early")
        ):
            keep = node.body[:1] if node.body and _docstring(node.body[0]) else []
            node.body = [*keep, ast.Return(None), *node.body[len(keep) :]]
    return ast.unparse(ast.fix_missing_locations(tree))


def copy_tree(dest: Path) -> None:
    for name in ("bridge", "sources", "tests", "examples"):
        shutil.copytree(
            ROOT / name, dest / name, ignore=shutil.ignore_patterns("__pycache__", "*.pyc")
        )
    for name in ("setup.cfg", "pyproject.toml", "ruff.toml"):
        shutil.copy2(ROOT / name, dest / name)


def run_tests(tree: Path, tests: list[str], timeout: float) -> tuple[str, float]:
    """'killed' (a test failed or the run broke), 'survived' (all passed) or 'timeout'."""
    env = {**os.environ, "PYTHONPATH": str(tree), "PYTHONDONTWRITEBYTECODE": "1"}
    cmd = [
        sys.executable,
        "-m",
        "pytest",
        "-x",
        "-q",
        "-p",
        "no:cacheprovider",
        "-p",
        "no:randomly",
        *tests,
    ]
    t0 = time.monotonic()
    try:
        r = subprocess.run(cmd, cwd=tree, env=env, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return "timeout", time.monotonic() - t0  # a hang the tests caught by their timeout
    return ("survived" if r.returncode == 0 else "killed"), time.monotonic() - t0


def main() -> int:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("-m", "--module", action="append", help="only these modules (repeatable)")
    ap.add_argument("-n", type=int, default=8, help="mutants per module, seeded sample (0: all)")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--timeout", type=float, default=300, help="seconds per test run")
    ap.add_argument("--json", help="write the results here")
    args = ap.parse_args()

    modules = args.module or list(TARGETS)
    results = []
    with tempfile.TemporaryDirectory(prefix="eb-mutation-") as tmp:
        tree = Path(tmp)
        copy_tree(tree)
        for module in modules:
            tests, names = TARGETS[module]
            original = (ROOT / module).read_text()
            found = sites(original, names)
            rng = random.Random(f"{args.seed}:{module}")
            chosen = (
                found
                if args.n == 0
                else sorted(rng.sample(found, min(args.n, len(found))), key=lambda s: s.line)
            )
            for site in chosen:
                (tree / module).write_text(mutate(original, site))
                outcome, took = run_tests(tree, tests, args.timeout)
                (tree / module).write_text(original)
                results.append({"module": module, "line": site.line, "kind": site.kind,
                                "what": site.what, "outcome": outcome, "seconds": round(took, 1)})  # fmt: skip
                print(
                    f"{outcome:8} {module}:{site.line} {site.kind}: {site.what} ({took:.0f}s)",
                    flush=True,
                )
            print(f"# {module}: {len(found)} sites, {len(chosen)} run", flush=True)

    print("\nmodule                 mutants  survived  rate")
    for module in modules:
        mine = [r for r in results if r["module"] == module]
        alive = sum(r["outcome"] == "survived" for r in mine)
        print(f"{module:22} {len(mine):7} {alive:9}  {alive / max(len(mine), 1):5.0%}")
    alive = sum(r["outcome"] == "survived" for r in results)
    print(f"{'total':22} {len(results):7} {alive:9}  {alive / max(len(results), 1):5.0%}")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
