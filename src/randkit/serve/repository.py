"""The model repository: ``ROOT/NAME/VERSION/`` bundles and ``ROOT/NAME/policy.yaml``.

Models are loaded whole (every version and the policy) and can be reloaded or unloaded while
the server runs. A name from a URL is checked against the bundle-name pattern before it
touches the disk, so no request can reach outside ROOT.
"""

from __future__ import annotations

import asyncio
import functools
import logging
from collections.abc import Awaitable, Callable
from concurrent.futures import Executor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from randkit.deploy.bundle import BUNDLE_FILE, NAME_PATTERN, LoadedBundle, load_bundle
from randkit.errors import UserError
from randkit.serve.batcher import Batcher
from randkit.serve.engine import Engine
from randkit.serve.options import RequestError, shown
from randkit.serve.traffic import Router, TrafficPolicy, load_policy, resolve_version

log = logging.getLogger("randkit.serve")
POLICY_FILE = "policy.yaml"


@dataclass
class ServedVersion:
    version: str
    bundle: LoadedBundle
    engine: Engine
    batcher: Batcher


@dataclass
class ServedModel:
    name: str
    versions: dict[str, ServedVersion]
    policy: TrafficPolicy
    router: Router
    failed: dict[str, str] = field(default_factory=dict)  # version -> why it did not load
    epoch: int = 0  # the ledger's policy epoch its experiment counts in (see ledger.py)

    def labels_of(self, version: str) -> list[str]:
        return sorted(label for label, v in self.policy.labels.items() if v == version)


@dataclass
class BatchSettings:
    max_rows: int = 64
    max_delay_s: float = 0.002
    on_batch: Callable[[str, str, int, list[float]], None] | None = None  # model, version, ...
    others_coming: Callable[[], bool] | None = None  # see Batcher


class Repository:
    def __init__(
        self,
        root: str | Path,
        executor: Executor,
        device: str = "cpu",
        seed: int = 0,
        batching: BatchSettings | None = None,
        open_epoch: Callable[[ServedModel], Awaitable[int]] | None = None,
    ) -> None:
        self.root = Path(root)
        if not self.root.is_dir():
            raise UserError("repository", f"{str(self.root)!r} is not a directory")
        self.executor, self.device, self.seed = executor, device, seed
        self.batching = batching or BatchSettings()
        self.open_epoch = open_epoch
        self.models: dict[str, ServedModel] = {}
        self._lock = asyncio.Lock()

    # -- what is on disk --------------------------------------------------------------------

    def names_on_disk(self) -> list[str]:
        return sorted(
            p.name for p in self.root.iterdir() if p.is_dir() and NAME_PATTERN.fullmatch(p.name)
        )

    def _versions_on_disk(self, name: str) -> list[str]:
        family = self.root / name
        return sorted(
            p.name
            for p in family.iterdir()
            if p.is_dir() and NAME_PATTERN.fullmatch(p.name) and (p / BUNDLE_FILE).is_file()
        )

    def _family(self, name: str) -> Path:
        if not isinstance(name, str) or not NAME_PATTERN.fullmatch(name):
            raise RequestError(404, f"model {shown(name)} not found")
        family = self.root / name
        if not family.is_dir():
            raise RequestError(404, f"model {shown(name)} not found in the repository")
        return family

    def index(self) -> list[dict[str, Any]]:
        """The V2 repository index: every model version on disk and its state."""
        entries = []
        for name in self.names_on_disk():
            served = self.models.get(name)
            for version in self._versions_on_disk(name):
                entry: dict[str, Any] = {"name": name, "version": version}
                if served and version in served.versions:
                    entry.update(state="READY", reason="")
                elif served and version in served.failed:
                    entry.update(state="UNAVAILABLE", reason=served.failed[version])
                else:
                    entry.update(state="UNAVAILABLE", reason="unloaded")
                entries.append(entry)
        return entries

    # -- load and unload --------------------------------------------------------------------

    async def load_all(self) -> None:
        for name in self.names_on_disk():
            try:
                await self.load(name)
            except RequestError as exc:
                log.warning("model %s not loaded: %s", name, exc.message)

    async def load(self, name: str) -> ServedModel:
        """(Re)load every version of ``name`` and its policy; a reload swaps atomically."""
        family = self._family(name)
        async with self._lock:
            versions = self._versions_on_disk(name)
            if not versions:
                raise RequestError(400, f"model {shown(name)} has no version folder with a bundle")
            try:
                policy = load_policy(family / "policy.yaml", versions)
            except UserError as exc:
                raise RequestError(400, f"model {shown(name)}: {exc}") from None
            served: dict[str, ServedVersion] = {}
            failed: dict[str, str] = {}
            for version in versions:
                try:
                    # In the inference thread: a second thread running torch would keep its own
                    # OpenMP pool, and the two pools fight over the cores at every forward pass.
                    bundle = await asyncio.get_running_loop().run_in_executor(
                        self.executor, load_bundle, family / version, self.device
                    )
                except UserError as exc:
                    failed[version] = str(exc)
                    log.warning("model %s version %s not loaded: %s", name, version, exc)
                    continue
                engine = Engine(bundle, max_rows=max(self.batching.max_rows, 4096))
                hook = self.batching.on_batch
                batcher = Batcher(
                    engine,
                    self.executor,
                    self.batching.max_rows,
                    self.batching.max_delay_s,
                    functools.partial(hook, name, version) if hook else None,
                    self.batching.others_coming,
                )
                batcher.start()
                served[version] = ServedVersion(version, bundle, engine, batcher)
            if not served:
                first = next(iter(failed.values()))
                raise RequestError(400, f"no version of model {shown(name)} loads: {first}")
            model = ServedModel(name, served, policy, Router(policy, name, self.seed), failed)
            if self.open_epoch is not None:  # before serving: no prediction without its epoch
                try:
                    model.epoch = await self.open_epoch(model)
                except BaseException:
                    await _stop(model)
                    raise
            previous = self.models.get(name)
            self.models[name] = model
        if previous is not None:
            await _stop(previous)
        return model

    async def unload(self, name: str) -> None:
        self._family(name)
        async with self._lock:
            model = self.models.pop(name, None)
        if model is None:
            raise RequestError(400, f"model {shown(name)} is not loaded")
        await _stop(model)

    async def close(self) -> None:
        for name in list(self.models):
            await _stop(self.models.pop(name))

    # -- lookup -----------------------------------------------------------------------------

    def model(self, name: str) -> ServedModel:
        model = self.models.get(name) if isinstance(name, str) else None
        if model is None:
            if isinstance(name, str) and NAME_PATTERN.fullmatch(name):
                if (self.root / name).is_dir():
                    raise RequestError(404, f"model {shown(name)} is not loaded")
            raise RequestError(404, f"model {shown(name)} not found")
        return model

    def version(self, model: ServedModel, requested: str) -> ServedVersion:
        """A version named by number or by label."""
        version = resolve_version(model.policy, list(model.versions), requested)
        if version is None or version not in model.versions:
            raise RequestError(
                404, f"model {model.name!r} has no loaded version or label {shown(requested)}"
            )
        return model.versions[version]


async def _stop(model: ServedModel) -> None:
    for served in model.versions.values():
        await served.batcher.stop()
