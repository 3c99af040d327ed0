from django.urls import include, path

from bench.serveapp import views

urlpatterns = [
    path("bench/model", views.model),
    path("bench/slow", views.slow),
    path("init/", include("initpipeline.urls")),
]
