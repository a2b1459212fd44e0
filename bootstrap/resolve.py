"""Two facts every command acts on: the node's GPU mode and its control plane's URL.

Each has one resolver with one order of sources, called once per run (an install run, `update`, a
doctor run, one heartbeat) and passed on from there; nothing else picks a fallback of its own. The
order is what an operator expects of a setting: what this run was told beats what node.yaml says,
which beats what the node recorded when it enrolled, which beats what can be detected.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from typing import TYPE_CHECKING

from bootstrap import platform
from bootstrap.errors import VectorlayError
from bootstrap.host import Host
from bootstrap.paths import IDENTITY_DIR, IDENTITY_LEGACY
from bootstrap.settings import GPU_MODES

if TYPE_CHECKING:
    from bootstrap.identity import Identity

NO_API_HINT = "pass api=https://... to the one-liner (or --api, or api: in node.yaml)"


def identity_or_none(host: Host) -> Identity | None:
    """The identity in force; None when there is none or it is damaged (a damaged one is reported,
    and repaired, where it is used: here it only gives no recorded value)."""
    # load_identity's own test for a node never enrolled, made before importing bootstrap.identity:
    # the doctor on such a node starts without it (tests/doctor/test_doctor_startup.py).
    ident_dir = host.path(IDENTITY_DIR, follow=False)
    if (
        not ident_dir.exists()
        and not ident_dir.is_symlink()
        and not (ident_dir.parent / IDENTITY_LEGACY).is_dir()
    ):
        return None
    from bootstrap.identity import IdentityError, load_identity

    with contextlib.suppress(IdentityError, OSError):
        return load_identity(host)
    return None


def recorded_gpu_mode(identity: Identity | None) -> str | None:
    """The GPU mode the node enrolled with (enrollment.json), None when unknown."""
    if identity is None:
        return None
    from bootstrap.identity import IdentityError

    with contextlib.suppress(IdentityError):
        mode = identity.enrollment().get("gpu_mode")
        return mode if mode in GPU_MODES else None
    return None


def gpu_mode(
    chosen: str | None,
    *,
    recorded: Callable[[], str | None],
    has_gpus: Callable[[], bool],
) -> str:
    """passthrough | container | none: the first of

    1. `chosen`: this run's `--gpu-mode`, else node.yaml's `gpu_mode` (`VECTORLAY_GPU_MODE`
       overriding it): the command merges its option into the Settings, which hold both;
    2. `recorded()`: the mode the node enrolled with (`recorded_gpu_mode`);
    3. detection: passthrough on a box with GPUs, none without (`has_gpus()`).

    A source is asked only when the ones before it gave nothing: reading the identity and
    detecting the GPUs cost, and the doctor runs on a timer.
    """
    return chosen or recorded() or platform.gpu_mode(has_gpus=has_gpus())


def known_api_url(chosen: str | None, identity: Identity | None) -> str | None:
    """The control plane's URL, None when nothing names one: the first of

    1. `chosen`: this run's `--api` (install.sh's `api=`), else node.yaml's `api` (`VECTORLAY_API`
       overriding it): the command merges its option into the Settings, which hold both; the
       node-agent's own config (node-agent.yaml, written by the install from this same order)
       comes first for the agent;
    2. the control plane the node enrolled with (the identity's node.json).
    """
    return chosen or (identity.api if identity is not None else None) or None


def api_url(chosen: str | None, identity: Identity | None) -> str:
    """`known_api_url`, or an error saying how to name the control plane."""
    url = known_api_url(chosen, identity)
    if not url:
        raise VectorlayError("no control plane URL", NO_API_HINT)
    return url
