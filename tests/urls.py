from django.urls import include, path

from tests.testapp import views

urlpatterns = [
    path("", include("project.urls")),
    path("test/b-total", views.b_total),
    path("test/join", views.join_sides),
]
