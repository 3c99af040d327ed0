from django.apps import AppConfig


class ShardAppConfig(AppConfig):
    name = "tests.shardapp"
    label = "shardapp"
