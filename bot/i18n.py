"""UI strings in English and Russian.

One dict per language; a key missing from a language falls back to English, so a new
string never shows a raw key. `t(lang, key, **values)` formats with str.format.
"""
from __future__ import annotations

LANGUAGES: dict[str, str] = {"en": "English", "ru": "Русский"}
DEFAULT_LANGUAGE = "en"

_EN: dict[str, str] = {
    "start": (
        "Hello{name}! I answer with one small language model that can switch expertise: "
        "a domain adapter (law, medicine, finance) and a role.\n\n"
        "Current mode: {mode}\n\n"
        "Just write your question. /mode changes the mode, /new starts a fresh conversation, "
        "/help lists everything."
    ),
    "help": (
        "Write a question and I answer it in the current mode.\n\n"
        "/mode – choose adapter and role\n/domain – choose the domain adapter\n/role – choose the role\n"
        "/new – start a fresh conversation\n/retry – answer the last question again\n"
        "/stop – stop the answer being written\n/language – interface language"
    ),
    "help_admin": (
        "\n\nAdmin: /status, /adapters, /reload [domain], /train <domain>, /cancel, "
        "/rollback <domain>, /promote <domain> <version>, /export <domain>"
    ),
    "language_choose": "Choose the interface language:",
    "language_set": "Interface language: English.",
    "mode_choose": "Current mode: {mode}\nChoose a domain adapter and a role:",
    "domain_choose": "Current mode: {mode}\nChoose a domain adapter:",
    "role_choose": "Current mode: {mode}\nChoose a role:",
    "mode_set": "Mode: {mode}",
    "mode_unknown": "That choice is no longer available.",
    "plain": "plain assistant",
    "base_model": "no adapter",
    "section_domain": "— domain —",
    "section_role": "— role —",
    "new_conversation": "Started a fresh conversation. Mode: {mode}",
    "nothing_to_retry": "There is no earlier question to answer again.",
    "nothing_to_stop": "Nothing is being written right now.",
    "stopped": "⏹ stopped",
    "queued": "⏳ I'll answer this right after the current reply.",
    "too_many_pending": "I'm still answering your earlier messages. Please wait for them first.",
    "rate_limited": "You're writing faster than I can keep up with. Please try again in {seconds} s.",
    "not_allowed": "Sorry, this bot is private.",
    "admin_only": "This command is for admins only.",
    "text_only": "I understand text only for now. Please write your question in words.",
    "empty_answer": "(the model returned an empty answer)",
    "shutting_down": "The bot is restarting. Please send your message again in a minute.",
    "thanks_feedback": "Thanks for the feedback!",
    "err_busy": "I'm overloaded right now. Please try again in a few seconds.",
    "err_closed": "The bot is restarting. Please try again in a minute.",
    "err_adapter": "The adapter of your mode is not available right now. Choose another with /mode.",
    "err_template": "The role of your mode is not available right now. Choose another with /role.",
    "err_too_long": "Your message is too long for me. Please shorten it.",
    "err_generic": "Something went wrong while answering. Please try again.",
    "training_unavailable": "Training is not available on this deployment yet.",
    "usage_train": "Usage: /train <domain>, e.g. /train legal",
    "usage_rollback": "Usage: /rollback <domain>",
    "usage_promote": "Usage: /promote <domain> <version>",
    "usage_export": "Usage: /export <domain>",
    "training_refused": "Cannot start training: {reason}",
    "training_none": "No training job is running.",
    "training_cancelled": "Cancelled the training job {job} ({domain}).",
    "rollback_done": "{domain} now serves {version}.",
    "promote_done": "{domain} now serves {version}.",
    "export_done": "Added {rows} liked answers to the {domain} training data ({pairs} found).",
    "export_none": "No liked answers in the {domain} domain yet.",
    "reload_done": "Reloaded. {report}",
}

