"""User code by reference: ``"module:qualname"`` strings, their source files, and loading them.

A user's model often lives in a plain ``.py`` file next to the experiment config rather than
in an installed package. This module turns objects into references (``reference_of``), finds
the file that defines them (``source_file_of``), imports references with a search path of
folders as a fallback (``import_reference``) and loads a module from a copied file checked by
its SHA-256 (``load_source_file``). Loading a file runs its code: only load files you trust.

>>> reference_of(reference_of, "model.name")
'randkit.models.user_code:reference_of'
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib
import importlib.machinery
import importlib.util
import inspect
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path
from types import ModuleType
from typing import Any

from randkit.errors import UserError


def reference_of(obj: Any, field: str) -> str:
    """``"module:qualname"`` of a module-level function or class; refuses anything else.

    Objects defined in ``__main__`` give ``"__main__:qualname"``; the caller decides whether
    such a reference is usable where it is going.
    """
    module = getattr(obj, "__module__", None)
    qualname = getattr(obj, "__qualname__", None)
    if not isinstance(module, str) or not isinstance(qualname, str) or not module:
        raise UserError(
            field,
            f"{obj!r} has no module and qualified name; pass a module-level function or class",
        )
    if qualname == "<lambda>" or "<lambda>" in qualname:
        raise UserError(field, f"{module}:{qualname} is a lambda; define a named function")
    if "<locals>" in qualname:
        raise UserError(
            field,
            f"{module}:{qualname} is defined inside a function; move it to module level",
        )
    return f"{module}:{qualname}"


def split_reference(reference: str, field: str) -> tuple[str, str]:
    """``"a.b:C"`` -> ``("a.b", "C")``; refuses a reference without both parts."""
    module_name, sep, qualname = reference.partition(":")
    if not sep or not module_name or not qualname:
        raise UserError(field, f"{reference!r} is not of the form 'package.module:name'")
    return module_name, qualname


def source_file_of(obj_or_reference: Any) -> Path | None:
    """The ``.py`` file that defines an object or an importable ``"module:qualname"``.

    None for built-ins, C extensions, objects whose module cannot be imported or found.
    """
    if isinstance(obj_or_reference, str):
        module_name = obj_or_reference.partition(":")[0]
        module = sys.modules.get(module_name)
        if module is None:
            try:
                module = importlib.import_module(module_name)
            except Exception:  # any import failure means: no source to be found
                return None
        return _module_file(module)
    try:
        found = inspect.getsourcefile(obj_or_reference)
    except TypeError:
        found = None
    if found is not None and Path(found).is_file():
        return Path(found).resolve()
    module = sys.modules.get(getattr(obj_or_reference, "__module__", None) or "")
    return _module_file(module) if module is not None else None


def _module_file(module: ModuleType) -> Path | None:
    found = getattr(module, "__file__", None)
    if not found or not str(found).endswith(".py") or not Path(found).is_file():
        return None
    return Path(found).resolve()


def _lookup(module: ModuleType, qualname: str, reference: str, field: str) -> Any:
    obj: Any = module
    for part in qualname.split("."):
        try:
            obj = getattr(obj, part)
        except AttributeError:
            raise UserError(
                field, f"cannot import {reference!r}: {module.__name__} has no {qualname!r}"
            ) from None
    return obj


def _search_folders(search: Sequence[Path]) -> list[Path]:
    folders: list[Path] = []
    for folder in [*search, Path.cwd()]:
        resolved = Path(folder).resolve()
        if resolved not in folders:
            folders.append(resolved)
    return folders


def import_reference(reference: str, field: str, search: Sequence[Path] = ()) -> Any:
    """Import ``"module:qualname"``; if the module is not importable, load it from the first
    ``<folder>/<module path>.py`` found in ``search`` and then the working directory.

    A module loaded from a file is registered in ``sys.modules`` under its name, so classes
    defined there pickle by reference like any other.
    """
    module_name, qualname = split_reference(reference, field)
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        # Fall back only when the missing module is the one asked for (or a parent of it),
        # not when it exists and one of its own imports is missing.
        missing = exc.name or ""
        if missing != module_name and not module_name.startswith(f"{missing}."):
            raise UserError(field, f"cannot import {reference!r}: {_describe(exc)}") from None
        module = _import_from_folders(reference, module_name, search, exc, field)
    except Exception as exc:  # a user module may fail to import in any way
        raise UserError(field, f"cannot import {reference!r}: {_describe(exc)}") from None
    return _lookup(module, qualname, reference, field)


def _import_from_folders(
    reference: str, module_name: str, search: Sequence[Path], exc: Exception, field: str
) -> ModuleType:
    """A module file ``<folder>/a/b.py``, or a package ``<folder>/a/__init__.py`` whose
    submodules then import as usual (relative imports included). While it runs, its folder
    is on ``sys.path``, as a script's is, so it can import its neighbours."""
    folders = _search_folders(search)
    top = module_name.partition(".")[0]
    relative = Path(*module_name.split(".")).with_suffix(".py")
    for folder in folders:
        init = folder / top / "__init__.py"
        if init.is_file():
            with _on_path(folder):
                _load_package(init, top, field)
                try:
                    return importlib.import_module(module_name)
                except Exception as inner:  # a user module may fail to import in any way
                    raise UserError(
                        field, f"cannot import {reference!r}: {_describe(inner)}"
                    ) from None
        if (folder / relative).is_file():
            with _on_path(folder):
                return load_source_file(folder / relative, module_name, None, field=field)
    looked = ", ".join(str(folder) for folder in folders)
    raise UserError(field, f"cannot import {reference!r}: {_describe(exc)} (looked in: {looked})")


