from django.apps import AppConfig


class CodeAppConfig(AppConfig):
    name = "tests.codeapp"
    label = "codeapp"
