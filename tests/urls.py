from django.urls import include, path

from tests.servingapp import views as serving
from tests.testapp import views

urlpatterns = [
    path("", include("project.urls")),
    path("test/b-total", views.b_total),
    path("test/join", views.join_sides),
    path("test/model", serving.model),
    path("test/folder", serving.folder),
]