_RU: dict[str, str] = {
    "start": (
        "Здравствуйте{name}! Я отвечаю с помощью одной небольшой языковой модели, которая умеет "
        "переключать специализацию: доменный адаптер (право, медицина, финансы) и роль.\n\n"
        "Текущий режим: {mode}\n\n"
        "Просто напишите вопрос. /mode меняет режим, /new начинает новый разговор, /help — все команды."
    ),
    "help": (
        "Напишите вопрос, и я отвечу в текущем режиме.\n\n"
        "/mode – выбрать адаптер и роль\n/domain – выбрать доменный адаптер\n/role – выбрать роль\n"
        "/new – начать новый разговор\n/retry – ответить на последний вопрос заново\n"
        "/stop – остановить ответ\n/language – язык интерфейса"
    ),
    "help_admin": (
        "\n\nАдмин: /status, /adapters, /reload [домен], /train <домен>, /cancel, "
        "/rollback <домен>, /promote <домен> <версия>, /export <домен>"
    ),
    "language_choose": "Выберите язык интерфейса:",
    "language_set": "Язык интерфейса: русский.",
    "mode_choose": "Текущий режим: {mode}\nВыберите доменный адаптер и роль:",
    "domain_choose": "Текущий режим: {mode}\nВыберите доменный адаптер:",
    "role_choose": "Текущий режим: {mode}\nВыберите роль:",
    "mode_set": "Режим: {mode}",
    "mode_unknown": "Этот вариант больше недоступен.",
    "plain": "обычный ассистент",
    "base_model": "без адаптера",
    "section_domain": "— домен —",
    "section_role": "— роль —",
    "new_conversation": "Начат новый разговор. Режим: {mode}",
    "nothing_to_retry": "Нет предыдущего вопроса, на который можно ответить заново.",
    "nothing_to_stop": "Сейчас ничего не пишется.",
    "stopped": "⏹ остановлено",
    "queued": "⏳ Отвечу на это сразу после текущего ответа.",
    "too_many_pending": "Я ещё отвечаю на ваши предыдущие сообщения. Пожалуйста, подождите.",
    "rate_limited": "Вы пишете быстрее, чем я успеваю. Попробуйте снова через {seconds} с.",
    "not_allowed": "Извините, это закрытый бот.",
    "admin_only": "Эта команда только для администраторов.",
    "text_only": "Пока я понимаю только текст. Пожалуйста, напишите вопрос словами.",
    "empty_answer": "(модель вернула пустой ответ)",
    "shutting_down": "Бот перезапускается. Пожалуйста, отправьте сообщение ещё раз через минуту.",
    "thanks_feedback": "Спасибо за отзыв!",
    "err_busy": "Я сейчас перегружен. Попробуйте через несколько секунд.",
    "err_closed": "Бот перезапускается. Попробуйте через минуту.",
    "err_adapter": "Адаптер вашего режима сейчас недоступен. Выберите другой: /mode.",
    "err_template": "Роль вашего режима сейчас недоступна. Выберите другую: /role.",
    "err_too_long": "Сообщение слишком длинное. Пожалуйста, сократите его.",
    "err_generic": "Что-то пошло не так при ответе. Попробуйте ещё раз.",
    "training_unavailable": "Обучение пока недоступно в этой установке.",
    "training_none": "Обучение сейчас не идёт.",
}

_STRINGS: dict[str, dict[str, str]] = {"en": _EN, "ru": _RU}


def normalize_language(code: str | None) -> str:
    """Telegram's `language_code` ('ru', 'ru-RU', 'en-GB', None) -> one of LANGUAGES."""
    if not code:
        return DEFAULT_LANGUAGE
    base = code.split("-")[0].split("_")[0].lower()
    return base if base in LANGUAGES else DEFAULT_LANGUAGE


def t(lang: str | None, key: str, **values: object) -> str:
    table = _STRINGS.get(lang or DEFAULT_LANGUAGE, _EN)
    template = table.get(key) or _EN[key]
    return template.format(**values) if values else template
