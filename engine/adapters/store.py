"""The adapters folder on disk: versions, their meta.json, and the `current` pointer.

Disk is the truth about adapters. Everything that reads or writes this layout goes through
here, so the registry (serving) and training (writing) agree on it:

    adapters/<domain>/data/           training data
    adapters/<domain>/vN/             adapter_config.json, adapter_model.safetensors, meta.json
    adapters/<domain>/current         one line: "vN"

New versions appear atomically: written into a staging folder beside them, then renamed.
`current` is replaced with os.replace, so readers see the old or the new pointer, never half.
"""
from __future__ import annotations

import datetime as dt
import json
import math
import os
import re
import shutil
import uuid
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

from engine.errors import AdapterInvalid, AdapterNotFound
from engine.types import AdapterInfo, AdapterState, AdapterVersionInfo

VERSION_RE = re.compile(r"^v(\d+)\Z")  # \Z, not $: "$" also matches before a trailing newline
NAME_RE = re.compile(r"^[a-z0-9][a-z0-9_-]{0,63}\Z")
META_FILE = "meta.json"
CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
PEFT_KEY_PREFIX = "base_model.model."  # of every tensor name in a peft LoRA file
CURRENT_FILE = "current"
#: meta.json's record of the base weights a version was trained on (engine.model.fingerprint)
META_KEY = "base_fingerprint"
HISTORY_FILE = "history.json"  # {"served": ["v1", "v3"]}: the versions that were current, in order


def version_number(version: str) -> int:
    m = VERSION_RE.match(version)
    if not m:
        raise ValueError(f"{version!r} is not a version name (expected v1, v2, ...)")
    return int(m.group(1))


def version_name(domain: str, version: str) -> str:
    """The name one version of an adapter goes by where it is loaded (peft's adapter name, the
    vLLM replicas' LoRA name and the `model` of requests that use it): one per version, so an old
    and a new version, or a serving and a candidate one, coexist."""
    return f"{domain}__{version}"


def catalog(store: "AdapterStore", serving: dict[str, str], states: dict[str, AdapterState],
            errors: dict[str, str]) -> list[AdapterInfo]:
    """Every domain on disk or serving, with its versions: the same view for every backend.

    `serving` maps a domain to its serving version, `states` a `version_name` to its resident
    state, `errors` a domain to why its current version is not serving. A version is a candidate
    when training kept it back (meta.json "status": "candidate") and it does not serve.
    """
    out = []
    for domain in sorted(set(store.domains()) | set(serving)):
        versions = tuple(
            AdapterVersionInfo(
                name=domain, version=v.version, created=v.meta.get("created"),
                base_model=v.meta.get("base_model"),
                metrics={k: float(x) for k, x in (v.meta.get("metrics") or {}).items()
                         if isinstance(x, (int, float)) and math.isfinite(x)},
                is_current=v.version == serving.get(domain),
                state=states.get(version_name(domain, v.version)),
                candidate=v.meta.get("status") == "candidate" and v.version != serving.get(domain),
            )
            for v in store.versions(domain)
        )
        if versions or domain in serving:
            out.append(AdapterInfo(domain, serving.get(domain), versions, errors.get(domain)))
    return out


@dataclass(frozen=True)
class VersionDir:
    domain: str
    version: str
    path: Path
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def number(self) -> int:
        return version_number(self.version)

    @property
    def weights(self) -> Path:
        return self.path / WEIGHTS_FILE


