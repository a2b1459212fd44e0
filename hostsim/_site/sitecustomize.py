"""Run at start-up by every Python whose PYTHONPATH holds this directory (hostsim.inject.env()): it
installs the test machinery the HOSTSIM_* variables ask for before the product's entry point runs.

hostsim is found where it is importable already (the project's own venv) or else in the checkout
this file lives in, appended last so that the product still comes from the venv being tested (the
one install.sh builds from the wheelhouse). A Python that cannot import them (the system python3
install.sh makes the venv with) is not one the product runs in, and is left alone.
"""

import importlib
import os
import sys


def _install() -> None:
    try:
        inject = importlib.import_module("hostsim.inject")
    except ImportError:
        sys.path.append(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
        try:
            inject = importlib.import_module("hostsim.inject")
        except ImportError:
            return
    inject.install_from_env()


if any(key.startswith("HOSTSIM_") for key in os.environ):
    _install()
