"""The user code a bundle carries: a custom model's module file, copied as ``code/<module>.py``.

A model from the zoo or from an installed package needs nothing: any machine that has the
package rebuilds it. A factory in a plain ``.py`` file (next to the config, on PYTHONPATH)
is copied into the bundle, and bundle.json records ``code: {module, file, sha256}``. Loading
checks the file's SHA-256 and imports it, so the bundle works in a fresh process, from any
folder, with no PYTHONPATH. Importing the file runs its code: load bundles of custom models
only from a source you trust.

Only a single file can be carried: a module inside a package that is not installed (it may
import its siblings) or one that imports other local, uninstalled modules is refused at
export, in one line naming ``model.name``.
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.metadata
import importlib.util
import re
import sys
import sysconfig
import threading
from collections.abc import Callable
from pathlib import Path
from types import ModuleType
from typing import Any

from randkit.config import ModelConfig
from randkit.errors import UserError
from randkit.models.user_code import load_source_file, sha256_of, source_file_of

CODE_DIR = "code"
MODULE_PATTERN = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,99}")
SHA256_PATTERN = re.compile(r"[0-9a-f]{64}")
_FIELD = "model.name"
_loading = threading.Lock()  # the server loads versions on worker threads


# ---------------------------------------------------------------------------------------------
# Export


def code_to_copy(model: ModelConfig) -> tuple[str, Path] | None:
    """``(module name, source file)`` when a bundle of ``model`` must carry its module;
    None for zoo models and installed modules. Refuses code that is not one file."""
    from randkit.models import REGISTRY, code_folders, resolve_factory

    if model.name in REGISTRY:
        return None
    factory = resolve_factory(model.name, code_folders(model))
    module_name = model.name.partition(":")[0]
    module = sys.modules.get(module_name)
    if module is None or module_name == "__main__":
        raise UserError(_FIELD, f"{model.name!r} is defined in a script (__main__), not a module")
    installed = _Installed()
    if installed(module):
        return None
    if module.__package__ or "." in module_name:
        package = module.__package__ or module_name.rpartition(".")[0]
        raise UserError(
            _FIELD,
            f"{model.name!r} lives in package {package!r}, which is not installed; a bundle "
            "carries only a single-file module: install the package (pip install -e) or "
            "move the factory into a top-level .py file",
        )
    where = getattr(factory, "__module__", None) or module_name
    if where != module_name and where in sys.modules and not installed(sys.modules[where]):
        raise UserError(
            _FIELD,
            f"{model.name!r} is defined in module {where!r}, not in {module_name!r}; a bundle "
            f"carries one file: name the factory as '{where}:...'",
        )
    source = source_file_of(module_name)
    if source is None:
        raise UserError(
            _FIELD, f"{model.name!r}: the source file of module {module_name!r} is not found"
        )
    local = _local_imports(module, installed)
    if local:
        raise UserError(
            _FIELD,
            f"{model.name!r}: module {module_name!r} uses the uninstalled module {local[0]!r}; "
            "a bundle carries one file: merge them or install them as a package",
        )
    return module_name, source


class _Installed:
    """Whether a module comes with Python or an installed distribution (no copy needed)."""

    def __init__(self) -> None:
        paths = sysconfig.get_paths()
        self.stdlib = [Path(paths[k]).resolve() for k in ("stdlib", "platstdlib")]
        self._distributions: dict[str, list[str]] | None = None

    def __call__(self, module: ModuleType) -> bool:
        top = module.__name__.partition(".")[0]
        if top in sys.stdlib_module_names or top in sys.builtin_module_names:
            return True
        source = getattr(module, "__file__", None)
        if source is not None:
            resolved = Path(source).resolve()
            if {"site-packages", "dist-packages"} & set(resolved.parts):
                return True
            if any(resolved.is_relative_to(root) for root in self.stdlib):
                return True
        return top in self.distributions()  # editable installs live outside site-packages

    def distributions(self) -> dict[str, list[str]]:
        if self._distributions is None:
            self._distributions = dict(importlib.metadata.packages_distributions())
        return self._distributions


def _local_imports(module: ModuleType, installed: _Installed) -> list[str]:
    """Uninstalled modules other than ``module`` whose objects ``module`` holds."""
    found = []
    for value in vars(module).values():
        name = value.__name__ if isinstance(value, ModuleType) else None
        if name is None and callable(value):
            name = getattr(value, "__module__", None)
        if not isinstance(name, str) or name == module.__name__ or name in found:
            continue
        # Objects of C extensions may name a submodule that was never imported.
        imported = sys.modules.get(name) or sys.modules.get(name.partition(".")[0])
        if imported is not None and not installed(imported):
            found.append(name)
    return found


def copy_code(model_name: str, code: tuple[str, Path]) -> tuple[dict[str, str], bytes]:
    """bundle.json's ``code`` section and the bytes to write at its ``file``."""
    module_name, source = code
    try:
        data = source.read_bytes()
    except OSError as exc:
        raise UserError(_FIELD, f"{model_name!r}: cannot read {str(source)!r}: {exc}") from None
    section = {
        "module": module_name,
        "file": f"{CODE_DIR}/{module_name}.py",
        "sha256": hashlib.sha256(data).hexdigest(),
    }
    return section, data


