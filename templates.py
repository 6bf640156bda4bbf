"""Chat templates, rendered as transformers renders them (its globals, filters and tags) inside a
sandbox that is also bounded. A template is untrusted input from a checkpoint: jinja2's sandbox
keeps it from private attributes, mutation and unsafe calls; the bounds here keep it from hanging
or exhausting the machine (time, memory, the size of what it builds and writes)."""
import functools
import json
import re
import resource
import sys
import time
from datetime import datetime
from functools import cache

import jinja2
import jinja2.ext
from jinja2.exceptions import SecurityError
from jinja2.sandbox import ImmutableSandboxedEnvironment


def raise_exception(message: str):
    raise jinja2.TemplateError(message)


def tojson(value, ensure_ascii=False, indent=None, separators=None, sort_keys=False) -> str:
    # jinja's own tojson escapes HTML characters; templates expect plain JSON
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


# What a template may cost, beyond its messages: a real one adds a few thousand characters in milliseconds
TEMPLATE_CHARS, TEMPLATE_SECONDS, TEMPLATE_GROWTH_MB, MAX_ARGUMENT = 1_000_000, 5.0, 256, 1_000_000
WIDE_FORMAT = re.compile(r"%[-+ #0]*(\*|\d{7,})|\{[^{}]*:[^{}]*\d{7,}")  # a width or precision of 10^6 or more


class Sandbox(ImmutableSandboxedEnvironment):
    """jinja2's sandbox (no private attributes, no mutation, no unsafe calls), failing at the
    first unsafe attribute instead of rendering it as an empty string, and refusing, before they
    run, operations that would build a string or list past TEMPLATE_CHARS ('x' * 10**10,
    '%0999999999d', 10**10**10) and calls with a number past MAX_ARGUMENT (center(10**9));
    `bounded_render` bounds loops (time) and growth by concatenation (memory, output)."""
    intercepted_binops = frozenset(["*", "**", "%", "+"])

    def unsafe_undefined(self, obj, attribute):
        raise SecurityError(f"access to attribute {attribute!r} of a {type(obj).__name__!r} object is unsafe")

    def call_binop(self, context, operator, left, right):
        sized = lambda x: isinstance(x, (str, list, tuple))  # noqa: E731
        if operator == "*" and sized(right):
            left, right = right, left
        if ((operator == "*" and sized(left) and isinstance(right, int) and len(left) * right > TEMPLATE_CHARS)
                or (operator == "+" and sized(left) and sized(right) and len(left) + len(right) > TEMPLATE_CHARS)
                or (operator == "**" and isinstance(left, int) and isinstance(right, int) and abs(left) > 1
                    and right * abs(left).bit_length() > 64 * TEMPLATE_CHARS)
                or (operator == "%" and isinstance(left, str) and WIDE_FORMAT.search(left))):
            raise SecurityError(f"the template builds a value past {TEMPLATE_CHARS:,} characters with {operator!r}")
        return super().call_binop(context, operator, left, right)

    def call(self, __context, __obj, *args, **kwargs):
        check_arguments(__obj, args, kwargs)
        return super().call(__context, __obj, *args, **kwargs)


def check_arguments(f, args, kwargs):
    text = getattr(getattr(f, "__wrapped__", f), "__self__", None)  # str.format comes wrapped
    if (any(isinstance(a, int) and abs(a) > MAX_ARGUMENT for a in (*args, *kwargs.values()))
            or (getattr(f, "__name__", "") in ("format", "format_map") and isinstance(text, str)
                and WIDE_FORMAT.search(text))):
        raise SecurityError(f"the template calls {getattr(f, '__name__', 'a function')} with a size past {MAX_ARGUMENT:,}")


def checked(f):
    """A filter whose arguments are checked as Sandbox.call checks a function's (filters bypass it)."""
    @functools.wraps(f)
    def bounded_filter(*args, **kwargs):
        check_arguments(f, args, kwargs)
        return f(*args, **kwargs)
    return bounded_filter


def bounded_render(template: jinja2.Template, n_content: int, **variables) -> str:
    """template.render(**variables), stopped after TEMPLATE_SECONDS or once the process has grown
    TEMPLATE_GROWTH_MB (a trace hook on the template's own lines catches loops that call nothing),
    or once the text passes the messages' `n_content` characters by TEMPLATE_CHARS."""
    deadline, peak = time.monotonic() + TEMPLATE_SECONDS, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss

    def check(frame, event, arg):
        if time.monotonic() > deadline:
            raise SecurityError(f"the template ran past {TEMPLATE_SECONDS:g} s")
        if resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - peak > TEMPLATE_GROWTH_MB * 1024:  # KiB
            raise SecurityError(f"the template grew the process past {TEMPLATE_GROWTH_MB} MiB")
        return check

    traced, pieces, length = sys.gettrace(), [], 0
    sys.settrace(lambda frame, event, arg: check if frame.f_code.co_filename == "<template>" else None)
    try:
        for piece in template.generate(**variables):
            pieces.append(piece)
            length += len(piece)
            if length > n_content + TEMPLATE_CHARS:
                raise SecurityError(f"the template wrote over {TEMPLATE_CHARS:,} characters beyond its messages")
    finally:
        sys.settrace(traced)
    return "".join(pieces)


class Generation(jinja2.ext.Extension):
    """`{% generation %}...{% endgeneration %}` (marks what the assistant wrote, for training
    masks in transformers): rendered as its body."""
    tags = {"generation"}

    def parse(self, parser):
        next(parser.stream)
        return parser.parse_statements(("name:endgeneration",), drop_needle=True)


TEMPLATES = Sandbox(trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols", Generation])
TEMPLATES.filters["tojson"] = tojson
TEMPLATES.filters.update({name: checked(f) for name, f in TEMPLATES.filters.items()})
TEMPLATES.globals.update(raise_exception=raise_exception, strftime_now=lambda fmt: datetime.now().strftime(fmt))


@cache
def compile_template(source: str) -> jinja2.Template:
    return TEMPLATES.from_string(source)
