"""Stacked LoRA slots: every resident adapter version's A/B matrices live in fixed tensors.

Per target module there is one `A` of shape [slots * r_max, in] and one `B` of shape
[slots * r_max, out] (B is stored transposed, so the delta is two plain matmuls); modules
fused into one product (q/k/v, gate/up) share one pair, J times as tall (see `LoraGroup`).
Slot `s` owns rank rows [s * r_max, (s + 1) * r_max) (times J); a version of smaller rank
is zero-padded. Slot 0 is all zeros and means "no adapter" (the base model as an adapter id,
like peft's `__base__`). A row of the batch picks its slot by index; the delta for the whole batch is

    delta = ((x @ A[lo:hi].T) * mask) @ B[lo:hi]        mask[row] = scaling of the row's slot
                                                        on that slot's rank rows, 0 elsewhere

which is the same number of kernels whatever the mix of adapters (Punica/S-LoRA's idea, done
with dense matmuls over the slot range in use). There is no loop over adapters or rows and
no host sync. `lo:hi` is the smallest slot range that covers the batch's adapters (on CUDA
the whole stack, so the shapes are static for CUDA graphs); slots are handed out lowest
first, so the adapters in use sit next to each other.

Where the product is one bf16 weight (`QUANTIZATION=bf16` on a CPU), a group's A lives in
extra rows below that weight (`ride`, `FusedLinear.make_room`): the shrink `x @ A.T` comes
out of the product's own kernel as extra columns, in bf16 like the product (its inputs are
rounded to bf16 already), instead of a separate fp32 product per module: one call fewer per
group and step, and a prefill chunk's shrink runs on the AMX tiles. The expand stays fp32 (the bf16 products of
its small shapes cost more than they save). Such a group's `views` A is unused.

Shapes are fixed at start (`MAX_RESIDENT_ADAPTERS`, `MAX_LORA_RANK`, `LORA_TARGET_MODULES`);
loading a version only writes numbers into a free slot, so nothing has to be re-captured.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import math
import threading
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Mapping, Sequence

import torch

from engine.adapters.store import CONFIG_FILE, PEFT_KEY_PREFIX
from engine.errors import AdapterIncompatible, AdapterInvalid

if TYPE_CHECKING:
    from engine.serving.fused import FusedLinear

log = logging.getLogger(__name__)


#: Config keys whose non-default values the batched path cannot serve, with the reason.
_UNSUPPORTED = {
    "use_dora": "DoRA (use_dora)",
    "lora_bias": "LoRA bias (lora_bias)",
    "modules_to_save": "extra trained modules (modules_to_save)",
    "rank_pattern": "per-module ranks (rank_pattern)",
    "alpha_pattern": "per-module alphas (alpha_pattern)",
    "fan_in_fan_out": "fan_in_fan_out",
    "layer_replication": "layer_replication",
    "trainable_token_indices": "trainable tokens (trainable_token_indices)",
    "target_parameters": "LoRA on parameters (target_parameters)",
}


def unsupported_features(config: dict[str, Any]) -> list[str]:
    """The features of a peft LoRA config that the batched path does not serve."""
    found = [label for key, label in _UNSUPPORTED.items() if config.get(key) not in (None, False, {}, [], "")]
    if str(config.get("bias", "none")) != "none":
        found.append(f"bias={config.get('bias')!r}")
    for flag in ("use_qalora", "use_bdlora"):
        if config.get(flag):
            found.append(flag)
    return found


def lora_scaling(config: dict[str, Any]) -> float:
    r = int(config["r"])
    alpha = float(config.get("lora_alpha", r))
    return alpha / (math.sqrt(r) if config.get("use_rslora") else r)


def serving_targets(model: Any, setting: str) -> dict[str, tuple[int, int]]:
    """Module path -> (in, out) of the linear layers the batched path can carry LoRA on.

    `all-linear` means every linear layer inside the decoder blocks (peft's meaning, without
    the output head); otherwise a comma-separated list of module names such as `q_proj,v_proj`.
    """
    names = None if setting.strip() == "all-linear" else {n.strip() for n in setting.split(",") if n.strip()}
    out: dict[str, tuple[int, int]] = {}
    for path, module in model.named_modules():
        inf, outf = getattr(module, "in_features", None), getattr(module, "out_features", None)
        if not (isinstance(inf, int) and isinstance(outf, int)) or ".layers." not in f".{path}":
            continue
        if names is None or path.rsplit(".", 1)[-1] in names:
            out[path] = (inf, outf)
    return out


@dataclass(frozen=True)
class LoraGroup:
    """The LoRA target modules of one fused product (q/k/v, gate/up) or a lone module.

    The group's delta is added to the product's whole output [rows, out_features], member `j`
    owning columns `columns[j]`; its stacks interleave the members' rank rows, so the shrink is
    one product for all members and the expand one product into a block-diagonal B.
    """

    key: str  # the product's key, as the runner passes it to `apply`
    members: tuple[str, ...]  # module paths with LoRA slots, in column order
    columns: tuple[tuple[int, int], ...]  # [lo, hi) of each member in the product's output
    in_features: int
    out_features: int  # the product's output width (members without LoRA included)

    @property
    def width(self) -> int:
        return len(self.members)


def product_key(paths: Sequence[str]) -> str:
    """The key of a fused product of `paths` (a lone module's key is its path)."""
    return "+".join(paths)


def lora_groups(targets: dict[str, tuple[int, int]],
                products: Sequence[Sequence[tuple[str, int]]] = ()) -> list[LoraGroup]:
    """Group `targets` by the fused products (lists of (module path, out_features) in column
    order) they belong to; a target in no product is a group of its own."""
    groups, grouped = [], set()
    for product in products:
        key = product_key([p for p, _o in product])
        members, columns, lo = [], [], 0
        for path, out in product:
            if path in targets:
                members.append(path)
                columns.append((lo, lo + out))
            lo += out
        if members:
            groups.append(LoraGroup(key, tuple(members), tuple(columns), targets[members[0]][0], lo))
            grouped.update(members)
    for path, (inf, outf) in targets.items():
        if path not in grouped:
            groups.append(LoraGroup(path, (path,), ((0, outf),), inf, outf))
    return groups


@dataclass(frozen=True)
class LoraBatch:
    """Per-forward LoRA routing: per group the (A.T, B) views of the slot range in use, and
    per group width (members per group) each row's scaled one-hot mask over that range's rank
    rows (None: every row uses the one slot of the range, scaled by `alpha`)."""

    views: dict[str, tuple[torch.Tensor, torch.Tensor]]
    masks: dict[int, torch.Tensor] | None  # width -> [rows or tokens, range * width]
    alpha: float = 1.0
    span: tuple[int, int] = (0, 0)  # the range's rank rows [lo, hi), in slot * r_max + rank units

    def for_tokens(self, row_of_token: torch.Tensor) -> "LoraBatch":
        """The routing of packed tokens, from each token's row (prefill)."""
        if self.masks is None:
            return self
        return dataclasses.replace(self, masks={w: m.index_select(0, row_of_token) for w, m in self.masks.items()})


class LoraSlots:
    """The stacked tensors plus the slot bookkeeping (which version owns which slot).

    Per group of width J (see `LoraGroup`): A [slots * r_max * J, in] and B [slots * r_max * J,
    out], rank row `(s * r_max + r) * J + j` holding rank `r` of member `j` in slot `s`; B is
    zero outside member `j`'s columns. A slot range is then one contiguous block of both.
    """

    def __init__(self, targets: dict[str, tuple[int, int]], num_slots: int, max_rank: int,
                 dtype: torch.dtype, device: torch.device | str,
                 products: Sequence[Sequence[tuple[str, int]]] = ()) -> None:
        if num_slots < 2:
            raise ValueError("need at least one adapter slot besides slot 0")
        self.targets = dict(targets)
        self.groups = {g.key: g for g in lora_groups(self.targets, products)}
        self._group_of = {m: (g, j) for g in self.groups.values() for j, m in enumerate(g.members)}
        self.num_slots, self.max_rank = num_slots, max_rank
        self.dtype, self.device = dtype, torch.device(device)
        rows = num_slots * max_rank
        self.a = {k: torch.zeros(rows * g.width, g.in_features, dtype=dtype, device=device)
                  for k, g in self.groups.items()}
        self.b = {k: torch.zeros(rows * g.width, g.out_features, dtype=dtype, device=device)
                  for k, g in self.groups.items()}
        # per width J, row s: the scaling of slot s on its rank rows, 0 elsewhere; row 0 (no adapter) is all 0
        self.tables = {w: torch.zeros(num_slots, rows * w, dtype=dtype, device=device)
                       for w in sorted({g.width for g in self.groups.values()})}
        self._owner: dict[int, str] = {}  # slot -> adapter key
        self._rank: dict[int, int] = {}  # slot -> the version's rank (host copy)
        self._scale: dict[int, float] = {}  # slot -> its scaling (host copy)
        self._views: dict[tuple[int, int], dict[str, tuple[torch.Tensor, torch.Tensor]]] = {}
        self._slot_of: dict[str, int] = {}
        self.riding: set[str] = set()  # groups whose A sits below their product's weight (`ride`)
        self._lock = threading.Lock()

    def ride(self, key: str, rows: torch.Tensor) -> None:
        """Keep group `key`'s A in `rows` ([slots * r_max * width, in], the room a bf16
        product made below its weight) instead of its own stack; before any version loads."""
        assert not self._owner, "ride() after a version was loaded"
        if rows.shape != self.a[key].shape:
            raise ValueError(f"room for {tuple(rows.shape)} rows, the LoRA stack of {key} is {tuple(self.a[key].shape)}")
        self.a[key] = rows
        self.riding.add(key)
        self._views.clear()

    @property
    def slot_bytes(self) -> int:
        per_slot = sum(self.a[k].element_size() * g.in_features * g.width
                       + self.b[k].element_size() * g.out_features * g.width for k, g in self.groups.items())
        return per_slot * self.max_rank

    def slot_of(self, key: str) -> int:
        return self._slot_of[key]

    def free_slots(self) -> int:
        with self._lock:
            return self.num_slots - 1 - len(self._owner)

    # ---- loading (loader thread) -------------------------------------------------------
    def check(self, config: dict[str, Any], modules: frozenset[str], where: str) -> None:
        """Refuse, with the setting to change, what the preallocated stacks cannot hold."""
        features = unsupported_features(config)
        if features:
            raise AdapterIncompatible(
                f"{where} uses {', '.join(features)}, which the batched serving path does not support; "
                "retrain it without them (plain LoRA on linear layers)"
            )
        r = int(config["r"])
        if r > self.max_rank:
            raise AdapterIncompatible(f"{where} has rank {r}, above the served rank {self.max_rank} "
                                      "(MAX_LORA_RANK, empty = LORA_R); raise MAX_LORA_RANK")
        outside = sorted(m for m in modules if m not in self.targets)
        if outside:
            raise AdapterIncompatible(
                f"{where} targets {outside[0]!r}"
                + (f" and {len(outside) - 1} more modules" if len(outside) > 1 else "")
                + " outside the served LoRA modules; set LORA_TARGET_MODULES to include them"
            )

    def _slot_block(self, key: str, slot: int) -> tuple[torch.Tensor, torch.Tensor]:
        """A and B of `slot` in group `key` as [r_max, width, in] and [r_max, width, out] views."""
        g, R = self.groups[key], self.max_rank
        lo, hi = slot * R * g.width, (slot + 1) * R * g.width
        return (self.a[key][lo:hi].view(R, g.width, g.in_features),
                self.b[key][lo:hi].view(R, g.width, g.out_features))

    def load(self, key: str, path: Any, weights: Any, modules: frozenset[str], where: str) -> int:
        """Copy one version into a free slot and publish its scaling; returns the slot.

        `weights`: the safetensors file, or its tensors by name (already read)."""
        from safetensors.torch import load_file

        config = json.loads((path / CONFIG_FILE).read_text(encoding="utf-8"))
        self.check(config, modules, where)
        r, scaling = int(config["r"]), lora_scaling(config)
        with self._lock:
            if key in self._slot_of:
                return self._slot_of[key]
            free = [s for s in range(1, self.num_slots) if s not in self._owner]
            if not free:
                raise AdapterInvalid(
                    f"{where}: all {self.num_slots - 1} LoRA slots are in use by adapters still answering; "
                    "try again when they finish, or raise MAX_RESIDENT_ADAPTERS"
                )
            slot = free[0]
            self._owner[slot] = key  # reserved: nobody else writes it
        try:
            for group in self.groups:  # ranks above r and members this version does not target stay 0
                a4, b4 = self._slot_block(group, slot)
                a4.zero_()
                b4.zero_()
            tensors = weights if isinstance(weights, Mapping) else load_file(str(weights))
            for module in sorted(modules):
                g, j = self._group_of[module]
                lo, hi = g.columns[j]
                a4, b4 = self._slot_block(g.key, slot)
                a4[:r, j].copy_(tensors[f"{PEFT_KEY_PREFIX}{module}.lora_A.weight"])  # [r, in]
                b4[:r, j, lo:hi].copy_(tensors[f"{PEFT_KEY_PREFIX}{module}.lora_B.weight"].T)  # [out, r]
            R = self.max_rank
            # the table rows are the switch: until they are written the slot contributes nothing
            for width, table in self.tables.items():
                row = torch.zeros(table.shape[1], dtype=self.dtype)
                row[slot * R * width:(slot * R + r) * width] = scaling
                table[slot].copy_(row)
            if self.device.type == "cuda":
                torch.cuda.current_stream(self.device).synchronize()  # on the device before publishing
        except Exception:
            with self._lock:
                self._owner.pop(slot, None)
            raise
        with self._lock:
            self._rank[slot], self._scale[slot] = r, scaling
            self._slot_of[key] = slot
        return slot

    def free(self, key: str) -> bool:
        """Release a version's slot (its last row has finished); True if it had one."""
        with self._lock:
            slot = self._slot_of.pop(key, None)
            if slot is None:
                return False
            for table in self.tables.values():
                table[slot].zero_()
            self._owner.pop(slot, None)
            return True

    # ---- per forward (model thread) ---------------------------------------------------
    def views(self, lo: int, hi: int) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """(A.T, B) of rank rows [lo, hi) (in slot * r_max + rank units) per group; views into
        the stacks, made once per range."""
        got = self._views.get((lo, hi))
        if got is None:
            got = {k: (self.a[k][lo * g.width:hi * g.width].T, self.b[k][lo * g.width:hi * g.width])
                   for k, g in self.groups.items()}
            self._views[(lo, hi)] = got
        return got

    def batch(self, slots: torch.Tensor, used: set[int] | None) -> LoraBatch | None:
        """Routing for rows with adapter slots `slots` (device tensor).

        `used` is the set of adapter slots the rows use, when the host knows it (eager
        steps): the range then covers only those slots, and a batch on one adapter needs no
        mask at all. None means "any" (CUDA graphs: the whole stack, static shapes). Returns
        None when no row uses an adapter, so a base-only batch costs nothing extra.
        """
        R = self.max_rank
        if used is None:
            lo, hi = R, self.num_slots * R
        else:
            adapters = {s for s in used if s}
            if not adapters:
                return None
            if len(adapters) == 1 and 0 not in used:  # one adapter: its real rank, a scalar scale
                (s,) = adapters
                lo, hi = s * R, s * R + self._rank.get(s, R)
                return LoraBatch(self.views(lo, hi), None, self._scale.get(s, 0.0), (lo, hi))
            lo, hi = min(adapters) * R, (max(adapters) + 1) * R
        return LoraBatch(self.views(lo, hi),
                         {w: t[:, lo * w:hi * w].index_select(0, slots) for w, t in self.tables.items()},
                         span=(lo, hi))

    def apply(self, key: str, x: torch.Tensor, product: "FusedLinear", batch: LoraBatch) -> torch.Tensor:
        """`product(x)` plus the LoRA delta of every row at once: [rows, the product's out].

        `key`: a group's key (a fused product's, or a lone module's path); x [rows, in]
        (2-D); `product`: the group's product (a `FusedLinear`), which for a riding group
        also returns the shrink (`FusedLinear.with_rows`)."""
        view = batch.views.get(key)
        if view is None:
            return product(x)
        a_t, b = view
        g = self.groups[key]
        mask = None if batch.masks is None else batch.masks[g.width]
        if key in self.riding:  # the shrink comes out of the product: columns [out + lo, out + hi) in rank rows
            lo, hi = batch.span
            out, h = product.with_rows(x, hi * g.width, lo * g.width)
            if mask is not None:
                h.mul_(mask)
            return out.addmm_(h, b, alpha=batch.alpha)
        out = product(x)
        if x.dtype != a_t.dtype or out.dtype != a_t.dtype:  # a module computing in another dtype
            h = torch.mm(x.to(a_t.dtype), a_t)
            if mask is not None:
                h.mul_(mask)
            return out.add_(torch.mm(h, b).mul_(batch.alpha).to(out.dtype))
        h = torch.mm(x, a_t)
        if mask is not None:
            h.mul_(mask)
        return out.addmm_(h, b, alpha=batch.alpha)
