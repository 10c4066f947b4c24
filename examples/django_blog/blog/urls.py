from django.urls import path

from blog import views

urlpatterns = [
    path("", views.post_list, name="posts"),
    path("blog/<int:pk>/", views.post_detail, name="post"),
    path("blog/new/", views.post_new, name="post_new"),
    path("tags/<slug:slug>/", views.TagDetail.as_view(), name="tag"),
    path("preview/", views.preview, name="preview"),
    path("preview/off/", views.preview_off, name="preview_off"),
]
