from django.apps import AppConfig


class ParallelAppConfig(AppConfig):
    name = "tests.parallelapp"
    label = "parallelapp"
