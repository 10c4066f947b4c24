"""How a project tests its @isr pages with Django's TestCase (``manage.py test blog``).

A MISS renders in the test's thread, on its connection, so the page shows the data the
test made inside its transaction; ``isolated_cache()`` gives each test an empty cache.
"""

from django.contrib.auth.models import User
from django.test import TestCase

from blog.models import Post
from pyisr.integrations.django.testing import isolated_cache


class PostPageTests(TestCase):
    def setUp(self):
        self.enterContext(isolated_cache())
        self.post = Post.objects.create(title="Made in this test", body="Only this transaction sees me.")

    def test_a_miss_sees_the_tests_data(self):
        response = self.client.get(f"/blog/{self.post.pk}/")
        self.assertEqual(response.status_code, 200)
        self.assertEqual(response["x-pyisr-cache"], "MISS")
        self.assertContains(response, "Made in this test")
        self.assertEqual(self.client.get(f"/blog/{self.post.pk}/")["x-pyisr-cache"], "HIT")

    def test_the_list_follows_a_save_after_commit(self):
        self.assertContains(self.client.get("/"), "Made in this test")
        with self.captureOnCommitCallbacks(execute=True):  # TestCase never commits by itself
            self.post.title = "Renamed"
            self.post.save()
        response = self.client.get("/")
        self.assertEqual(response["x-pyisr-cache"], "MISS")
        self.assertContains(response, "Renamed")

    def test_each_test_has_a_cache_of_its_own(self):
        self.assertEqual(self.client.get("/")["x-pyisr-cache"], "MISS")

    def test_a_deleted_post_is_a_cached_404(self):
        url = f"/blog/{self.post.pk}/"
        self.client.get(url)
        with self.captureOnCommitCallbacks(execute=True):
            self.post.delete()
        gone = self.client.get(url)
        self.assertEqual((gone.status_code, gone["x-pyisr-cache"]), (404, "MISS"))
        self.assertEqual(self.client.get(url)["x-pyisr-cache"], "HIT")

    def test_logged_in_users_bypass_the_cache(self):
        self.client.force_login(User.objects.create_user("editor"))
        response = self.client.get("/")
        self.assertEqual(response["x-pyisr-cache"], "BYPASS")
