"""`python -m bot`: the Telegram bot with BOT_TOKEN, the console chat without it.

Settings, folders and the model's whereabouts are checked first (`bot.preflight`), before
aiogram and torch are imported, so a mistake is reported in about a second.
"""
import sys

from bot.preflight import preflight

code = preflight()
if code is not None:
    sys.exit(code)

from bot.app import main  # noqa: E402  (heavy: aiogram; only once the settings are known good)

sys.exit(main())
