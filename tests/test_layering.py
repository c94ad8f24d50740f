"""The layers hold: the receiving side stays light, and the pure packages never import node/.

The receiving process answers C-STOREs while a worker process runs the models; if importing the
receiver pulled in torch or SimpleITK, every `mvi-node` command and the front door would pay
for them (seconds and hundreds of MB) and a broken CUDA install could stop the node receiving.
``model/`` and ``dicom_sr/`` are pure packages (no settings, network, clock): an import of
``node`` from them would tie them to the node's configuration.
"""

from __future__ import annotations

import ast
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

#: Modules of the receiving side: what `mvi-node serve` loads before a worker starts, the CLI,
#: and the console's process (it runs beside the receiver, on hosts without a GPU too).
RECEIVING_SIDE = sorted(
    [f"node.receive.{p.stem}" for p in (ROOT / "node" / "receive").glob("*.py")]
    + [f"node.web.{p.stem}" for p in (ROOT / "node" / "web").glob("*.py")]
    + ["node.serve.service", "node.serve.metrics", "node.cli.main"]
)
#: procrastinate: only `mvi-node worker` and a PostgreSQL store's deferrals import it.
HEAVY = ("torch", "SimpleITK", "procrastinate")
PURE_PACKAGES = ("model", "dicom_sr")


@pytest.mark.parametrize("module", RECEIVING_SIDE)
def test_receiving_side_loads_neither_torch_nor_simpleitk(module: str) -> None:
    # A fresh interpreter: this test process has long imported both.
    code = (
        "import importlib, json, sys\n"
        f"importlib.import_module({module!r})\n"
        f"print(json.dumps([m for m in {HEAVY!r} if m in sys.modules]))\n"
    )
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
    }
    done = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, check=False
    )
    assert done.returncode == 0, done.stderr
    loaded = json.loads(done.stdout.strip().splitlines()[-1])
    assert loaded == [], f"importing {module} loads {', '.join(loaded)}; import it lazily"


def _node_imports(path: Path) -> list[str]:
    """``node`` imports of one file, as 'line N: import ...'."""
    found = []
    for item in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        names: list[str] = []
        if isinstance(item, ast.Import):
            names = [alias.name for alias in item.names]
        elif isinstance(item, ast.ImportFrom) and item.level == 0 and item.module:
            names = [item.module]
        found += [
            f"line {item.lineno}: {name}"
            for name in names
            if name == "node" or name.startswith("node.")
        ]
    return found


@pytest.mark.parametrize("package", PURE_PACKAGES)
def test_pure_packages_import_nothing_from_node(package: str) -> None:
    files = sorted((ROOT / package).rglob("*.py"))
    assert files, f"no modules under {package}/"
    offending = {
        str(path.relative_to(ROOT)): imports for path in files if (imports := _node_imports(path))
    }
    assert offending == {}


def test_the_import_walk_sees_node_imports(tmp_path: Path) -> None:
    # The check above must be able to fail: every spelling of an import of node is found.
    sample = tmp_path / "sample.py"
    sample.write_text(
        "import node\nimport node.core.settings as s\nfrom node.core import dicom\n"
        "from nodes import x\nfrom . import node\n"
        "def f():\n    from node.store.database import Store\n"
    )
    assert [line.split(": ")[1] for line in _node_imports(sample)] == [
        "node",
        "node.core.settings",
        "node.core",
        "node.store.database",
    ]


def _imports_of(path: Path) -> list[tuple[int, str]]:
    """Every absolute import of one file, as (line, module)."""
    found: list[tuple[int, str]] = []
    for item in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(item, ast.Import):
            found += [(item.lineno, alias.name) for alias in item.names]
        elif isinstance(item, ast.ImportFrom) and item.level == 0 and item.module:
            found.append((item.lineno, item.module))
    return found


def _names_from_store(path: Path) -> list[tuple[int, str]]:
    """Names one file imports from ``node.store.*``, as (line, name)."""
    return [
        (item.lineno, alias.name)
        for item in ast.walk(ast.parse(path.read_text(), filename=str(path)))
        if isinstance(item, ast.ImportFrom) and (item.module or "").startswith("node.store")
        for alias in item.names
    ]


def test_only_the_store_runs_sql() -> None:
    # The store owns its tables: a query elsewhere would bypass its named rows, its UTC type and
    # its migrations.
    from sqlalchemy import Table

    import node.store.schema as schema

    tables = {name for name, value in vars(schema).items() if isinstance(value, Table)}
    assert {"studies", "jobs", "results", "outbox"} <= tables
    outside = sorted(p for p in (ROOT / "node").rglob("*.py") if "store" not in p.parts)
    assert outside
    offending = [
        f"{path.relative_to(ROOT)} line {line}: {module}"
        for path in outside
        for line, module in _imports_of(path)
        if module.split(".")[0] in {"sqlalchemy", "alembic"}
        or module in {"node.store.schema", "node.store.engine"}
    ] + [
        f"{path.relative_to(ROOT)} line {line}: the table {name}"
        for path in outside
        for line, name in _names_from_store(path)
        if name in tables
    ]
    assert offending == []


def test_sop_class_uids_are_spelled_only_in_core_dicom() -> None:
    # One place per concept: every other module of node/ imports the UIDs from node.core.dicom.
    spelled = [
        f"{path.relative_to(ROOT)} line {number}"
        for path in sorted((ROOT / "node").rglob("*.py"))
        if path != ROOT / "node" / "core" / "dicom.py"
        for number, text in enumerate(path.read_text().splitlines(), start=1)
        if "1.2.840.10008.5.1.4." in text
    ]
    assert spelled == []
