"""Gunicorn settings of the demo: initpipeline's own (initpipeline/gunicorn_conf.py says why
each value), plus the address, the number of workers and an access log on stdout."""

import os

from initpipeline.gunicorn_conf import *  # noqa: F403

# Gunicorn's master never imports project.wsgi: when_ready finds the settings through this.
os.environ.setdefault("DJANGO_SETTINGS_MODULE", "project.settings")

bind = os.environ.get("GUNICORN_BIND", f"127.0.0.1:{os.environ.get('PORT', '8000')}")
workers = int(os.environ.get("WEB_CONCURRENCY", "2"))
accesslog = "-"
