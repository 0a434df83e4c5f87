"""A fake Telegram Bot API server over real HTTP (aiohttp on 127.0.0.1, a random port).

The bot under test talks to it exactly as to api.telegram.org (aiogram's
`TelegramAPIServer.from_base(url)`), so tests exercise the real HTTP path: form encoding,
long polling, error answers. The server keeps the state a user would see (each chat's
messages with their current text, entities and buttons, every edit), records every call,
lets a test inject updates (messages, commands, callback presses, photos, stickers...) and
script failures: 429 with `parameters.retry_after`, 5xx, a 400 "can't parse entities", or
409 Conflict.

It checks what real Telegram checks and a careless bot trips over: empty or over-long
text, entity offsets outside the text, and "message is not modified" on an edit that
changes nothing. Like real Telegram, a getUpdates call ends the one already waiting with
409 Conflict, so two bots polling one token both see it.

`go_down()` takes the server off the network (new connections are refused, open ones are
cut, as when a data centre or the route to it fails) and `come_back()` listens again on the
same port with everything it held: the bot under test meets a real outage.
"""
from __future__ import annotations

import asyncio
import json
import time
from dataclasses import dataclass, field
from typing import Any, Callable

import aiohttp
from aiohttp import web

BOT_ID = 4242
BOT_USERNAME = "fake_llm_bot"
#: Telegram's words when a second getUpdates call ends the first (two bots on one token).
CONFLICT = "Conflict: terminated by other getUpdates request; make sure that only one bot instance is running"

_INT_PARAMS = {
    "chat_id", "message_id", "offset", "limit", "timeout", "reply_to_message_id", "message_thread_id",
    "cache_time", "max_connections", "user_id", "from_chat_id",
}
_JSON_PARAMS = {
    "reply_markup", "entities", "allowed_updates", "reply_parameters", "link_preview_options", "commands",
    "scope", "caption_entities", "reaction",
}
_BOOL_PARAMS = {"show_alert", "disable_notification", "drop_pending_updates", "protect_content"}


def utf16_len(text: str) -> int:
    return len(text.encode("utf-16-le")) // 2


@dataclass
class Call:
    method: str
    params: dict[str, Any]
    status: int
    at: float


@dataclass
class ChatMessage:
    chat_id: int
    message_id: int
    text: str
    from_bot: bool
    entities: list[dict[str, Any]] | None = None
    reply_markup: dict[str, Any] | None = None
    reply_to: int | None = None
    edits: list[str] = field(default_factory=list)  # text after each successful edit
    photo: bytes | None = None  # the file of a photo the bot sent (its caption is `text`)

    @property
    def buttons(self) -> list[dict[str, Any]]:
        rows = (self.reply_markup or {}).get("inline_keyboard", [])
        return [b for row in rows for b in row]


@dataclass
class Failure:
    method: str
    status: int
    description: str
    times: int
    retry_after: int | None = None
    when: Callable[[dict[str, Any]], bool] | None = None


