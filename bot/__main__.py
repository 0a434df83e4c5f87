"""`python -m bot`: the Telegram bot with BOT_TOKEN, the console chat without it.

Settings, folders and the model's whereabouts are checked first (`bot.preflight`), before
aiogram and torch are imported, so a mistake is reported in about a second. Ctrl-C before the
front end is up (while importing or loading) ends with one line, not a traceback; bot.app
handles it from the model load on.
"""
import sys


def _run() -> int:
    try:
        from bot.preflight import preflight

        code = preflight()
        if code is not None:
            return code
        from bot.app import main  # heavy (aiogram, torch): only once the settings are known good

        return main()
    except KeyboardInterrupt:
        print("interrupted (Ctrl-C) while starting; nothing was changed", file=sys.stderr)
        return 130


sys.exit(_run())
