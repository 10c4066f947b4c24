"""The blog's views: cached pages that need no revalidation code at all.

The list and detail pages are tagged with what they read (``blog.post:*``, ``blog.post:5``,
``auth.user:1``...), so saving a post in the admin or through the form below refreshes
exactly the pages that showed it, after the transaction commits.
"""

from django import forms
from django.contrib.admin.views.decorators import staff_member_required
from django.contrib.auth.decorators import login_required
from django.http import Http404
from django.shortcuts import get_object_or_404, redirect, render
from django.utils.http import url_has_allowed_host_and_scheme
from django.views.generic import DetailView

from blog.models import Post, Tag
from pyisr.integrations.django import ISRMixin, disable_draft_mode, enable_draft_mode, is_draft_mode, isr


@isr()  # PYISR["revalidate"]: an hour, unless a post changes first
def post_list(request):
    posts = Post.objects.filter(published=True).select_related("author")
    return render(request, "blog/post_list.html", {"posts": posts})


@isr()
def post_detail(request, pk):
    # A lookup by primary key: the page is tagged blog.post:<pk>, not with every post.
    post = get_object_or_404(Post.objects.select_related("author"), pk=pk)
    if not post.published and not is_draft_mode(request):
        raise Http404("not published")  # a cached 404 until the post is published
    return render(request, "blog/post_detail.html", {"post": post, "tags": post.tags.all()})


class TagDetail(ISRMixin, DetailView):
    """A class-based view: the isr_* attributes are @isr's arguments."""

    model = Tag
    isr_revalidate = 600
    template_name = "blog/tag_detail.html"

    def get_context_data(self, **kwargs):
        return super().get_context_data(posts=self.object.posts.filter(published=True), **kwargs)


class PostForm(forms.ModelForm):
    class Meta:
        model = Post
        fields = ["title", "body", "tags"]


@login_required
def post_new(request):
    """Not cached (it has a form): saving refreshes the list page by itself."""
    form = PostForm(request.POST or None)
    if request.method == "POST" and form.is_valid():
        post = form.save(commit=False)
        post.author = request.user
        post.save()
        form.save_m2m()
        return redirect(post)
    return render(request, "blog/post_form.html", {"form": form})


def _next(request):
    target = request.GET.get("next", "/")
    return target if url_has_allowed_host_and_scheme(target, {request.get_host()}) else "/"


@staff_member_required
def preview(request):
    """Draft mode for this browser: every page renders fresh (unpublished posts too)."""
    return enable_draft_mode(request, redirect(_next(request)))


def preview_off(request):
    return disable_draft_mode(redirect(_next(request)))
