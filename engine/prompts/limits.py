"""Time and size limits for rendering role templates.

Jinja2's sandbox stops a template from reaching Python internals, but not from looping or
allocating without end: `{% for i in range(100000) %}{% for j in range(100000) %}` runs for
minutes and `"x" * 10**9` takes a gigabyte. Templates are edited by admins on a live bot, so
every render runs under a budget (a deadline and a cap on the characters produced) that is
checked wherever a template can spend time or memory: every call, filter, operator,
concatenation, loop step over `range`, and every piece of output. Exceeding it raises
`RenderLimit`, which the template library turns into a TemplateError naming the setting.
"""
from __future__ import annotations

import functools
import re
import threading
import time
from contextlib import contextmanager
from typing import Any, Callable, Iterator

from jinja2 import nodes
from jinja2.compiler import CodeGenerator, Frame
from jinja2.sandbox import ImmutableSandboxedEnvironment, safe_range


class RenderLimit(Exception):
    """A render went over its time or size budget."""


class _Budget(threading.local):
    deadline: float | None = None
    timeout_s: float = 0.0
    max_chars: int = 0


_budget = _Budget()


def check() -> None:
    """Raise RenderLimit when the current thread's render is past its deadline."""
    if _budget.deadline is not None and time.monotonic() > _budget.deadline:
        raise RenderLimit(f"rendering took longer than {_budget.timeout_s:g} s (TEMPLATE_RENDER_TIMEOUT_S)")


def _check_count(n: int) -> None:
    if _budget.deadline is not None and n > _budget.max_chars:
        raise RenderLimit(f"a value of {n} items is larger than TEMPLATE_MAX_CHARS={_budget.max_chars}")


def _check_size(value: Any) -> Any:
    if isinstance(value, (str, list, tuple, dict)):
        _check_count(len(value))
    return value


_DIGITS = re.compile(r"\d+")


def _check_format(spec: str) -> None:
    """A width or precision in a format string (`'%1000000000d' % 1`, `'{:>99999999}'.format(x)`)."""
    if _budget.deadline is None:
        return
    for digits in _DIGITS.findall(spec):
        if len(digits) > 12 or int(digits) > _budget.max_chars:
            raise RenderLimit(f"the width {digits} in a format string is larger than TEMPLATE_MAX_CHARS={_budget.max_chars}")


def _check_numbers(args: tuple, kwargs: dict) -> None:
    """An int argument above the size cap (`center(10**9)`, `ljust`, `zfill`, width specs) is refused
    before the call, so no single call can allocate more than the cap."""
    if _budget.deadline is None:
        return
    for value in (*args, *kwargs.values()):
        if isinstance(value, int) and not isinstance(value, bool) and abs(value) > _budget.max_chars:
            raise RenderLimit(f"the number {value} is larger than TEMPLATE_MAX_CHARS={_budget.max_chars}")


class _TickingRange:
    """`range` for templates: lazy like the builtin, checks the deadline on every step."""

    def __init__(self, *args: int) -> None:
        self._range = safe_range(*args)

    def __iter__(self) -> Iterator[int]:
        for i in self._range:
            check()
            yield i

    def __len__(self) -> int:
        return len(self._range)

    def __getitem__(self, index: Any) -> Any:
        return self._range[index]

    def __contains__(self, value: object) -> bool:
        return value in self._range

    def __reversed__(self) -> Iterator[int]:
        for i in reversed(self._range):
            check()
            yield i

    def __repr__(self) -> str:
        return repr(self._range)


def limited_join(parts: Any) -> str:
    """`~` concatenation with the budget's checks (the code generator routes `~` here)."""
    check()
    return _check_size("".join(map(str, parts)))


class _LimitedCodeGenerator(CodeGenerator):
    def visit_Concat(self, node: nodes.Concat, frame: Frame) -> None:
        self.write("environment.limited_join((")
        for arg in node.nodes:
            self.visit(arg, frame)
            self.write(", ")
        self.write("))")


def _limited_filter(fn: Callable[..., Any]) -> Callable[..., Any]:
    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        check()
        _check_numbers(args[1:], kwargs)
        return _check_size(fn(*args, **kwargs))

    return wrapper


class LimitedSandbox(ImmutableSandboxedEnvironment):
    """The immutable sandbox plus the render budget (see the module docstring)."""

    code_generator_class = _LimitedCodeGenerator
    intercepted_binops = frozenset({"*", "**", "%", "+"})

    def __init__(self, **kwargs: Any) -> None:
        # no optimizer pass: its constant folding would evaluate `'x' * 10**9` while compiling
        super().__init__(optimized=False, **kwargs)
        self.globals["range"] = _TickingRange
        self.filters = {name: _limited_filter(fn) for name, fn in self.filters.items()}
        self.limited_join = limited_join

    def is_safe_callable(self, obj: Any) -> bool:
        return obj is _TickingRange or super().is_safe_callable(obj)

    def call(__self, __context: Any, __obj: Any, *args: Any, **kwargs: Any) -> Any:  # noqa: N805
        check()
        if __obj is not _TickingRange:
            _check_numbers(args, kwargs)
        return _check_size(super().call(__context, __obj, *args, **kwargs))

    def wrap_str_format(self, value: Any) -> Callable[..., str] | None:
        fn = super().wrap_str_format(value)
        if fn is None:
            return None
        spec = value.__self__

        @functools.wraps(fn)
        def checked(*args: Any, **kwargs: Any) -> str:
            _check_format(str(spec))
            return fn(*args, **kwargs)

        return checked

    def call_binop(self, context: Any, op: str, left: Any, right: Any) -> Any:
        check()
        if op == "**" and isinstance(right, int) and isinstance(left, int) and abs(right) > 64 and abs(left) > 1:
            raise RenderLimit(f"{left} ** {right} is too large a number for a template")
        if op == "*" and isinstance(right, int) and hasattr(left, "__len__"):
            _check_count(len(left) * right)
        elif op == "*" and isinstance(left, int) and hasattr(right, "__len__"):
            _check_count(len(right) * left)
        elif op == "%" and isinstance(left, str):
            _check_format(left)
        return _check_size(self.binop_table[op](left, right))


@contextmanager
def limits(timeout_s: float, max_chars: int) -> Iterator[None]:
    """Apply the budget to what runs inside, in this thread.

    Compiling needs it too: Jinja folds constant expressions while compiling, so
    `{{ 'x'|center(10**9) }}` would otherwise be evaluated, unchecked, at load time.
    """
    _budget.deadline = time.monotonic() + timeout_s
    _budget.timeout_s, _budget.max_chars = timeout_s, max_chars
    try:
        yield
    finally:
        _budget.deadline = None


def render_limited(template: Any, variables: dict[str, Any], timeout_s: float, max_chars: int) -> str:
    """Render `template` (from a LimitedSandbox) within `timeout_s` and `max_chars`."""
    with limits(timeout_s, max_chars):
        out: list[str] = []
        size = 0
        for piece in template.generate(**variables):
            check()
            size += len(piece)
            if size > max_chars:
                raise RenderLimit(f"the rendered prompt is longer than TEMPLATE_MAX_CHARS={max_chars} characters")
            out.append(piece)
        return "".join(out)


__all__ = ["LimitedSandbox", "RenderLimit", "check", "limits", "render_limited"]
