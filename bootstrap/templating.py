"""Renders the jinja2 templates under templates/ (shipped in the wheel)."""

from __future__ import annotations

from functools import lru_cache
from typing import Any

import jinja2

from bootstrap.resources import templates_dir


@lru_cache(maxsize=1)
def _env() -> jinja2.Environment:
    return jinja2.Environment(
        loader=jinja2.FileSystemLoader(str(templates_dir())),
        undefined=jinja2.StrictUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
        keep_trailing_newline=True,
        autoescape=False,
    )


def render(name: str, **context: Any) -> str:
    return _env().get_template(name).render(**context)
