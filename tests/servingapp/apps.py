from django.apps import AppConfig


class ServingAppConfig(AppConfig):
    name = "tests.servingapp"
    label = "servingapp"
