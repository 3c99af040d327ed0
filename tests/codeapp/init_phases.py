"""The phases of tests/codeapp/source.py, from the files a test wrote under
``$INITPIPELINE_VAR_DIR/codeapp/``: ``phases.py`` and the module it calls, ``scaling.py``."""

from __future__ import annotations

import os
from pathlib import Path

from tests.codeapp.source import load

_DIR = Path(os.environ["INITPIPELINE_VAR_DIR"]) / "codeapp"

load(_DIR / "scaling.py", "codeapp_scaling")
phases = load(_DIR / "phases.py", "codeapp_phases")
