"""`python -m bot`: the Telegram bot with BOT_TOKEN, the console chat without it.

Ctrl-C before the front end is up (while importing or loading) ends with one line, not a
traceback; bot.app handles it from the model load on.
"""
import sys


def _run() -> int:
    try:
        from bot.app import main

        return main()
    except KeyboardInterrupt:
        print("interrupted (Ctrl-C) while starting; nothing was changed", file=sys.stderr)
        return 130


sys.exit(_run())
