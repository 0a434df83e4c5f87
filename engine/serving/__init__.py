"""The serving path: one model thread admits, prefills and decodes every user's request.

`scheduler` is the policy on plain data (queue, admission, chunked prefill, cancel, adapter
leases); `runner` (`FastRuntime`) owns every device tensor and does one step at a time: add
and remove rows, prefill, decode to token ids. Below it: the Llama-family forward (`llama`),
fused products (`fused`, `fused_4bit`), stacked LoRA slots (`lora`), the slot KV cache and
the prefix cache, the batched sampler and, on CUDA, the decode step's graphs (`graphs`).
`threads` sizes the CPU's OpenMP team. The serial oracle the tests compare against is
`engine.reference`.
"""
