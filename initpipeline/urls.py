from django.urls import path

from . import views

app_name = "initpipeline"

urlpatterns = [
    path("livez", views.livez, name="livez"),
    path("readyz", views.readyz, name="readyz"),
    path("status.json", views.status_json, name="status"),
    path("metrics", views.metrics, name="metrics"),
]
