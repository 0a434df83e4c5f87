"""Prompts: role templates (sandboxed Jinja2, hot reload, render limits) and the prompt builder
(history budget, the tokenizer's chat template), the same for every backend.

`library` holds the templates and the builders; `limits` the render limits a template cannot
escape. The names below are what the engine, the vLLM backend and the benchmarks use.
"""
from engine.prompts.library import (
    DEFAULT_LANGUAGE, DEFAULT_ROLE, SAFE_PROMPTS, BuiltPrompt, PromptBuilder, PromptMaker, RoleTemplate, SystemPrompt,
    TemplateLibrary, end_token_ids, load_templates, parse_meta, safe_prompt,
)

__all__ = [
    "DEFAULT_LANGUAGE", "DEFAULT_ROLE", "SAFE_PROMPTS", "BuiltPrompt", "PromptBuilder", "PromptMaker", "RoleTemplate",
    "SystemPrompt", "TemplateLibrary", "end_token_ids", "load_templates", "parse_meta", "safe_prompt",
]
