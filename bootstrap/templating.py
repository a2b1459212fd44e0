"""Renders the jinja2 templates under templates/ (shipped in the wheel)."""

from __future__ import annotations

from functools import lru_cache
from typing import Any

import jinja2

from bootstrap.errors import VectorlayError
from bootstrap.resources import templates_dir

_HCL_ESCAPES = {"\\": "\\\\", '"': '\\"', "\n": "\\n", "\r": "\\r", "\t": "\\t"}


def _is_control(ch: str) -> bool:
    return ch < " " or "\x7f" <= ch <= "\x9f" or ch in "\u2028\u2029"


def hcl_string(value: object) -> str:
    """`value` as one quoted HCL string literal, whatever it holds.

    Nomad reads its agent configuration with HCL 1, and the same text must mean the same in HCL 2
    (what the tests parse it with). The two disagree on template sequences: HCL 2 expands `${...}`
    and `%{...}` and takes `$${` as an escape, HCL 1 copies `${...}` raw (a quote inside it does not
    even end the string) and knows no `$${`. A `\\u` escape reads as one plain character in both,
    so `$` or `%` before `{` is written that way, as is every control character; quote, backslash
    and newline get their usual escapes. A value can then never end its string or open a block.
    """
    if isinstance(value, bool) or not isinstance(value, (str, int, float)):
        raise VectorlayError(
            f"cannot write {value!r} ({type(value).__name__}) into a configuration file as a string",
            "the enrollment answer or node.yaml holds a value of the wrong type: fix it, then re-run",
        )
    text = str(value)
    out: list[str] = []
    for i, ch in enumerate(text):
        if ch in _HCL_ESCAPES:
            out.append(_HCL_ESCAPES[ch])
        elif (ch in "$%" and text[i + 1 : i + 2] == "{") or _is_control(ch):
            out.append(f"\\u{ord(ch):04x}")
        else:
            out.append(ch)
    return '"' + "".join(out) + '"'


@lru_cache(maxsize=1)
def _env() -> jinja2.Environment:
    env = jinja2.Environment(
        loader=jinja2.FileSystemLoader(str(templates_dir())),
        undefined=jinja2.StrictUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
        keep_trailing_newline=True,
        autoescape=False,
    )
    env.filters["hcl"] = hcl_string
    return env


def render(name: str, **context: Any) -> str:
    return _env().get_template(name).render(**context)
