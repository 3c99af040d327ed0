"""Settings of the initpipeline demo project.

The embedded default needs no server: SQLite in WAL mode, kombu's filesystem broker and
artifacts on the local disk, all under var/. DATABASE_URL and CELERY_BROKER_URL switch to
PostgreSQL and Redis (or RabbitMQ); INITPIPELINE_S3_BUCKET puts the artifacts on S3.
"""

import os
from pathlib import Path

import dj_database_url

from initpipeline.celery_settings import celery_settings

BASE_DIR = Path(__file__).resolve().parent.parent
VAR_DIR = Path(os.environ.get("INITPIPELINE_VAR_DIR", BASE_DIR / "var"))
# SQLite cannot create the folder of its file; everything local lives under var/.
VAR_DIR.mkdir(parents=True, exist_ok=True)

# The demo's fallback key is for the demo only; production sets DJANGO_SECRET_KEY.
SECRET_KEY = os.environ.get("DJANGO_SECRET_KEY", "demo-only-insecure-key-change-me-7c1f0e9a")
DEBUG = os.environ.get("DJANGO_DEBUG", "0") == "1"
ALLOWED_HOSTS = os.environ.get("DJANGO_ALLOWED_HOSTS", "localhost,127.0.0.1,[::1]").split(",")

INSTALLED_APPS = [
    "django.contrib.admin",
    "django.contrib.auth",
    "django.contrib.contenttypes",
    "django.contrib.sessions",
    "django.contrib.messages",
    "django.contrib.staticfiles",
    "initpipeline",
    "project.search",
]

MIDDLEWARE = [
    "django.middleware.security.SecurityMiddleware",
    # Serves the admin's CSS and JS under Gunicorn without a separate web server.
    "whitenoise.middleware.WhiteNoiseMiddleware",
    "django.contrib.sessions.middleware.SessionMiddleware",
    "django.middleware.common.CommonMiddleware",
    "django.middleware.csrf.CsrfViewMiddleware",
    "django.contrib.auth.middleware.AuthenticationMiddleware",
    "django.contrib.messages.middleware.MessageMiddleware",
    "django.middleware.clickjacking.XFrameOptionsMiddleware",
]

ROOT_URLCONF = "project.urls"
WSGI_APPLICATION = "project.wsgi.application"

TEMPLATES = [
    {
        "BACKEND": "django.template.backends.django.DjangoTemplates",
        "DIRS": [],
        "APP_DIRS": True,
        "OPTIONS": {
            "context_processors": [
                "django.template.context_processors.request",
                "django.contrib.auth.context_processors.auth",
                "django.contrib.messages.context_processors.messages",
            ],
        },
    },
]

DATABASES = {
    "default": dj_database_url.config(
        default=f"sqlite:///{VAR_DIR / 'db.sqlite3'}", conn_max_age=60
    )
}
if DATABASES["default"]["ENGINE"] == "django.db.backends.sqlite3":
    # A worker, the web server and the CLI write the same file: WAL lets readers go on
    # while one writes, IMMEDIATE takes the write lock up front (no upgrade deadlocks),
    # and timeout waits for it instead of failing with "database is locked".
    DATABASES["default"]["CONN_MAX_AGE"] = 0
    DATABASES["default"]["OPTIONS"] = {
        "init_command": "PRAGMA journal_mode=WAL;PRAGMA synchronous=NORMAL",
        "transaction_mode": "IMMEDIATE",
        "timeout": 20,
    }

DEFAULT_AUTO_FIELD = "django.db.models.BigAutoField"

STATIC_URL = "static/"
STATIC_ROOT = VAR_DIR / "static"
STORAGES = {
    "default": {"BACKEND": "django.core.files.storage.FileSystemStorage"},
    "staticfiles": {"BACKEND": "whitenoise.storage.CompressedStaticFilesStorage"},
    # The artifacts; an S3 backend of django-storages works here too.
    "initpipeline": {
        "BACKEND": "django.core.files.storage.FileSystemStorage",
        "OPTIONS": {"location": str(VAR_DIR / "artifacts")},
    },
}
if os.environ.get("INITPIPELINE_S3_BUCKET"):
    # Several hosts share the artifacts through S3 (or any S3-compatible store; boto3
    # reads AWS_ACCESS_KEY_ID and friends from the environment). Each host keeps
    # verified copies in INITPIPELINE["LOCAL_CACHE_DIR"] to memory-map them.
    STORAGES["initpipeline"] = {
        "BACKEND": "storages.backends.s3.S3Storage",
        "OPTIONS": {
            "bucket_name": os.environ["INITPIPELINE_S3_BUCKET"],
            "location": os.environ.get("INITPIPELINE_S3_PREFIX", "artifacts"),
            "endpoint_url": os.environ.get("AWS_S3_ENDPOINT_URL") or None,
        },
    }

LANGUAGE_CODE = "en-us"
TIME_ZONE = "UTC"
USE_I18N = True
USE_TZ = True

# -- Celery ---------------------------------------------------------------------------------
# The broker: kombu's filesystem broker under var/broker/, unless CELERY_BROKER_URL names
# Redis (then with a visibility_timeout above the longest phase) or RabbitMQ; and the
# settings of long phases (acks late, requeue on a lost worker, prefetch one).
# initpipeline/celery_settings.py says why each one.
globals().update(
    celery_settings(
        os.environ.get("CELERY_BROKER_URL"),
        folder=os.environ.get("INITPIPELINE_BROKER_DIR", VAR_DIR / "broker"),
    )
)
CELERY_TASK_IGNORE_RESULT = True
CELERY_WORKER_SEND_TASK_EVENTS = True
CELERY_BROKER_CONNECTION_RETRY_ON_STARTUP = True

INITPIPELINE = {
    # Imported when a process first sends a task (project/__init__.py says why).
    "CELERY_APP": "project.celery.app",
    "REFRESH_INTERVAL": float(os.environ.get("INITPIPELINE_REFRESH_INTERVAL", "2")),
    "REQUIRED_ARTIFACTS": ["lsa_docs"],
    "DEFAULT_TIMEOUT": 3600,
    # The bearer token Prometheus scrapes /init/metrics with (README: Monitoring); without
    # it, staff read the metrics in a browser (admin / admin in the demo).
    "METRICS_TOKEN": os.environ.get("INITPIPELINE_METRICS_TOKEN") or None,
}

# The demo workload: 1 = the standard library and the packages requirements.txt installs
# (about 20 s); 2 and more add all of site-packages, more SVD components and more work,
# for a longer init.
SEARCH_SCALE = float(os.environ.get("SEARCH_SCALE", "1"))
# Cap the corpus (tests use a small one); 0 = no cap.
SEARCH_MAX_DOCS = int(os.environ.get("SEARCH_MAX_DOCS", "0"))
# The shards of the first phase: enough to give both of make demo's worker processes work.
SEARCH_SHARDS = int(os.environ.get("SEARCH_SHARDS", "4"))

LOGGING = {
    "version": 1,
    "disable_existing_loggers": False,
    "formatters": {"plain": {"format": "%(asctime)s %(levelname)s %(name)s: %(message)s"}},
    "handlers": {"console": {"class": "logging.StreamHandler", "formatter": "plain"}},
    "loggers": {"initpipeline": {"handlers": ["console"], "level": "INFO", "propagate": False}},
}
