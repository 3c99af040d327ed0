"""Peer "naive" (and, with --preload, "preload"): the init runs at import of wsgi.py."""

import os
import tempfile
from pathlib import Path

from django.core.wsgi import get_wsgi_application

from bench.plain import run_phases

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "bench.settings")
application = get_wsgi_application()
# The whole init, before this process can answer anything.
run_phases(Path(tempfile.mkdtemp(prefix="naive-")))
