"""A tiny local JSON origin for the blog: the seeds' ``https://api.vercel.app/blog``, offline.

    python examples/blog/origin.py --port 4000
    BLOG_API_URL=http://127.0.0.1:4000 pyisr build examples/blog
    BLOG_API_URL=http://127.0.0.1:4000 pyisr start examples/blog

``GET /posts`` lists the posts and ``GET /posts/<id>`` returns one, read from the same
SQLite file as the site (``$BLOG_DB`` or ``data/blog.db``). A missing post is a 404;
a database error is a 500, which the post page turns into an exception, as the seed
does. It listens on 127.0.0.1 only. Standard library only, no framework.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from lib import db  # noqa: E402 - needs the site folder on sys.path

POST_PATH = re.compile(r"^/posts/(\d+)$")


class Handler(BaseHTTPRequestHandler):
    server_version = "blog-origin/1"

    def do_GET(self) -> None:  # noqa: N802 - http.server's naming
        path = self.path.split("?", 1)[0].rstrip("/") or "/"
        try:
            if path == "/posts":
                self._json(200, db.all_posts())
                return
            match = POST_PATH.match(path)
            if match:
                post = db.get_post(int(match.group(1)))
                if post is None:
                    self._json(404, {"error": f"no post {match.group(1)}"})
                else:
                    self._json(200, post)
                return
            self._json(404, {"error": "try /posts or /posts/1"})
        except Exception as exc:  # noqa: BLE001 - the origin reports, the page decides
            self._json(500, {"error": f"{type(exc).__name__}: {exc}"})

    def _json(self, status: int, data: object) -> None:
        body = json.dumps(data).encode()
        self.send_response(status)
        self.send_header("content-type", "application/json")
        self.send_header("content-length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: object) -> None:  # noqa: A002
        if os.environ.get("BLOG_ORIGIN_LOG"):
            super().log_message(format, *args)


class OriginServer(ThreadingHTTPServer):
    # The build fetches every post at once: the default backlog of 5 would drop
    # connections (and cost a second's SYN retry each).
    request_queue_size = 128
    daemon_threads = True


def main() -> None:
    parser = argparse.ArgumentParser(description="Serve the blog's posts as JSON on 127.0.0.1.")
    parser.add_argument("--port", type=int, default=4000)
    args = parser.parse_args()
    path = db.ensure_database()
    httpd = OriginServer(("127.0.0.1", args.port), Handler)
    print(f"blog origin: {path} on http://127.0.0.1:{httpd.server_address[1]}/posts", flush=True)
    try:
        httpd.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        httpd.server_close()


if __name__ == "__main__":
    main()
