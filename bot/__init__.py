"""The Telegram bot and the console chat: front ends of the engine (see bot/app.py)."""
