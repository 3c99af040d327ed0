from django.apps import AppConfig


class SearchConfig(AppConfig):
    name = "project.search"
    label = "search"
    verbose_name = "Docstring search (demo)"
