"""The layers GUIDE.md draws, checked on the source: the service reaches the database only through
the store object the composition root hands it, and the adapters do not reach it at all."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

OTAD = Path(__file__).resolve().parent.parent / "otad"


def imported_modules(path: Path) -> set[str]:
    """Every module ``path`` imports, at any depth (a function-local import counts too)."""
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
            names.update(f"{node.module}.{alias.name}" for alias in node.names)
    return names


def reaches(modules: set[str], package: str) -> set[str]:
    return {name for name in modules if name == package or name.startswith(package + ".")}


@pytest.mark.parametrize("path", sorted((OTAD / "service").glob("*.py")), ids=lambda path: path.name)
def test_service_imports_no_store_and_no_orm(path):
    modules = imported_modules(path)
    assert not reaches(modules, "otad.store"), f"{path.name} imports the store's modules"
    assert not reaches(modules, "tortoise"), f"{path.name} imports the ORM"
    assert not reaches(modules, "aiohttp"), f"{path.name} imports HTTP"


@pytest.mark.parametrize("path", sorted(p for layer in ("http", "web", "mqtt") for p in (OTAD / layer).rglob("*.py")),
                         ids=lambda path: str(path.relative_to(OTAD)))
def test_adapters_do_not_reach_the_database(path):
    modules = imported_modules(path)
    assert not reaches(modules, "otad.store"), f"{path.relative_to(OTAD)} imports the store"
    assert not reaches(modules, "tortoise"), f"{path.relative_to(OTAD)} imports the ORM"


def test_model_imports_neither_side():
    modules = imported_modules(OTAD / "model.py")
    assert not reaches(modules, "otad.store") and not reaches(modules, "otad.service")
    assert not reaches(modules, "tortoise")


def _unshielded_transactions(path) -> list[str]:
    """Functions of ``path`` that open a transaction without being @shielded (otad/store/transactions.py)."""
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            continue
        opens = any(isinstance(call, ast.Call) and getattr(call.func, "id", getattr(call.func, "attr", None))
                    == "in_transaction" for call in ast.walk(node))
        decorated = any(getattr(d, "id", getattr(d, "attr", None)) == "shielded" for d in node.decorator_list)
        if opens and not decorated:
            found.append(node.name)
    return found


@pytest.mark.parametrize("path", sorted((OTAD / "store").rglob("*.py")), ids=lambda path: str(path.relative_to(OTAD)))
def test_every_store_transaction_is_shielded_from_cancellation(path):
    assert not _unshielded_transactions(path), (
        f"{path.relative_to(OTAD)}: {_unshielded_transactions(path)} open in_transaction() without @shielded")


@pytest.mark.parametrize("path", sorted((OTAD / "service").glob("*.py")), ids=lambda path: path.name)
def test_service_signs_through_its_port_not_the_crypto_library(path):
    # The keys and the cryptography library stay at the edge (otad.signing_keys): the service
    # signs through the Signer port of otad.service.signing.
    modules = imported_modules(path)
    assert not reaches(modules, "cryptography"), f"{path.name} imports cryptography"
    assert not reaches(modules, "otad.signing_keys"), f"{path.name} imports the key files' module"