@contextlib.contextmanager
def _on_path(folder: Path) -> Iterator[None]:
    entry = str(folder)
    sys.path.insert(0, entry)
    try:
        yield
    finally:
        with contextlib.suppress(ValueError):
            sys.path.remove(entry)


def _load_package(init: Path, name: str, field: str) -> ModuleType:
    spec = importlib.util.spec_from_file_location(
        name, init, submodule_search_locations=[str(init.parent)]
    )
    assert spec is not None and spec.loader is not None
    return _execute(spec, init, field)


def _describe(exc: BaseException) -> str:
    """``"Type: message"`` on one line (a SyntaxError's message spans several)."""
    text = " ".join(str(exc).split())
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def sha256_of(path: Path) -> str:
    """Hex SHA-256 of a file's bytes."""
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def load_source_file(
    path: Path,
    module_name: str,
    expected_sha256: str | None,
    *,
    field: str = "model.name",
) -> ModuleType:
    """Load ``path`` as module ``module_name`` (registered in ``sys.modules``); with
    ``expected_sha256``, refuse a file whose bytes do not match. Runs the file's code."""
    path = Path(path)
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise UserError(field, f"cannot read {str(path)!r}: {exc.strerror}") from None
    if expected_sha256 is not None:
        actual = hashlib.sha256(data).hexdigest()
        if actual != expected_sha256:
            raise UserError(
                field,
                f"{str(path)!r} has sha256 {actual}, expected {expected_sha256}: "
                "the file was changed",
            )
    spec = importlib.util.spec_from_file_location(module_name, path)
    if spec is None or spec.loader is None:
        raise UserError(field, f"cannot load {str(path)!r} as module {module_name!r}")
    return _execute(spec, path, field)


def _execute(spec: importlib.machinery.ModuleSpec, path: Path, field: str) -> ModuleType:
    """Run a module's code, registered in ``sys.modules`` (removed again if it fails)."""
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    try:
        spec.loader.exec_module(module)
    except BaseException as exc:
        sys.modules.pop(spec.name, None)
        if isinstance(exc, Exception):
            raise UserError(
                field, f"cannot import {spec.name!r} from {str(path)!r}: {_describe(exc)}"
            ) from None
        raise
    return module
