"""The stream a caller iterates: text pieces as they come (`GenerationStream`), and the token ids
turned into text, a character only when it is whole (`IncrementalDecoder`).
"""
from __future__ import annotations

import asyncio
from typing import Any, Awaitable, Callable, Self, Sequence

from engine.types import GenerationParams, GenerationResult, Message, Mode, UserContext

#: How a stream hands its request to its engine (`Engine.submit`): the messages, mode, params,
#: user, the result to fill and the queue its pieces and its end arrive on; returns the request.
Submit = Callable[[Sequence[Message], Mode, GenerationParams, "UserContext | None", GenerationResult,
                   "asyncio.Queue[object]"], Awaitable[Any]]


class IncrementalDecoder:
    """Token ids -> text deltas, holding back bytes of a character not yet complete."""

    def __init__(self, tokenizer: Any) -> None:
        self.tokenizer = tokenizer
        self.ids: list[int] = []
        self.prefix_offset = 0
        self.read_offset = 0

    def push(self, token_id: int) -> str:
        self.ids.append(token_id)
        decode = self.tokenizer.decode
        prefix = decode(self.ids[self.prefix_offset:self.read_offset], skip_special_tokens=True)
        full = decode(self.ids[self.prefix_offset:], skip_special_tokens=True)
        if len(full) > len(prefix) and not full.endswith("\ufffd"):
            self.prefix_offset, self.read_offset = self.read_offset, len(self.ids)
            return full[len(prefix):]
        return ""


class StreamProtocols:
    """`async for` and `async with` over a stream: leaving the block closes it (`aclose`)."""

    def __aiter__(self) -> Self:
        return self

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        raise NotImplementedError


class GenerationStream(StreamProtocols):
    """The local engine's TextStream (engine/face.py): submitted on the first `__anext__`;
    leaving early frees the batch row at the next step."""

    def __init__(self, submit: Submit, messages: Sequence[Message], mode: Mode,
                 params: GenerationParams, user: UserContext | None) -> None:
        self._submit, self._messages, self._mode, self._params, self._user = submit, messages, mode, params, user
        self._queue: asyncio.Queue[object] | None = None
        self._request: Any = None
        self._done = False
        self.result = GenerationResult(adapter=mode.adapter, role=mode.role)

    async def __anext__(self) -> str:
        from engine.requests import StreamEnd

        if self._done:
            raise StopAsyncIteration
        if self._queue is None:
            self._queue = asyncio.Queue()
            try:
                self._request = await self._submit(self._messages, self._mode, self._params, self._user, self.result,
                                                  self._queue)
            except BaseException:
                self._done = True
                self.result.finish_reason = self.result.finish_reason or "error"
                raise
            if self._done:  # cancelled while the prompt was being prepared
                self._request.cancelled.set()
                raise StopAsyncIteration
        try:
            item = await self._queue.get()
        except asyncio.CancelledError:
            self.cancel()
            raise
        if isinstance(item, str):
            return item
        self._done = True
        if isinstance(item, BaseException):
            self.result.finish_reason = self.result.finish_reason or "error"
            raise item
        assert isinstance(item, StreamEnd)
        raise StopAsyncIteration

    def cancel(self) -> None:
        if self._request is not None:
            self._request.cancelled.set()
        self._done = True
        if self.result.finish_reason is None:
            self.result.finish_reason = "cancelled"

    async def aclose(self) -> None:
        if not self._done:
            self.cancel()
