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
        "\n\nAdmin: /status, /jobs, /adapters, /reload [domain], /train <domain>, /cancel, "
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
    "section_domain": "ℹ️ domain adapter",
    "section_role": "ℹ️ role",
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
    "train_refused": "Cannot start training {domain}: {reason}",
    "cancel_refused": "Cannot cancel the training job: {reason}",
    "rollback_refused": "Cannot roll back {domain}: {reason}",
    "promote_refused": "Cannot promote {domain} {version}: {reason}",
    "export_refused": "Cannot export to {domain}: {reason}",
    "reload_refused": "Cannot reload: {reason}",
    "unknown_domain": "There is no adapter domain “{domain}”. Domains: {domains}.",
    "unknown_version": "{domain} has no version “{version}”. Versions: {versions}.",
    "none": "none",
    "training_none": "No training job is running.",
    "training_cancelled": "Cancelled the training job {job} ({domain}).",
    "rollback_done": "{domain} now serves {version} (rolled back from {previous}).",
    "promote_done": "{domain} now serves {version}.",
    "export_done": "Added {rows} liked answers to the {domain} training data ({pairs} found).",
    "export_nothing_new": "All {pairs} liked answers of {domain} are already in its training data.",
    "export_none": "No liked answers in the {domain} domain yet.",
    "reload_ok": "🔄 Reload done.",
    "reload_partial": "⚠️ Reload finished with errors.",
    "reload_failed": "❌ Reload failed.",
    "reload_nothing": "🔄 Nothing to reload: no adapter domains on disk.",
    "reload_loaded": "✅ {name}: {version} loaded",
    "reload_unchanged": "• unchanged: {items}",
    "reload_error": "❌ {name}: {reason}",
    "reload_template": "⚠️ template {name}: {reason} (the last good version stays in use)",
    # /status
    "st_model": "Model: {model}",
    "st_quant": "Quantization: {quantization} · {dtype} · device {device}",
    "st_memory": "Memory: model {model}, process {process}, GPU {gpu}",
    "st_adapters": "Resident adapters:",
    "st_adapter": "  • {name} {version} — {state}, {size}, {in_flight} in flight",
    "st_queue": "Queue: {waiting} waiting, {generating} generating, {tokens} tokens so far",
    "st_users": "Users: {generating} being answered, {waiting} queued, {active} active in 24 h",
    "st_uptime": "Uptime: bot {bot}, engine {engine}",
    "st_ready": "Ready: {ready}",
    "st_replicas": "Replicas: {ready} of {total} ready",
    "st_replica_failures": ", {failures} failures",
    "st_replica": "  • {name} — {state}, {in_flight} in flight, {adapters} adapters, {requests} requests",
    "st_training": "Training: {training}",
    "st_idle": "idle",
    "yes": "yes",
    "no": "no",
    "n_a": "n/a",
    # /adapters
    "ad_none": "No adapters on disk.",
    "ad_serving": "serving {version}",
    "ad_not_serving": "not serving",
    "ad_older": "  … {n} older",
    "ad_loss": "loss",
    # training progress
    "tr_starting": "🕒 Training {domain}: starting…",
    "tr_queued": "🕒 Training {domain}: queued (job {job})",
    "tr_running": "🏋️ Training {domain} (job {job})",
    "tr_step": "step {step}/{total}",
    "tr_loss": "loss {loss}",
    "tr_eta": "eta {eta} s",
    "tr_evaluating": "🧪 Training {domain}: evaluating on the held-out split…",
    "tr_finished": "✅ {domain} {version}: {metrics}",
    "tr_eval_loss": "eval loss {value}",
    "tr_base": "base {value}",
    "tr_previous": "previous {value}",
    "tr_perplexity": "perplexity {value}",
    "tr_promoted": "promoted, now serving",
    "tr_candidate": "kept as a candidate (/promote {domain} {version})",
    "tr_failed": "❌ Training {domain} failed: {reason}",
    "tr_unknown_reason": "unknown reason",
    "tr_cancelled": "⏹ Training {domain} cancelled",
    "tr_other": "Training {domain}: {kind}",
    # commands, buttons, cut answers
    "unknown_command": "Unknown command {command}. /help lists the commands.",
    "unknown_command_hint": "Unknown command {command}. Did you mean {suggestion}? /help lists the commands.",
    "unreadable": "I could not read that message: it holds no readable text.",
    "cut": "✂️ Cut off at the length limit.",
    "continue_button": "▶ Continue",
    "continue_prompt": "Continue.",
    "continue_stale": "Only the latest answer can be continued.",
    "interrupted_notice": "⚠️ The bot restarted while writing your last answer, so it was cut off. "
                          "Press Retry to get the whole answer, or just ask your next question.",
    "retry_button": "🔁 Retry",
    "retry_stale": "That answer is no longer the latest one. Send /retry to answer your last question again.",
    "err_storage": "I can't save our conversation right now, so I couldn't answer. Please try again in a few minutes.",
    "train_storage": "Cannot start training {domain}: the adapters volume {problem} ({path}). "
                     "Nothing was started; fix the volume and send /train again.",
    "training_error": "Training {command} failed: {reason}. The log has the details.",
    "volume_readonly": "is read-only",
    "volume_full": "is full",
    "volume_denied": "is not writable by the bot (permissions)",
    "jobs_none": "No training jobs yet.",
    "jobs_title": "Last training jobs:",
    "job_line": "{icon} {domain} · {status} · {at}{version}",
    "st_last_job": "{training} · last job: {domain} {status} ({at})",
    "job_promoted": "promoted",
    "job_candidate": "kept as a candidate",
    "job_failed": "failed",
    "job_cancelled": "cancelled",
    "job_running": "running",
    "button_unknown": "This button is no longer active. Send the command again.",
    "section_domain_help": "Domain adapter: the expertise the model was fine-tuned for. Pick one in the rows below.",
    "section_role_help": "Role: how the assistant talks (its instructions). Pick one in the rows below.",
    # the console chat
    "con_welcome": "Console chat ({mode}). /help for commands, Ctrl-D to leave.",
    "con_help": (
        "Commands:\n"
        "  /mode               the current mode and what is available\n"
        "  /adapter [name]     show or switch the domain adapter (/adapter none = the base model)\n"
        "  /role [id]          show or switch the role\n"
        "  /reset              start a fresh conversation (also /new)\n"
        "  /retry              answer the last question again\n"
        "  /continue           go on with an answer that was cut at the length limit\n"
        "  /language [en|ru]   show or switch the language\n"
        "  /status             engine status\n"
        "  /help               this help\n"
        "  /quit               leave (also Ctrl-D; Ctrl-C stops an answer being written)"
    ),
    "con_mode_line": "mode: {mode} (adapter={adapter}, role={role})",
    "con_mode": "{line}\nadapters: {adapters}\nroles: {roles}",
    "con_no_adapters": "none available: only the base model",
    "con_adapter_now": "adapter: {adapter}. Available: {available} (/adapter none = the base model).",
    "con_adapter_unknown": "no adapter '{name}'; available: {available}",
    "con_adapter_not_serving": "{name} has no serving version ({reason}); available: {available}",
    "con_not_serving_reason": "no version is current",
    "con_role_now": "role: {role}. Available: {available}.",
    "con_role_unknown": "no role '{name}'; available: {available}",
    "con_fresh": "fresh conversation; {line}",
    "con_language_now": "language: {language}. /language en or /language ru switches it.",
    "con_language_set": "language: English",
    "con_language_unknown": "no language '{name}'; available: en, ru",
    "con_error": "error: {error}",
    "con_stopped": "[stopped]",
    "con_interrupted": "[the last answer was cut off by a restart; /retry answers it again]",
    "con_cut": "[cut at the length limit; /continue goes on]",
    "con_nothing_to_continue": "there is no answer to continue",
    "con_bye": "bye",
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
        "\n\nАдмин: /status, /jobs, /adapters, /reload [домен], /train <домен>, /cancel, "
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
    "section_domain": "ℹ️ доменный адаптер",
    "section_role": "ℹ️ роль",
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
    "usage_train": "Использование: /train <домен>, например /train legal",
    "usage_rollback": "Использование: /rollback <домен>",
    "usage_promote": "Использование: /promote <домен> <версия>",
    "usage_export": "Использование: /export <домен>",
    "train_refused": "Не удалось начать обучение {domain}: {reason}",
    "cancel_refused": "Не удалось остановить обучение: {reason}",
    "rollback_refused": "Не удалось откатить {domain}: {reason}",
    "promote_refused": "Не удалось сделать {version} рабочей версией {domain}: {reason}",
    "export_refused": "Не удалось добавить ответы в данные {domain}: {reason}",
    "reload_refused": "Не удалось перезагрузить: {reason}",
    "unknown_domain": "Доменного адаптера «{domain}» нет. Домены: {domains}.",
    "unknown_version": "У {domain} нет версии «{version}». Версии: {versions}.",
    "none": "нет",
    "training_none": "Обучение сейчас не идёт.",
    "training_cancelled": "Обучение {job} ({domain}) остановлено.",
    "rollback_done": "{domain} теперь работает на {version} (откат с {previous}).",
    "promote_done": "{domain} теперь работает на {version}.",
    "export_done": "В обучающие данные {domain} добавлено ответов с 👍: {rows} (найдено {pairs}).",
    "export_nothing_new": "Все ответы с 👍 домена {domain} ({pairs}) уже есть в его обучающих данных.",
    "export_none": "В домене {domain} пока нет ответов с 👍.",
    "reload_ok": "🔄 Перезагрузка выполнена.",
    "reload_partial": "⚠️ Перезагрузка завершилась с ошибками.",
    "reload_failed": "❌ Перезагрузка не удалась.",
    "reload_nothing": "🔄 Перезагружать нечего: доменов адаптеров на диске нет.",
    "reload_loaded": "✅ {name}: загружена {version}",
    "reload_unchanged": "• без изменений: {items}",
    "reload_error": "❌ {name}: {reason}",
    "reload_template": "⚠️ шаблон {name}: {reason} (используется последняя рабочая версия)",
    "st_model": "Модель: {model}",
    "st_quant": "Квантизация: {quantization} · {dtype} · устройство {device}",
    "st_memory": "Память: модель {model}, процесс {process}, GPU {gpu}",
    "st_adapters": "Адаптеры в памяти:",
    "st_adapter": "  • {name} {version} — {state}, {size}, в работе {in_flight}",
    "st_queue": "Очередь: ждут {waiting}, генерируются {generating}, всего токенов {tokens}",
    "st_users": "Пользователи: получают ответ {generating}, в очереди {waiting}, активны за 24 ч {active}",
    "st_uptime": "Работает: бот {bot}, движок {engine}",
    "st_ready": "Готов: {ready}",
    "st_replicas": "Реплики: готовы {ready} из {total}",
    "st_replica_failures": ", сбоев: {failures}",
    "st_replica": "  • {name} — {state}, в работе {in_flight}, адаптеров {adapters}, запросов {requests}",
    "st_training": "Обучение: {training}",
    "st_idle": "не идёт",
    "yes": "да",
    "no": "нет",
    "n_a": "н/д",
    "ad_none": "Адаптеров на диске нет.",
    "ad_serving": "работает {version}",
    "ad_not_serving": "не работает",
    "ad_older": "  … ещё {n} старых",
    "ad_loss": "loss",
    "tr_starting": "🕒 Обучение {domain}: запуск…",
    "tr_queued": "🕒 Обучение {domain}: в очереди (задача {job})",
    "tr_running": "🏋️ Обучение {domain} (задача {job})",
    "tr_step": "шаг {step}/{total}",
    "tr_loss": "loss {loss}",
    "tr_eta": "осталось {eta} с",
    "tr_evaluating": "🧪 Обучение {domain}: оценка на отложенной выборке…",
    "tr_finished": "✅ {domain} {version}: {metrics}",
    "tr_eval_loss": "eval loss {value}",
    "tr_base": "база {value}",
    "tr_previous": "прежняя {value}",
    "tr_perplexity": "перплексия {value}",
    "tr_promoted": "принята, теперь работает",
    "tr_candidate": "оставлена кандидатом (/promote {domain} {version})",
    "tr_failed": "❌ Обучение {domain} не удалось: {reason}",
    "tr_unknown_reason": "причина неизвестна",
    "tr_cancelled": "⏹ Обучение {domain} остановлено",
    "tr_other": "Обучение {domain}: {kind}",
    "unknown_command": "Неизвестная команда {command}. Список команд: /help.",
    "unknown_command_hint": "Неизвестная команда {command}. Может быть, {suggestion}? Список команд: /help.",
    "unreadable": "Не удалось прочитать сообщение: в нём нет читаемого текста.",
    "cut": "✂️ Ответ обрезан по лимиту длины.",
    "continue_button": "▶ Продолжить",
    "continue_prompt": "Продолжай.",
    "continue_stale": "Продолжить можно только последний ответ.",
    "interrupted_notice": "⚠️ Бот перезапустился, пока писал ваш последний ответ, и ответ оборвался. "
                          "Нажмите «Повторить», чтобы получить его целиком, или просто задайте следующий вопрос.",
    "retry_button": "🔁 Повторить",
    "retry_stale": "Этот ответ уже не последний. Отправьте /retry, чтобы ответить на последний вопрос заново.",
    "err_storage": "Сейчас я не могу сохранить наш разговор, поэтому не ответил. Попробуйте через несколько минут.",
    "train_storage": "Не удалось начать обучение {domain}: том адаптеров {problem} ({path}). "
                     "Ничего не запущено; исправьте том и отправьте /train ещё раз.",
    "training_error": "Команда обучения {command} не выполнена: {reason}. Подробности в логе.",
    "volume_readonly": "доступен только для чтения",
    "volume_full": "заполнен",
    "volume_denied": "недоступен боту для записи (права)",
    "jobs_none": "Обучений ещё не было.",
    "jobs_title": "Последние обучения:",
    "job_line": "{icon} {domain} · {status} · {at}{version}",
    "st_last_job": "{training} · последнее: {domain} {status} ({at})",
    "job_promoted": "принята",
    "job_candidate": "оставлена кандидатом",
    "job_failed": "не удалось",
    "job_cancelled": "остановлено",
    "job_running": "идёт",
    "button_unknown": "Эта кнопка больше не действует. Отправьте команду ещё раз.",
    "section_domain_help": "Доменный адаптер: специализация, на которую дообучена модель. Выберите в строках ниже.",
    "section_role_help": "Роль: как говорит ассистент (его инструкции). Выберите в строках ниже.",
    "con_welcome": "Чат в терминале ({mode}). /help — команды, Ctrl-D — выход.",
    "con_help": (
        "Команды:\n"
        "  /mode               текущий режим и что доступно\n"
        "  /adapter [имя]      показать или сменить доменный адаптер (/adapter none — базовая модель)\n"
        "  /role [id]          показать или сменить роль\n"
        "  /reset              начать новый разговор (также /new)\n"
        "  /retry              ответить на последний вопрос заново\n"
        "  /continue           продолжить ответ, обрезанный по лимиту длины\n"
        "  /language [en|ru]   показать или сменить язык\n"
        "  /status             состояние движка\n"
        "  /help               эта справка\n"
        "  /quit               выход (также Ctrl-D; Ctrl-C останавливает ответ)"
    ),
    "con_mode_line": "режим: {mode} (adapter={adapter}, role={role})",
    "con_mode": "{line}\nадаптеры: {adapters}\nроли: {roles}",
    "con_no_adapters": "нет, только базовая модель",
    "con_adapter_now": "адаптер: {adapter}. Доступны: {available} (/adapter none — базовая модель).",
    "con_adapter_unknown": "адаптера '{name}' нет; доступны: {available}",
    "con_adapter_not_serving": "у {name} нет рабочей версии ({reason}); доступны: {available}",
    "con_not_serving_reason": "текущая версия не выбрана",
    "con_role_now": "роль: {role}. Доступны: {available}.",
    "con_role_unknown": "роли '{name}' нет; доступны: {available}",
    "con_fresh": "новый разговор; {line}",
    "con_language_now": "язык: {language}. /language en или /language ru меняет его.",
    "con_language_set": "язык: русский",
    "con_language_unknown": "языка '{name}' нет; доступны: en, ru",
    "con_error": "ошибка: {error}",
    "con_stopped": "[остановлено]",
    "con_interrupted": "[последний ответ оборвался при перезапуске; /retry — ответить заново]",
    "con_cut": "[обрезано по лимиту длины; /continue — продолжить]",
    "con_nothing_to_continue": "продолжать нечего",
    "con_bye": "пока",
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
