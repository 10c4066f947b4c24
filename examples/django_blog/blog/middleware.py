"""Says which process answered (``X-Served-By``): with several workers, each one's view."""

import os


def served_by(get_response):
    def middleware(request):
        response = get_response(request)
        response["X-Served-By"] = str(os.getpid())
        return response

    return middleware
