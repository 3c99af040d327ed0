from django.apps import AppConfig


class SoakConfig(AppConfig):
    name = "bench.soakapp"
    label = "soakapp"
