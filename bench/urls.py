from django.urls import include, path

from bench import views

urlpatterns = [
    path("bench/trivial", views.trivial),
    path("bench/pid", views.pid),
    path("bench/lsa-mmap", views.lsa_mmap),
    path("bench/lsa-pickle", views.lsa_pickle),
    path("", include("project.urls")),
]
