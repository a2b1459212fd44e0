"""Wall time of a no-op re-run of the one-liner's installer on the installed demo node (goal: < 1 s).

The whole `vectorlay-bootstrap install` process is timed, interpreter start-up included, as a provider
re-running the command sees it: preflight (with the token's introspection over HTTPS), detection of
the HGX, every stage's plan, the artifacts' manifest over mTLS, the agents' health, and the doctor.
tests/install/test_noop_rerun.py shows the same run writes nothing and changes nothing.
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path
from typing import Any

import pytest

from tests.install.helpers import FAST, install, installed_demo_node

pytestmark = pytest.mark.slow


def test_a_noop_rerun_of_install_on_the_installed_demo_node(benchmark: Any) -> None:
    base = Path(tempfile.mkdtemp(prefix="vlb", dir="/tmp"))
    try:
        with installed_demo_node(base) as (cp, root, token):

            def rerun() -> int:
                return install(root, cp=cp, token=token, env=FAST).returncode

            assert benchmark.pedantic(rerun, rounds=10, iterations=1, warmup_rounds=1) == 0
    finally:
        shutil.rmtree(base, ignore_errors=True)
