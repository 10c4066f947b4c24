"""/api/revalidate?secret=<token>&path=/posts/1: on-demand revalidation (the Pages seed).

Create a secret token only known by your app and put it in $MY_SECRET_TOKEN. The
path defaults to /posts/1, as in the seed; give ?path= to regenerate another page.
"""

import hmac
import os

from starlette.responses import JSONResponse, PlainTextResponse

from pyisr import revalidate


async def handler(request):
    # Check for secret to confirm this is a valid request. (Unlike the seed's `!==`, an
    # unset MY_SECRET_TOKEN rejects every request instead of accepting a missing ?secret=.)
    expected = os.environ.get("MY_SECRET_TOKEN", "")
    given = request.query_params.get("secret", "")
    if not expected or not hmac.compare_digest(given.encode(), expected.encode()):
        return JSONResponse({"message": "Invalid token"}, status_code=401)
    try:
        # This should be the actual path, not a rewritten path:
        # e.g. for "/posts/[id]" this should be "/posts/1".
        await revalidate(request.query_params.get("path", "/posts/1"))
        return JSONResponse({"revalidated": True})
    except Exception:
        # If there was an error, pyisr will continue to show the last successfully
        # generated page.
        return PlainTextResponse("Error revalidating", status_code=500)
