from django.apps import AppConfig


class MergeAppConfig(AppConfig):
    name = "tests.mergeapp"
    label = "mergeapp"
