"""The node's Nomad config as the agents stage renders it, parsed by a real HCL parser."""

from __future__ import annotations

from typing import Any

import hcl2
from hcl2.utils import SerializationOptions
from lark import Token, Tree

from bootstrap.host import Host
from bootstrap.identity import Identity
from bootstrap.plan import FileChange
from bootstrap.settings import Settings, load_settings
from bootstrap.stages.agents import NOMAD_CONFIG, desired
from bootstrap.stages.contract import Context
from bootstrap.state import load_state

# Strings come back decoded (escapes resolved, quotes gone); blocks are marked `__is_block__`.
_PARSE = SerializationOptions(strip_string_quotes=True, with_comments=False, explicit_blocks=True)


def render_nomad_config(host: Host, ident: Identity, mode: str, settings: Settings | None = None) -> str:
    """client.hcl from the agents stage's plan for `mode`, without applying anything."""
    ctx = Context(host=host, settings=settings or load_settings(host, env={}), state=load_state(host))
    (config,) = [c for c in desired(ctx, ident, mode) if isinstance(c, FileChange) and c.path == NOMAD_CONFIG]
    return config.content.decode()


def parse_hcl(text: str) -> dict[str, Any]:
    parsed: dict[str, Any] = hcl2.loads(text, serialization_options=_PARSE)
    return parsed


def template_parts(text: str) -> list[str]:
    """The parts of quoted strings in `text` that HCL 2 would evaluate (interpolations, directives)."""
    found: list[str] = []
    for sub in hcl2.parses_to_tree(text).iter_subtrees():
        if sub.data == "string_part":
            for child in sub.children:
                if not (isinstance(child, Token) and child.type == "STRING_CHARS"):
                    found.append(child.data if isinstance(child, Tree) else str(child))
    return found