class FakeTelegram:
    """See the module docstring. Use as `async with FakeTelegram() as tg:` or start()/stop()."""

    def __init__(self, *, poll_cap_s: float = 1.0) -> None:
        self.poll_cap_s = poll_cap_s  # longest a getUpdates call is held open
        self.calls: list[Call] = []
        self.messages: dict[tuple[int, int], ChatMessage] = {}
        self.updates: list[dict[str, Any]] = []
        self.failures: list[Failure] = []
        self.webhook: dict[str, Any] | None = None
        self.commands: list[dict[str, Any]] | None = None
        self.callback_answers: dict[str, dict[str, Any]] = {}
        self.not_modified = 0  # edits refused because nothing changed (a bot should avoid them)
        self.url = ""
        self._update_id = 100
        self._next_message_id: dict[int, int] = {}
        self._changed = asyncio.Condition()
        self._runner: web.AppRunner | None = None
        self._site: web.TCPSite | None = None
        self._port = 0
        self._stopping = False
        self._polls: dict[str, asyncio.Event] = {}  # token -> the waiting getUpdates call's "conflict" flag
        self.down = False
        self.refused = 0  # requests cut off during outages

    # ---- lifecycle ------------------------------------------------------------------

    async def start(self, port: int = 0) -> str:
        """Listen on `port` (0: any free one); returns the base URL for BOT_API_URL."""
        app = web.Application()
        app.router.add_route("*", "/bot{token}/{method}", self._handle)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        await self._listen(port)
        self.url = f"http://127.0.0.1:{self._port}"
        return self.url

    async def _listen(self, port: int) -> None:
        self._site = web.TCPSite(self._runner, "127.0.0.1", port, reuse_address=True)  # type: ignore[arg-type]
        await self._site.start()
        self._port = self._site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]

    async def go_down(self) -> None:
        """Off the network: connections are refused and open ones cut until `come_back()`."""
        self.down = True
        if self._site is not None:
            await self._site.stop()
            self._site = None
        assert self._runner is not None and self._runner.server is not None
        for handler in self._runner.server.connections:
            handler.force_close()
        await self._notify()

    async def come_back(self) -> None:
        """Listen again on the same port; chats, messages and queued updates are as they were."""
        self.down = False
        await self._listen(self._port)
        await self._notify()

    async def outage(self, seconds: float) -> None:
        """go_down(), wait `seconds`, come_back()."""
        await self.go_down()
        await asyncio.sleep(seconds)
        await self.come_back()

    async def stop(self) -> None:
        self._stopping = True
        await self._notify()
        if self._runner is not None:
            await self._runner.cleanup()

    async def __aenter__(self) -> "FakeTelegram":
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    # ---- scripting --------------------------------------------------------------------

    def fail(
        self, method: str, status: int = 429, *, times: int = 1, retry_after: int | None = None,
        description: str | None = None, when: Callable[[dict[str, Any]], bool] | None = None,
    ) -> None:
        """The next `times` calls of `method` (matching `when`) fail with this answer."""
        if description is None:
            description = {
                429: f"Too Many Requests: retry after {retry_after or 1}",
                400: "Bad Request: can't parse entities: Can't find end of the entity starting at byte offset 3",
                409: CONFLICT,
                500: "Internal Server Error",
                502: "Bad Gateway",
            }.get(status, "Error")
        if status == 429 and retry_after is None:
            retry_after = 1
        self.failures.append(Failure(method, status, description, times, retry_after, when))

    # ---- injecting updates ----------------------------------------------------------

    def _user(self, user_id: int, first_name: str | None, language_code: str | None) -> dict[str, Any]:
        user = {"id": user_id, "is_bot": False, "first_name": first_name or f"User{user_id}"}
        if language_code:
            user["language_code"] = language_code
        return user

    def _chat(self, user_id: int, chat_id: int | None, chat_type: str, first_name: str | None) -> dict[str, Any]:
        if chat_type == "private":
            return {"id": user_id, "type": "private", "first_name": first_name or f"User{user_id}"}
        return {"id": chat_id if chat_id is not None else -1000 - user_id, "type": chat_type, "title": "Group"}

    def _push(self, payload: dict[str, Any]) -> dict[str, Any]:
        self._update_id += 1
        update = {"update_id": self._update_id, **payload}
        self.updates.append(update)
        asyncio.get_running_loop().create_task(self._notify())
        return update

    def _user_message(
        self, user_id: int, *, chat_id: int | None, chat_type: str, first_name: str | None,
        language_code: str | None, reply_to: int | None, **content: Any,
    ) -> dict[str, Any]:
        chat = self._chat(user_id, chat_id, chat_type, first_name)
        mid = self._new_message_id(chat["id"])
        msg: dict[str, Any] = {
            "message_id": mid, "date": int(time.time()), "chat": chat,
            "from": self._user(user_id, first_name, language_code), **content,
        }
        if reply_to is not None:
            replied = self.messages.get((chat["id"], reply_to))
            msg["reply_to_message"] = {
                "message_id": reply_to, "date": int(time.time()), "chat": chat,
                "from": self.bot_user if (replied is None or replied.from_bot) else self._user(user_id, None, None),
                "text": replied.text if replied else "",
            }
        self.messages[(chat["id"], mid)] = ChatMessage(chat["id"], mid, content.get("text", ""), False,
                                                       reply_to=reply_to)
        return msg

    def send_text(
        self, user_id: int, text: str, *, chat_id: int | None = None, chat_type: str = "private",
        first_name: str | None = None, language_code: str | None = "en", reply_to: int | None = None,
    ) -> dict[str, Any]:
        """A user writes `text` (commands included) to the bot; returns the update."""
        content: dict[str, Any] = {"text": text}
        entities = []
        if text.startswith("/"):
            entities.append({"type": "bot_command", "offset": 0, "length": utf16_len(text.split()[0])})
        mention = f"@{BOT_USERNAME}"
        if mention in text and not text.startswith("/"):
            entities.append({"type": "mention", "offset": utf16_len(text[: text.index(mention)]),
                             "length": len(mention)})
        if entities:
            content["entities"] = entities
        msg = self._user_message(user_id, chat_id=chat_id, chat_type=chat_type, first_name=first_name,
                                 language_code=language_code, reply_to=reply_to, **content)
        return self._push({"message": msg})

    def send_media(self, user_id: int, kind: str, *, chat_type: str = "private", chat_id: int | None = None,
                   language_code: str | None = "en", reply_to: int | None = None) -> dict[str, Any]:
        """A photo, voice, sticker, document, video or dice from a user."""
        file = {"file_id": f"{kind}-file", "file_unique_id": f"{kind}-u"}
        content: dict[str, Any] = {
            "photo": {"photo": [{**file, "width": 10, "height": 10}]},
            "voice": {"voice": {**file, "duration": 1}},
            "sticker": {"sticker": {**file, "type": "regular", "width": 512, "height": 512,
                                    "is_animated": False, "is_video": False}},
            "document": {"document": {**file, "file_name": "a.pdf"}},
            "video": {"video": {**file, "width": 10, "height": 10, "duration": 1}},
            "dice": {"dice": {"emoji": "🎲", "value": 3}},
        }[kind]
        msg = self._user_message(user_id, chat_id=chat_id, chat_type=chat_type, first_name=None,
                                 language_code=language_code, reply_to=reply_to, **content)
        return self._push({"message": msg})

    def press(self, user_id: int, message: ChatMessage, data: str, *, language_code: str | None = "en") -> str:
        """A user presses the inline button with callback `data` under `message`; returns the query id."""
        query_id = f"cq{self._update_id + 1}"
        chat = {"id": message.chat_id, "type": "private" if message.chat_id > 0 else "supergroup"}
        self._push({
            "callback_query": {
                "id": query_id, "from": self._user(user_id, None, language_code), "chat_instance": "ci",
                "data": data,
                "message": {"message_id": message.message_id, "date": int(time.time()), "chat": chat,
                            "from": self.bot_user, "text": message.text},
            }
        })
        return query_id

    def press_button(self, user_id: int, message: ChatMessage, text_contains: str, **kw: Any) -> str:
        for b in message.buttons:
            if text_contains in b["text"]:
                return self.press(user_id, message, b["callback_data"], **kw)
        raise AssertionError(f"no button with {text_contains!r} in {[b['text'] for b in message.buttons]}")

    # ---- views --------------------------------------------------------------------------

    @property
    def bot_user(self) -> dict[str, Any]:
        return {"id": BOT_ID, "is_bot": True, "first_name": "FakeBot", "username": BOT_USERNAME}

    def bot_messages(self, chat_id: int) -> list[ChatMessage]:
        return sorted((m for m in self.messages.values() if m.chat_id == chat_id and m.from_bot),
                      key=lambda m: m.message_id)

    def texts(self, chat_id: int) -> list[str]:
        return [m.text for m in self.bot_messages(chat_id)]

    def photos(self, chat_id: int) -> list[ChatMessage]:
        return [m for m in self.bot_messages(chat_id) if m.photo is not None]

    def calls_of(self, method: str, chat_id: int | None = None) -> list[Call]:
        return [c for c in self.calls if c.method == method and (chat_id is None or c.params.get("chat_id") == chat_id)]

    async def wait_for(self, predicate: Callable[[], Any], timeout: float = 20.0) -> Any:
        """Wait until `predicate()` is truthy (re-checked on every API call); fail after `timeout`."""
        async def _wait() -> Any:
            async with self._changed:
                while True:
                    value = predicate()
                    if value:
                        return value
                    await self._changed.wait()
        try:
            return await asyncio.wait_for(_wait(), timeout)
        except asyncio.TimeoutError:
            raise AssertionError(f"condition not met within {timeout}s; last calls: "
                                 f"{[(c.method, c.params.get('text', '')[:40]) for c in self.calls[-8:]]}") from None

    async def wait_for_text(self, chat_id: int, contains: str, timeout: float = 20.0) -> ChatMessage:
        return await self.wait_for(
            lambda: next((m for m in self.bot_messages(chat_id) if contains in m.text), None), timeout
        )

    async def wait_for_buttons(self, chat_id: int, contains: str, timeout: float = 20.0) -> ChatMessage:
        """A bot message with `contains` in its text and inline buttons (a finished answer)."""
        return await self.wait_for(
            lambda: next((m for m in self.bot_messages(chat_id) if contains in m.text and m.buttons), None), timeout
        )

    async def post_to_webhook(self, update: dict[str, Any], secret: str | None) -> int:
        """Deliver `update` the way Telegram does in webhook mode; returns the HTTP status."""
        assert self.webhook is not None, "the bot did not call setWebhook"
        headers = {"X-Telegram-Bot-Api-Secret-Token": secret} if secret else {}
        async with aiohttp.ClientSession() as s:
            async with s.post(self.webhook["url"], json=update, headers=headers) as r:
                return r.status

    # ---- the API ------------------------------------------------------------------------

    async def _notify(self) -> None:
        async with self._changed:
            self._changed.notify_all()

    def _new_message_id(self, chat_id: int) -> int:
        self._next_message_id[chat_id] = self._next_message_id.get(chat_id, 0) + 1
        return self._next_message_id[chat_id]

    @staticmethod
    def _decode(raw: dict[str, str]) -> dict[str, Any]:
        params: dict[str, Any] = {}
        for k, v in raw.items():
            if not isinstance(v, str):
                params[k] = v
            elif k in _INT_PARAMS and v.lstrip("-").isdigit():
                params[k] = int(v)
            elif k in _JSON_PARAMS:
                params[k] = json.loads(v)
            elif k in _BOOL_PARAMS:
                params[k] = v.lower() == "true"
            else:
                params[k] = v
        return params

    async def _handle(self, request: web.Request) -> web.Response:
        if self.down:  # a request already on its way when the route went: the connection is cut
            return self._cut(request)
        method = request.match_info["method"]
        if request.content_type == "application/json":
            raw = await request.json()
        else:
            raw = dict(await request.post())
        params = self._decode(raw)
        failure = self._take_failure(method, params)
        if failure is not None:
            status, body = failure.status, {"ok": False, "error_code": failure.status,
                                            "description": failure.description}
            if failure.retry_after is not None:
                body["parameters"] = {"retry_after": failure.retry_after}
        else:
            handler = getattr(self, f"_m_{method}", None)
            if handler is None:
                status, body = 404, {"ok": False, "error_code": 404, "description": "Not Found: method not found"}
            else:
                try:
                    if method == "getUpdates":
                        result = await self._m_getUpdates(params, request.match_info["token"])
                    else:
                        result = await handler(params)
                    status, body = 200, {"ok": True, "result": result}
                except _ApiError as exc:
                    status, body = exc.status, {"ok": False, "error_code": exc.status, "description": exc.description}
        if self.down:  # went down while this call waited: its answer never leaves
            return self._cut(request)
        if method != "getUpdates" or status != 200 or body.get("result"):
            self.calls.append(Call(method, params, status, time.monotonic()))
        await self._notify()
        return web.json_response(body, status=status)

    def _cut(self, request: web.Request) -> web.Response:
        self.refused += 1
        if request.transport is not None:
            request.transport.abort()
        return web.Response(status=502)  # written nowhere: the connection is gone

    def _take_failure(self, method: str, params: dict[str, Any]) -> Failure | None:
        for f in self.failures:
            if f.method == method and f.times > 0 and (f.when is None or f.when(params)):
                f.times -= 1
                return f
        return None

    @staticmethod
    def _check_text(text: str, entities: list[dict[str, Any]] | None) -> None:
        if not text or not text.strip():
            raise _ApiError(400, "Bad Request: message text is empty")
        if utf16_len(text) > 4096:
            raise _ApiError(400, "Bad Request: message is too long")
        n = utf16_len(text)
        for e in entities or []:
            if e.get("offset", -1) < 0 or e.get("length", 0) <= 0 or e["offset"] + e["length"] > n:
                raise _ApiError(400, f"Bad Request: can't parse entities: entity {e} is outside the text")

    def _message_json(self, m: ChatMessage) -> dict[str, Any]:
        chat = {"id": m.chat_id, "type": "private" if m.chat_id > 0 else "supergroup"}
        if m.chat_id > 0:
            chat["first_name"] = "User"
        else:
            chat["title"] = "Group"
        out: dict[str, Any] = {"message_id": m.message_id, "date": int(time.time()), "chat": chat,
                               "from": self.bot_user}
        if m.photo is not None:
            width, height = _image_size(m.photo)
            out["photo"] = [{"file_id": f"photo-{m.chat_id}-{m.message_id}", "file_unique_id": f"p{m.message_id}",
                             "width": width, "height": height, "file_size": len(m.photo)}]
            if m.text:
                out["caption"] = m.text
        else:
            out["text"] = m.text
        if m.entities:
            out["entities"] = m.entities
        if m.reply_markup:
            out["reply_markup"] = m.reply_markup
        return out

    async def _m_getMe(self, p: dict[str, Any]) -> Any:
        return {**self.bot_user, "can_join_groups": True, "can_read_all_group_messages": False,
                "supports_inline_queries": False}

    async def _m_getUpdates(self, p: dict[str, Any], token: str = "") -> Any:
        # the newer request wins, as with real Telegram: the one waiting ends with 409
        earlier = self._polls.get(token)
        if earlier is not None:
            earlier.set()
            await self._notify()
        mine = self._polls[token] = asyncio.Event()
        try:
            return await self._poll(p, mine)
        finally:
            if self._polls.get(token) is mine:
                del self._polls[token]

    async def _poll(self, p: dict[str, Any], conflict: asyncio.Event) -> Any:
        offset = int(p.get("offset", 0))
        if offset:
            self.updates = [u for u in self.updates if u["update_id"] >= offset]
        timeout = min(float(p.get("timeout", 0)), self.poll_cap_s)
        deadline = time.monotonic() + timeout
        async with self._changed:
            while not self._stopping and not self.down:
                if conflict.is_set():
                    raise _ApiError(409, CONFLICT)
                ready = [u for u in self.updates if u["update_id"] >= offset]
                if ready:
                    return ready[: int(p.get("limit", 100))]
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                try:
                    await asyncio.wait_for(self._changed.wait(), left)
                except asyncio.TimeoutError:
                    break
        return []

    async def _m_sendMessage(self, p: dict[str, Any]) -> Any:
        chat_id = p["chat_id"]
        self._check_text(p.get("text", ""), p.get("entities"))
        mid = self._new_message_id(chat_id)
        reply_to = p.get("reply_to_message_id") or (p.get("reply_parameters") or {}).get("message_id")
        m = ChatMessage(chat_id, mid, p["text"], True, p.get("entities"), p.get("reply_markup"), reply_to)
        self.messages[(chat_id, mid)] = m
        return self._message_json(m)

    async def _m_sendPhoto(self, p: dict[str, Any]) -> Any:
        """A photo uploaded as a file: checked as Telegram checks one (an image, its size and shape)."""
        chat_id = p["chat_id"]
        upload = p.get("photo")
        if isinstance(upload, str) and upload.startswith("attach://"):  # the file travels as its own part
            upload = p.get(upload.removeprefix("attach://"))
        if not hasattr(upload, "file"):
            raise _ApiError(400, "Bad Request: wrong file identifier/HTTP URL specified")
        data = upload.file.read()
        if len(data) > 10 * 2**20:
            raise _ApiError(400, "Bad Request: file is too big")
        try:
            width, height = _image_size(data)
        except ValueError:
            raise _ApiError(400, "Bad Request: IMAGE_PROCESS_FAILED") from None
        if width + height > 10000 or max(width, height) > 20 * min(width, height):
            raise _ApiError(400, "Bad Request: PHOTO_INVALID_DIMENSIONS")
        caption = p.get("caption") or ""
        if utf16_len(caption) > 1024:
            raise _ApiError(400, "Bad Request: message caption is too long")
        mid = self._new_message_id(chat_id)
        m = ChatMessage(chat_id, mid, caption, True, None, p.get("reply_markup"), photo=data)
        self.messages[(chat_id, mid)] = m
        return self._message_json(m)

    async def _m_editMessageText(self, p: dict[str, Any]) -> Any:
        m = self.messages.get((p.get("chat_id"), p.get("message_id")))
        if m is None or not m.from_bot:
            raise _ApiError(400, "Bad Request: message to edit not found")
        text, entities, markup = p.get("text", ""), p.get("entities"), p.get("reply_markup")
        self._check_text(text, entities)
        if text == m.text and (entities or None) == (m.entities or None) and markup == m.reply_markup:
            self.not_modified += 1
            raise _ApiError(400, "Bad Request: message is not modified: specified new message content and "
                                 "reply markup are exactly the same as a current content and reply markup "
                                 "of the message")
        m.text, m.entities, m.reply_markup = text, entities, markup
        m.edits.append(text)
        return self._message_json(m)

    async def _m_editMessageReplyMarkup(self, p: dict[str, Any]) -> Any:
        m = self.messages.get((p.get("chat_id"), p.get("message_id")))
        if m is None:
            raise _ApiError(400, "Bad Request: message to edit not found")
        m.reply_markup = p.get("reply_markup")
        return self._message_json(m)

    async def _m_deleteMessage(self, p: dict[str, Any]) -> Any:
        self.messages.pop((p.get("chat_id"), p.get("message_id")), None)
        return True

    async def _m_answerCallbackQuery(self, p: dict[str, Any]) -> Any:
        self.callback_answers[p["callback_query_id"]] = p
        return True

    async def _m_sendChatAction(self, p: dict[str, Any]) -> Any:
        return True

    async def _m_setMyCommands(self, p: dict[str, Any]) -> Any:
        self.commands = p.get("commands")
        return True

    async def _m_deleteWebhook(self, p: dict[str, Any]) -> Any:
        self.webhook = None
        return True

    async def _m_setWebhook(self, p: dict[str, Any]) -> Any:
        self.webhook = {"url": p["url"], "secret_token": p.get("secret_token")}
        return True

    async def _m_getWebhookInfo(self, p: dict[str, Any]) -> Any:
        return {"url": (self.webhook or {}).get("url", ""), "has_custom_certificate": False,
                "pending_update_count": 0}


def _image_size(data: bytes) -> tuple[int, int]:
    """(width, height) of an image file; ValueError when it is not one."""
    import io

    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(io.BytesIO(data)) as image:
            image.verify()
            return image.size
    except (UnidentifiedImageError, OSError, SyntaxError) as exc:
        raise ValueError(str(exc)) from exc


class _ApiError(Exception):
    def __init__(self, status: int, description: str) -> None:
        super().__init__(description)
        self.status = status
        self.description = description
