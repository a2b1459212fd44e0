"""vectorlay-bootstrap: turns a bare Ubuntu/Debian box into a vectorlay provider node."""

from __future__ import annotations

__version__ = "0.1.0"
