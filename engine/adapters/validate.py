"""Checking an adapter version's files against the base model before anything loads them.

Both backends refuse a version for the same reasons, with the file and the mismatch named, so
an admin knows what to fix and the serving version is never touched by a bad one.
"""
from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from typing import Any, Mapping

from engine.adapters.store import CONFIG_FILE, META_KEY, PEFT_KEY_PREFIX, WEIGHTS_FILE, VersionDir, version_name
from engine.errors import AdapterIncompatible, AdapterInvalid

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ValidatedAdapter:
    """What validation learned, so loading need not re-read the config."""

    version: VersionDir
    modules: frozenset[str]  # module paths in the base model the adapter touches
    file_bytes: int
    rank: int = 0  # LoRA rank r from its config
    #: the weights file's tensors as validation read them (the fast path copies them into a
    #: slot instead of reading the file again); not kept after the load
    tensors: dict[str, Any] | None = field(default=None, repr=False, compare=False)

    @property
    def key(self) -> str:
        """The name the runtime keeps it under (`version_name`)."""
        return version_name(self.version.domain, self.version.version)


def validate(version: VersionDir, model_id: str, linear_shapes: dict[str, tuple[int, int]]) -> ValidatedAdapter:
    """Check a version's files against the base model without touching the model.

    Raises AdapterInvalid / AdapterIncompatible with the file and the mismatch, so an admin
    knows what to fix; the serving version is unaffected.
    """
    path = version.path
    where = f"adapter {version.domain}/{version.version} ({path})"
    for required in (CONFIG_FILE, WEIGHTS_FILE, "meta.json"):
        if not (path / required).is_file():
            raise AdapterInvalid(f"{where}: {required} is missing")
    if "_error" in version.meta:
        raise AdapterInvalid(f"{where}: {version.meta['_error']}")
    mismatch = base_mismatch(version.meta, model_id, where)  # by weights' fingerprint, else by name
    if mismatch:
        raise AdapterIncompatible(f"{where} {mismatch}; adapters only work with the model they were trained on")
    try:
        config = json.loads((path / CONFIG_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise AdapterInvalid(f"{where}: {CONFIG_FILE} is not valid JSON: {exc}") from exc
    if not isinstance(config, dict) or str(config.get("peft_type", "")).upper() != "LORA":
        raise AdapterInvalid(f"{where}: {CONFIG_FILE} must describe a LoRA adapter (peft_type LORA)")
    r = config.get("r")
    if not isinstance(r, int) or r < 1:
        raise AdapterInvalid(f"{where}: {CONFIG_FILE} has no valid rank r (got {r!r})")
    try:
        from safetensors import safe_open

        with safe_open(str(path / WEIGHTS_FILE), framework="pt") as f:
            keys = list(f.keys())
            tensors = {k: f.get_tensor(k) for k in keys}
    except Exception as exc:  # safetensors raises its own types for corrupt headers
        raise AdapterInvalid(f"{where}: {WEIGHTS_FILE} cannot be read: {exc}") from exc
    if not keys:
        raise AdapterInvalid(f"{where}: {WEIGHTS_FILE} holds no tensors")
    modules = set()
    for key, t in tensors.items():
        for part in (".lora_A.weight", ".lora_B.weight"):
            if key.endswith(part):
                module = key.removeprefix(PEFT_KEY_PREFIX)[: -len(part)]
                break
        else:
            continue  # other trainable extras (e.g. modules_to_save) are peft's to check
        shape = linear_shapes.get(module)
        if shape is None:
            raise AdapterIncompatible(f"{where}: targets {module!r}, which this base model does not have")
        inf, outf = shape
        expected = (r, inf) if part == ".lora_A.weight" else (outf, r)
        if tuple(t.shape) != expected:
            raise AdapterIncompatible(
                f"{where}: {key} has shape {tuple(t.shape)}, expected {expected} (rank {r} on {module})"
            )
        modules.add(module)
    if not modules:
        raise AdapterInvalid(f"{where}: {WEIGHTS_FILE} has no lora_A/lora_B weights")
    bad = _first_not_finite(tensors)
    if bad is not None:
        raise AdapterInvalid(f"{where}: {bad} contains NaN or infinite values")
    return ValidatedAdapter(version, frozenset(modules), (path / WEIGHTS_FILE).stat().st_size, r, tensors)


def _first_not_finite(tensors: dict[str, Any]) -> str | None:
    """The first tensor holding NaN or inf, or None. Tensor by tensor: one check over all of
    them at once needs a copy of them all, whose fresh pages cost more than the checks."""
    return next((key for key, t in tensors.items() if t.is_floating_point() and not bool(t.isfinite().all())), None)


def base_mismatch(meta: Mapping[str, Any], model: str, where: str = "this version") -> str | None:
    """Why a version (its meta.json) cannot serve on `model`, or None when it can.

    The fingerprint decides when both sides have one; otherwise the names must match (a
    version from before fingerprints: accepted with a warning that says how to record one).
    """
    trained_name = meta.get("base_model")
    trained_fp = meta.get(META_KEY) or None
    serving_fp = getattr(model, "fingerprint", None)
    if trained_fp and serving_fp:
        if trained_fp == serving_fp:
            return None
        return (f"was trained on other weights than this engine serves ({trained_name!r}, fingerprint "
                f"{trained_fp}; serving {str(model)!r}, fingerprint {serving_fp})")
    if trained_name != str(model):
        return f"was trained for base model {trained_name!r}, but this engine serves {str(model)!r}"
    if serving_fp and not trained_fp:
        log.warning("%s records no %s (made before fingerprints); accepted because its base_model %r matches. "
                    "Record it with `python -m engine.model --stamp <version folder>`",
                    where, META_KEY, trained_name)
    return None