# ---------------------------------------------------------------------------------------------
# Load


def _bad(message: str) -> UserError:
    return UserError("bundle", message)


def bundled_factory(
    path: Path, meta: dict[str, Any], model: ModelConfig
) -> Callable[..., Any] | None:
    """The factory from the bundle's own ``code`` file, or None when it carries none.

    The file's SHA-256 is always checked. A module of that name already imported or
    importable with the same bytes is used as is; otherwise the bundle's file is imported,
    under the module's own name when that name is free, else under a private one.
    """
    section = meta.get("code")
    if section is None:
        return None
    module_name, file, digest = _check_code_section(section, model)
    source = path / file
    if not source.is_file():
        raise _bad(f"code file {file!r} is missing from {str(path)!r}")
    actual = sha256_of(source)
    if actual != digest:
        raise _bad(
            f"code file {file!r} fails its sha256 check (expected {digest[:16]}..., got "
            f"{actual[:16]}...): the file is corrupted or was modified"
        )
    with _loading:
        module = _same_code(module_name, digest) or _load_copy(source, module_name, digest)
    factory = module
    for part in model.name.partition(":")[2].split("."):
        factory = getattr(factory, part, None)
    if not callable(factory):
        raise _bad(f"code file {file!r} has no callable {model.name!r}")
    return factory


def _check_code_section(section: object, model: ModelConfig) -> tuple[str, str, str]:
    if not isinstance(section, dict):
        raise _bad(f"code section must be null or an object, got {section!r}")
    module_name = section.get("module")
    if not isinstance(module_name, str) or not MODULE_PATTERN.fullmatch(module_name):
        raise _bad(f"code.module must be a top-level module name, got {module_name!r}")
    if model.name.partition(":")[0] != module_name:
        raise _bad(f"code.module {module_name!r} is not the module of model {model.name!r}")
    file = section.get("file")
    if file != f"{CODE_DIR}/{module_name}.py":
        raise _bad(f"code.file must be '{CODE_DIR}/{module_name}.py', got {file!r}")
    digest = section.get("sha256")
    if not isinstance(digest, str) or not SHA256_PATTERN.fullmatch(digest):
        raise _bad(f"code.sha256 must be 64 lowercase hex digits, got {digest!r}")
    return module_name, file, digest


def _same_code(module_name: str, digest: str) -> ModuleType | None:
    """The module ``module_name`` as imported or importable now, if its file has ``digest``."""
    module = sys.modules.get(module_name)
    if module is not None:
        file = getattr(module, "__file__", None)
        return module if file and _digest_of(Path(file)) == digest else None
    try:
        spec = importlib.util.find_spec(module_name)
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.origin or _digest_of(Path(spec.origin)) != digest:
        return None
    return importlib.import_module(module_name)


def _load_copy(source: Path, module_name: str, digest: str) -> ModuleType:
    taken = module_name in sys.modules or _importable(module_name)
    name = f"_randkit_bundle_{module_name}_{digest[:16]}" if taken else module_name
    if name in sys.modules:
        return sys.modules[name]
    return load_source_file(source, name, digest, field="bundle")


def _importable(module_name: str) -> bool:
    try:
        return importlib.util.find_spec(module_name) is not None
    except (ImportError, ValueError):
        return False


def _digest_of(file: Path) -> str | None:
    try:
        return hashlib.sha256(file.read_bytes()).hexdigest()
    except OSError:
        return None
