from django.apps import AppConfig


class BigConfig(AppConfig):
    name = "bench.bigapp"
    label = "bigapp"
