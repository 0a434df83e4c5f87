"""The stream writer thread: token ids to text, and text to the streams, off the model thread.

A step's only device-to-host copy is its new token ids; detokenizing them (a tokenizer call per
row) and waking each stream's event loop would otherwise sit on the forward's critical path.
"""
from __future__ import annotations

import logging
import queue
import threading
import time
from typing import Any, Protocol

from engine.metrics import EngineMetrics
from engine.requests import Request, StreamEnd
from engine.stream import IncrementalDecoder

log = logging.getLogger(__name__)


class WrittenRow(Protocol):
    """What the writer reads and keeps of a scheduler row (engine.serving.scheduler.SlotRow)."""

    req: Request
    generated: int
    decoder: Any  # its IncrementalDecoder, made at its first token
    text: list[str]


class StreamWriter(threading.Thread):
    """Turns each step's token ids into text and hands it to the streams (off the model thread)."""

    def __init__(self, tokenizer: Any, metrics: EngineMetrics) -> None:
        super().__init__(name="stream-writer", daemon=True)
        self.tokenizer, self.metrics = tokenizer, metrics
        self._q: queue.SimpleQueue[list[tuple[WrittenRow, int | None, str | None, Exception | None]] | None] = (
            queue.SimpleQueue())

    def put(self, batch: list[tuple[WrittenRow, int | None, str | None, Exception | None]]) -> None:
        if batch:
            self._q.put(batch)

    def close(self) -> None:
        self._q.put(None)
        if self.is_alive():
            self.join(timeout=10)

    def run(self) -> None:
        while True:
            batch = self._q.get()
            if batch is None:
                return
            for row, token, reason, error in batch:
                try:
                    if token is not None:
                        self._push(row, token)
                    if reason is not None:
                        self._end(row, reason, error)
                except Exception:  # one stream's failure must not stop the others
                    log.exception("stream writer failed for a row")

    def _push(self, row: WrittenRow, token: int) -> None:
        if row.decoder is None:
            row.decoder = IncrementalDecoder(self.tokenizer)
        piece = row.decoder.push(token)
        if piece:
            res = row.req.result
            if res.time_to_first_token_s is None:
                res.time_to_first_token_s = time.monotonic() - row.req.submitted
                self.metrics.ttft.observe(res.time_to_first_token_s)
            row.text.append(piece)
            row.req.emit(piece)

    def _end(self, row: WrittenRow, reason: str, error: Exception | None) -> None:
        res = row.req.result
        res.text = "".join(row.text)
        res.completion_tokens = row.generated
        res.finish_reason = reason  # type: ignore[assignment]
        res.duration_s = time.monotonic() - row.req.submitted
        decode_s = res.duration_s - res.queue_wait_s
        if row.generated > 1 and decode_s > 0:
            self.metrics.tokens_per_second.observe(row.generated / decode_s)
        row.req.emit(error if error is not None else StreamEnd())
