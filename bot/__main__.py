"""`python -m bot`: the Telegram bot with BOT_TOKEN, the console chat without it."""
import sys

from bot.app import main

sys.exit(main())
