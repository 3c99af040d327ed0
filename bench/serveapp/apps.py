from django.apps import AppConfig


class ServeAppConfig(AppConfig):
    name = "bench.serveapp"
    label = "serveapp"
