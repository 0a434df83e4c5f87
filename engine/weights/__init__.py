"""Weight formats of the base model's linear layers that are ours (bitsandbytes brings nf4 and
int8): 16-bit weights for a CPU, kept once and multiplied in fp32 (`fp16_weights` in fbgemm's
packed layout, `bf16_weights` for oneDNN on CPUs with AMX)."""
