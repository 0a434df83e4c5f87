"""Adapters: the folder of versions on disk (`store`: atomic versions, `current`, history, the
catalog every backend lists) and the local engine's registry of resident versions
(`registry`: validation against the base model, loading into LoRA slots, leases, holds)."""
