"""Our forward pass for the Llama family, over the loaded model's own modules.

`transformers` stays the loader and the reference: the embedding, the norms, the rotary
embedding, the output head and every linear layer (bitsandbytes `Linear4bit`/`Linear8bitLt`
or plain `nn.Linear`) are the loaded model's modules, called as they are, so quantization and
memory do not change. What is ours is the glue that serving needs and `generate` does not
have: a slot KV cache written in place, per-row positions and valid lengths, batched
multi-LoRA on every target linear, and static shapes for CUDA graphs.

Covered: `LlamaForCausalLM` (SmolLM2, Llama 2/3), `MistralForCausalLM` and
`Qwen2ForCausalLM` (its q/k/v biases live in the modules). Other architectures keep the
reference path (`SERVING_RUNTIME=reference`).
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from engine.serving.fused import FusedLinear
from engine.serving.kv_cache import SlotKVCache
from engine.serving.lora import LoraBatch, LoraSlots, product_key

log = logging.getLogger(__name__)

#: config.model_type -> the runner that serves it (a registry, not an if chain).
ARCHITECTURES: dict[str, type["LlamaRunner"]] = {}


def register(*model_types: str):
    def deco(cls: type["LlamaRunner"]) -> type["LlamaRunner"]:
        for name in model_types:
            ARCHITECTURES[name] = cls
        return cls
    return deco


def unsupported_reason(model: Any, context: int) -> str | None:
    """Why the fast path cannot serve this model (None when it can)."""
    cfg = model.config
    if cfg.model_type not in ARCHITECTURES:
        return f"architecture {cfg.model_type!r} is not one of {sorted(ARCHITECTURES)}"
    window = getattr(cfg, "sliding_window", None)
    if window and getattr(cfg, "use_sliding_window", True) and window < context:
        return f"sliding-window attention ({window} tokens) is shorter than CONTEXT_TOKENS={context}"
    rope = getattr(cfg, "rope_parameters", None) or getattr(cfg, "rope_scaling", None) or {}
    if isinstance(rope, dict) and rope.get("rope_type", rope.get("type")) in ("dynamic", "longrope"):
        return f"rope type {rope.get('rope_type')!r} changes with the sequence length"
    return None


def _fast_norm(module: Any) -> Any:
    """An RMSNorm module as one fused `F.rms_norm` call over its own weight (8 ops -> 1)."""
    weight, eps = getattr(module, "weight", None), getattr(module, "variance_epsilon", None)
    if not isinstance(weight, torch.Tensor) or not isinstance(eps, float) or "RMSNorm" not in type(module).__name__:
        return module

    def norm(x: torch.Tensor) -> torch.Tensor:
        return F.rms_norm(x, (x.shape[-1],), weight, eps)
    return norm


#: Rows of the output head's weight per block of the CPU's chunked head (see `_logits`).
HEAD_BLOCK = 1024


@dataclass(frozen=True)
class Packing:
    """How a prefill's packed tokens [M] map onto the padded [N, T] layout attention reads.

    Linear layers, norms and the cache writes run on the packed tokens only, so a batch that
    mixes a 500-token prompt with short ones computes no padding; only attention, which is
    per row, sees the padded layout.
    """

    pad: torch.Tensor  # [N*T]: for each padded place, the packed token it shows (padding: token 0)
    unpad: torch.Tensor  # [M]: for each packed token, its place in the padded [N*T] layout
    last: torch.Tensor  # [N]: the packed index of each row's last token (its logits are returned)


@dataclass
class _Layer:
    attn_norm: Any
    mlp_norm: Any
    qkv: FusedLinear  # q, k and v as one product: [rows, (heads + 2 kv_heads) * head_dim]
    o: FusedLinear  # a product of one module
    gate_up: FusedLinear  # gate and up as one product: [rows, 2 * intermediate]
    down: FusedLinear
    act: Any
    keys: dict[str, str]  # "qkv", "o", "gate_up", "down" -> the LoRA group key (see `lora.product_key`)


#: Module paths inside a decoder layer of each product the runner computes, in column order.
PRODUCTS = {
    "qkv": ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
    "o": ("self_attn.o_proj",),
    "gate_up": ("mlp.gate_proj", "mlp.up_proj"),
    "down": ("mlp.down_proj",),
}


@register("llama", "mistral", "qwen2")
class LlamaRunner:
    def __init__(self, model: Any, cache: SlotKVCache, lora: LoraSlots | None) -> None:
        cfg = model.config
        self.model, self.cache, self.lora = model, cache, lora
        self.heads = cfg.num_attention_heads
        self.kv_heads = getattr(cfg, "num_key_value_heads", None) or self.heads
        self.head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // self.heads
        self.groups = self.heads // self.kv_heads
        self.scale = self.head_dim ** -0.5
        inner = model.model
        self.embed, self.head, self.rotary = inner.embed_tokens, model.lm_head, inner.rotary_emb
        self.norm = _fast_norm(inner.norm)
        self.layers = []
        for i, layer in enumerate(inner.layers):
            att, mlp = layer.self_attn, layer.mlp
            self.layers.append(_Layer(
                _fast_norm(layer.input_layernorm), _fast_norm(layer.post_attention_layernorm),
                FusedLinear([att.q_proj, att.k_proj, att.v_proj]), FusedLinear([att.o_proj]),
                FusedLinear([mlp.gate_proj, mlp.up_proj]), FusedLinear([mlp.down_proj]),
                mlp.act_fn, {name: product_key([f"model.layers.{i}.{p}" for p in paths])
                             for name, paths in PRODUCTS.items()},
            ))
        kinds = sorted({L.qkv.kind for L in self.layers} | {L.gate_up.kind for L in self.layers})
        log.info("q/k/v and gate/up run as one product each (%s)", ", ".join(kinds))
        if lora is not None:
            riding = self._make_room_for_lora(lora)
            if riding:
                log.info("LoRA A matrices ride below %d of %d bf16 product weights (one kernel for product and shrink)",
                         riding, len(lora.groups))
        self.device = self.embed.weight.device
        self.kv_dtype = cache.k[0].dtype  # attention runs in it (KV_CACHE_DTYPE); may differ from the activations'
        from torch.nn.attention import SDPBackend

        # chosen, not left to heuristics that change with the cache length: a masked decode
        # query is memory-efficient attention's case on CUDA (flash takes no mask), and the
        # CPU's flash kernel takes masks; math is the fallback for shapes neither takes
        self.sdpa_backends = (
            [SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH] if self.device.type == "cuda"
            else [SDPBackend.FLASH_ATTENTION, SDPBackend.MATH]
        )

    @staticmethod
    def cache_shape(model: Any) -> tuple[int, int, int]:
        """(layers, kv_heads, head_dim) for sizing the KV cache."""
        cfg = model.config
        heads = cfg.num_attention_heads
        kv = getattr(cfg, "num_key_value_heads", None) or heads
        return cfg.num_hidden_layers, kv, getattr(cfg, "head_dim", None) or cfg.hidden_size // heads

    @staticmethod
    def products(model: Any) -> list[list[tuple[str, int]]]:
        """The fused products' members, (module path, out_features) in column order, for
        grouping the LoRA stacks the way the forward computes them."""
        out = []
        for i, layer in enumerate(model.model.layers):
            for name in ("qkv", "gate_up"):
                out.append([(f"model.layers.{i}.{p}", int(layer.get_submodule(p).out_features))
                            for p in PRODUCTS[name]])
        return out

    def _make_room_for_lora(self, lora: LoraSlots) -> int:
        """Put each LoRA group's A below its product's weight where the product can carry
        it (one bf16 weight, see `FusedLinear.make_room`); returns how many do."""
        for L in self.layers:
            for name in PRODUCTS:
                key = L.keys[name]
                if key in lora.groups:
                    rows = getattr(L, name).make_room(lora.a[key].shape[0])
                    if rows is not None:
                        lora.ride(key, rows)
        return len(lora.riding)

    def _linear(self, product: FusedLinear, key: str, x2: torch.Tensor, lora: LoraBatch | None) -> torch.Tensor:
        """A product plus the LoRA delta of its group."""
        if lora is None:
            return product(x2)
        return self.lora.apply(key, x2, product, lora)

    def forward(self, *args: Any, **kwargs: Any) -> torch.Tensor:
        """Logits [N, vocab], one row per sequence; writes every token's K/V into the cache."""
        from torch.nn.attention import sdpa_kernel

        with torch.inference_mode(), sdpa_kernel(self.sdpa_backends):
            return self._forward(*args, **kwargs)

    def _forward(
        self,
        tokens: torch.Tensor,  # [M]: the tokens of every row, packed (no padding)
        positions: torch.Tensor,  # [M]: the position of each token
        write_rows: torch.Tensor,  # [M]: the cache slot each token's K/V goes to
        write_pos: torch.Tensor,  # [M]: the position it goes to (idle decode rows: the scratch column)
        read_rows: slice | torch.Tensor,  # the cache slots of the N rows, in order
        key_len: int,  # keys [0, key_len) are read
        mask: torch.Tensor,  # [N, 1, T, key_len] bool: True = attend
        lora: LoraBatch | None,  # LoRA routing per token
        packing: Packing | None = None,  # prefill: how the packed tokens map onto [N, T]; None: decode, T == 1
    ) -> torch.Tensor:
        n, t = mask.shape[0], mask.shape[2]
        m = tokens.shape[0]
        h = self.embed(tokens)  # [M, hidden]
        cos, sin = self.rotary(h, positions.view(1, m))  # [1, M, head_dim], both halves alike
        cos, sin = cos.view(m, 1, -1), sin.view(m, 1, -1)
        half = self.head_dim // 2
        # rotate_half(x) * sin == swap_halves(x) * sin_signed, exactly (a sign flip rounds alike)
        sin = torch.cat((-sin[..., :half], sin[..., half:]), dim=-1)
        # an additive mask, made once per forward (SDPA would convert a boolean one in every layer)
        bias = torch.zeros(mask.shape, dtype=self.kv_dtype, device=h.device).masked_fill_(~mask, float("-inf"))
        cast = self.kv_dtype != h.dtype  # a bf16 cache under fp32 activations: q/k/v in, the output back
        # GQA without copying keys: the query heads that share a KV head become its query
        # length, so any SDPA backend can run it and the cache is read once.
        gmask = bias if self.groups == 1 else bias.unsqueeze(2).expand(n, 1, self.groups, t, key_len).reshape(
            n, 1, self.groups * t, key_len)
        for li, L in enumerate(self.layers):
            x = L.attn_norm(h)
            qkv = self._linear(L.qkv, L.keys["qkv"], x, lora).view(m, self.heads + 2 * self.kv_heads, self.head_dim)
            qk = qkv[:, :self.heads + self.kv_heads]  # RoPE on queries and keys at once: 5 kernels instead of 10
            qk = qk * cos + torch.cat((qk[..., half:], qk[..., :half]), dim=-1) * sin
            q, k, v = qk[:, :self.heads], qk[:, self.heads:], qkv[:, self.heads + self.kv_heads:]
            if cast:
                q, k, v = q.to(self.kv_dtype), k.to(self.kv_dtype), v.to(self.kv_dtype)
            kc, vc = self.cache.k[li], self.cache.v[li]
            kc[write_rows, :, write_pos] = k
            vc[write_rows, :, write_pos] = v
            keys, values = kc[read_rows, :, :key_len], vc[read_rows, :, :key_len]
            if packing is None:  # one token per row: the packed layout is the padded one
                qg = q.view(n, self.kv_heads, self.groups, self.head_dim)
            else:
                qg = q.reshape(m, -1).index_select(0, packing.pad).view(
                    n, t, self.kv_heads, self.groups, self.head_dim).permute(0, 2, 3, 1, 4).reshape(
                    n, self.kv_heads, self.groups * t, self.head_dim)
            att = F.scaled_dot_product_attention(qg, keys, values, attn_mask=gmask, scale=self.scale)
            if packing is None:
                att = att.reshape(m, -1)
            else:
                att = att.view(n, self.kv_heads, self.groups, t, self.head_dim).permute(0, 3, 1, 2, 4).reshape(
                    n * t, -1).index_select(0, packing.unpad)
            if cast:
                att = att.to(h.dtype)
            h = h + self._linear(L.o, L.keys["o"], att, lora)
            x = L.mlp_norm(h)
            gate_up = self._linear(L.gate_up, L.keys["gate_up"], x, lora)
            gate, up = gate_up[:, :L.gate_up.sizes[0]], gate_up[:, L.gate_up.sizes[0]:]
            h = h + self._linear(L.down, L.keys["down"], L.act(gate) * up, lora)
        if packing is not None:
            h = h.index_select(0, packing.last)
        return self._logits(self.norm(h))

    def _logits(self, x: torch.Tensor) -> torch.Tensor:
        """The output head in fp32. On the CPU a plain head is split into row blocks of its
        weight: the same numbers, faster, because MKL's blocking for one very wide product (the
        vocabulary's rows) is poor."""
        head = self.head
        if (x.device.type != "cpu" or x.shape[0] < 2 or type(head) is not torch.nn.Linear or head.bias is not None
                or head.out_features <= HEAD_BLOCK):
            return head(x).float()
        w = head.weight
        out = torch.empty(x.shape[0], w.shape[0], dtype=x.dtype, device=x.device)
        for lo in range(0, w.shape[0], HEAD_BLOCK):
            block = w[lo:lo + HEAD_BLOCK]
            out[:, lo:lo + block.shape[0]] = F.linear(x, block)
        return out.float()