class AdapterStore:
    """Read and write the adapters folder. Cheap: every call looks at the disk again."""

    def __init__(self, root: Path | str) -> None:
        self.root = Path(root)

    # ---- reading -------------------------------------------------------------------
    def domains(self) -> list[str]:
        """Domains that have at least one version or a data folder."""
        if not self.root.is_dir():
            return []
        return sorted(
            p.name for p in self.root.iterdir()
            if p.is_dir() and NAME_RE.match(p.name) and (self.versions(p.name) or (p / "data").is_dir())
        )

    def domain_dir(self, domain: str) -> Path:
        if not NAME_RE.match(domain):
            raise AdapterNotFound(f"{domain!r} is not an adapter name (lowercase letters, digits, _ and -)")
        return self.root / domain

    def versions(self, domain: str) -> list[VersionDir]:
        """All versions on disk, oldest first. Folders without meta.json still count."""
        d = self.domain_dir(domain)
        found = [VersionDir(domain, p.name, p, self._read_meta(p))
                 for p in (d.iterdir() if d.is_dir() else ()) if p.is_dir() and VERSION_RE.match(p.name)]
        return sorted(found, key=lambda v: v.number)

    def version(self, domain: str, version: str) -> VersionDir:
        p = self.domain_dir(domain) / version
        if not VERSION_RE.match(version) or not p.is_dir():
            raise AdapterNotFound(f"adapter {domain} has no version {version!r} in {self.domain_dir(domain)}")
        return VersionDir(domain, version, p, self._read_meta(p))

    def current(self, domain: str) -> str | None:
        """The serving version: the `current` file, else the newest promoted version."""
        f = self.domain_dir(domain) / CURRENT_FILE
        if f.is_file():
            value = f.read_text(encoding="utf-8").strip()
            if VERSION_RE.match(value):
                return value
        promoted = [v for v in self.versions(domain) if v.meta.get("status", "promoted") == "promoted"]
        return promoted[-1].version if promoted else None

    def next_version(self, domain: str) -> str:
        existing = self.versions(domain)
        return f"v{(existing[-1].number if existing else 0) + 1}"

    @staticmethod
    def _read_meta(path: Path) -> dict[str, Any]:
        f = path / META_FILE
        if not f.is_file():
            return {}
        try:
            data = json.loads(f.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return {"_error": f"{f} is not valid JSON"}
        return data if isinstance(data, dict) else {"_error": f"{f} is not a JSON object"}

    # ---- writing -------------------------------------------------------------------
    @contextmanager
    def staging(self, domain: str) -> Iterator[Path]:
        """A private folder to write a new version into; removed if the block fails."""
        d = self.domain_dir(domain)
        d.mkdir(parents=True, exist_ok=True)
        path = d / f".staging-{uuid.uuid4().hex[:12]}"
        path.mkdir()
        try:
            yield path
        except BaseException:
            shutil.rmtree(path, ignore_errors=True)
            raise

    def commit(self, domain: str, staged: Path, meta: dict[str, Any]) -> VersionDir:
        """Write meta.json into a staged folder and rename it to the next free vN."""
        for required in (CONFIG_FILE, WEIGHTS_FILE):
            if not (staged / required).is_file():
                shutil.rmtree(staged, ignore_errors=True)
                raise AdapterInvalid(f"staged adapter for {domain} lacks {required}")
        while True:
            version = self.next_version(domain)
            full = {"name": domain, "version": version, "created": utc_now(), **meta}
            full["version"] = version
            write_json_atomic(staged / META_FILE, full)
            target = self.domain_dir(domain) / version
            try:
                staged.rename(target)  # atomic on one filesystem; fails if target exists
            except OSError:
                if target.exists():
                    continue  # someone took that number meanwhile; take the next
                raise
            return VersionDir(domain, version, target, full)

    def set_current(self, domain: str, version: str) -> None:
        """Point `current` at a version and remember it served (for rollback)."""
        self.version(domain, version)  # raises if missing
        history = self.history(domain)
        if not history or history[-1] != version:
            history.append(version)
            self._write_history(domain, history)
        self._write_current(domain, version)

    def _write_current(self, domain: str, version: str) -> None:
        d = self.domain_dir(domain)
        tmp = d / f"{CURRENT_FILE}.tmp-{uuid.uuid4().hex[:8]}"
        tmp.write_text(version + "\n", encoding="utf-8")
        os.replace(tmp, d / CURRENT_FILE)

    # ---- pointer history: rollback returns to the version that served before ---------
    def rollback(self, domain: str) -> str:
        """Move `current` back to the version that served before it; returns that version.

        The history is a stack, so two rollbacks after v1 -> v2 -> v3 land on v1 (not on v3
        again). Without history (a fresh checkout, a hand-edited pointer) the newest promoted
        version below the current one is used.
        """
        cur = self.current(domain)
        if cur is None:
            raise AdapterNotFound(f"adapter {domain} has no current version to roll back from")
        stack = self.history(domain)
        if not stack or stack[-1] != cur:
            stack.append(cur)
        stack.pop()
        on_disk = {v.version: v for v in self.versions(domain)}
        while stack and (stack[-1] not in on_disk or stack[-1] == cur):
            stack.pop()
        if not stack:
            older = [v for v in on_disk.values() if v.number < version_number(cur)
                     and v.meta.get("status", "promoted") == "promoted"]
            if not older:
                raise AdapterNotFound(f"adapter {domain} has no earlier version to roll back to from {cur}")
            stack = [max(older, key=lambda v: v.number).version]
        target = stack[-1]
        self._write_history(domain, stack)
        self._write_current(domain, target)
        return target

    def history(self, domain: str) -> list[str]:
        """Versions that were made current, oldest first; rollback pops the newest."""
        f = self.domain_dir(domain) / HISTORY_FILE
        try:
            data = json.loads(f.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return []
        stack = data.get("served") if isinstance(data, dict) else None
        return [v for v in stack if isinstance(v, str) and VERSION_RE.match(v)] if isinstance(stack, list) else []

    def _write_history(self, domain: str, stack: list[str]) -> None:
        write_json_atomic(self.domain_dir(domain) / HISTORY_FILE, {"served": stack[-50:]})

    def update_meta(self, domain: str, version: str, **changes: Any) -> dict[str, Any]:
        v = self.version(domain, version)
        meta = {**v.meta, **changes}
        write_json_atomic(v.path / META_FILE, meta)
        return meta

    def clean_staging(self, domain: str) -> int:
        """Remove leftovers of interrupted writes (a killed trainer); returns how many."""
        leftovers = list(self.domain_dir(domain).glob(".staging-*"))
        for p in leftovers:
            shutil.rmtree(p, ignore_errors=True)
        return len(leftovers)


def write_json_atomic(path: Path, data: Any) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{uuid.uuid4().hex[:8]}")
    tmp.write_text(json.dumps(data, indent=2, ensure_ascii=False, sort_keys=True) + "\n", encoding="utf-8")
    os.replace(tmp, path)


def utc_now() -> str:
    return dt.datetime.now(dt.timezone.utc).replace(microsecond=0).isoformat()
