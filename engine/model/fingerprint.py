"""A fingerprint of the base model's weights: what adapter versions are matched against.

An adapter only works with the weights it was trained on, and a name cannot tell: the
converted folder of the default model has another name than its hub id (same weights), and
two different models can share a name. So every version records `base_fingerprint` in its
meta.json and the engine matches on that; `base_model` stays as the readable label. Versions
made before fingerprints existed are accepted when the names match, with a warning.

The fingerprint comes from the weight files on disk, never from the loaded model, whose
weights nf4/int8 quantization changes. It is cheap: from each safetensors file only the
header (tensor names and shapes) and a few values per tensor are read through mmap, so it
costs milliseconds whatever the model's size. The values are rounded to bfloat16 precision
and the storage dtype is left out, so the same weights saved as float32 or bfloat16 match,
while any other weights do not.
"""
from __future__ import annotations

import hashlib
import json
import logging
import math
import mmap
import struct
from pathlib import Path
from typing import Any, Iterable, Mapping

from engine.adapters.store import META_KEY, write_json_atomic

log = logging.getLogger(__name__)

#: Bump when the recipe changes, so old and new fingerprints never compare equal by accident.
SAFETENSORS_FORMAT = "w1"
RAW_FORMAT = "b1"
SAMPLES_PER_TENSOR = 16

_FLOATS = {"F64": ("<d", 8), "F32": ("<f", 4), "F16": ("<e", 2)}
_SIZES = {"BF16": 2, "I64": 8, "U64": 8, "I32": 4, "U32": 4, "I16": 2, "U16": 2, "I8": 1, "U8": 1, "BOOL": 1,
          "F8_E4M3": 1, "F8_E5M2": 1}


class ModelIdentity(str):
    """The base model as adapters see it: its readable name (this string) plus `fingerprint`.

    A str, so everything that logs, compares or records the model id keeps working; the
    checks that know about fingerprints read the attribute.
    """

    fingerprint: str | None

    def __new__(cls, name: str, fingerprint: str | None = None) -> "ModelIdentity":
        obj = super().__new__(cls, name)
        obj.fingerprint = fingerprint
        return obj


# ---- computing ----------------------------------------------------------------------------

def _bf16(value: float) -> int:
    """The bfloat16 bits of a float (round to nearest even): equal for fp32 and bf16 copies."""
    bits = struct.unpack("<I", struct.pack("<f", value))[0]
    if value != value:  # NaN
        return 0x7FC0
    return ((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16) & 0xFFFF


def _sample_positions(numel: int) -> list[int]:
    if numel <= SAMPLES_PER_TENSOR:
        return list(range(numel))
    step = (numel - 1) / (SAMPLES_PER_TENSOR - 1)
    return sorted({round(i * step) for i in range(SAMPLES_PER_TENSOR)})


def _tensor_line(name: str, info: Mapping[str, Any], data: Any, base: int) -> str:
    dtype, shape = info["dtype"], [int(d) for d in info["shape"]]
    start, _end = (int(x) for x in info["data_offsets"])
    size = _FLOATS[dtype][1] if dtype in _FLOATS else _SIZES.get(dtype, 1)
    samples = []
    for pos in _sample_positions(math.prod(shape)):
        raw = data[base + start + pos * size:base + start + (pos + 1) * size]
        if dtype in _FLOATS:
            samples.append(f"{_bf16(struct.unpack(_FLOATS[dtype][0], raw)[0]):04x}")
        elif dtype == "BF16":
            samples.append(f"{struct.unpack('<H', raw)[0]:04x}")
        else:  # integer / fp8 / packed quantized tensors: the raw bytes
            samples.append(raw.hex())
    float_like = dtype in _FLOATS or dtype == "BF16"
    return f"{name}|{','.join(map(str, shape))}|{'f' if float_like else dtype}|{''.join(samples)}\n"


def _from_safetensors(files: list[Path]) -> str:
    lines = []
    for path in files:
        with path.open("rb") as fh, mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ) as data:
            (size,) = struct.unpack("<Q", data[:8])
            header = json.loads(data[8:8 + size])
            base = 8 + size
            for name, info in header.items():
                if name != "__metadata__":
                    lines.append(_tensor_line(name, info, data, base))
    digest = hashlib.sha256("".join(sorted(lines)).encode()).hexdigest()
    return f"{SAFETENSORS_FORMAT}:{digest[:32]}"


def _from_raw(files: list[Path], chunk: int = 1 << 16) -> str:
    """Weights in another format (pytorch_model.bin): file names, sizes and three chunks each."""
    h = hashlib.sha256()
    for path in files:
        size = path.stat().st_size
        h.update(f"{path.name}|{size}\n".encode())
        with path.open("rb") as fh:
            for offset in sorted({0, max(0, size // 2 - chunk // 2), max(0, size - chunk)}):
                fh.seek(offset)
                h.update(fh.read(chunk))
    return f"{RAW_FORMAT}:{h.hexdigest()[:32]}"


def fingerprint_folder(folder: Path | str) -> str | None:
    """The fingerprint of the weights in a model folder; None when it holds no weight files."""
    folder = Path(folder)
    files = sorted(folder.glob("*.safetensors"))
    if files:
        return _from_safetensors(files)
    raw = sorted(p for p in folder.iterdir() if p.suffix in (".bin", ".pt", ".pth") and p.is_file())
    return _from_raw(raw) if raw else None


def model_folder(load_path: str) -> Path | None:
    """The folder the weights are read from: a local folder, or a hub id's cached snapshot."""
    path = Path(load_path)
    if path.is_dir():
        return path
    try:
        from huggingface_hub import try_to_load_from_cache

        cached = try_to_load_from_cache(load_path, "config.json")
    except Exception:  # not a valid repo id, or no hub library
        return None
    return Path(cached).parent if isinstance(cached, str) else None


def fingerprint_model(load_path: str) -> str | None:
    """The fingerprint of the model at `load_path` (folder or hub id); None when unknown (logged)."""
    folder = model_folder(load_path)
    if folder is None:
        log.warning("cannot find the weight files of %s: adapters are matched by name only", load_path)
        return None
    try:
        return fingerprint_folder(folder)
    except (OSError, ValueError, KeyError, struct.error) as exc:
        log.warning("cannot fingerprint the weights in %s (%s): adapters are matched by name only", folder, exc)
        return None


# ---- stamping versions made before fingerprints -------------------------------------------

def stamp(version_dirs: Iterable[Path], model: ModelIdentity, force: bool = False) -> list[str]:
    """Record `model.fingerprint` in each version's meta.json that lacks one; returns what it did."""
    done = []
    for folder in version_dirs:
        meta_path = Path(folder) / "meta.json"
        meta = json.loads(meta_path.read_text(encoding="utf-8"))
        if meta.get(META_KEY) == model.fingerprint:
            done.append(f"{folder}: already stamped")
            continue
        if meta.get(META_KEY) and not force:
            done.append(f"{folder}: has another fingerprint ({meta[META_KEY]}); left alone (--force to replace)")
            continue
        if meta.get("base_model") != str(model) and not force:
            done.append(f"{folder}: base_model {meta.get('base_model')!r} is not {str(model)!r}; left alone")
            continue
        meta[META_KEY] = model.fingerprint
        write_json_atomic(meta_path, meta)
        done.append(f"{folder}: stamped {model.fingerprint}")
    return done
