from django.contrib import admin
from django.urls import include, path

urlpatterns = [
    path("admin/", admin.site.urls),
    path("init/", include("initpipeline.urls")),
    path("", include("project.search.urls")),
]
