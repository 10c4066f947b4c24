"""Fastly (``fastly://SERVICE_ID``): the surrogate-key purge API.

``POST /service/{id}/purge`` with the ``Fastly-Key`` token header and the keys as JSON
(``{"surrogate_keys": [...]}``, 256 at most), ``Fastly-Soft-Purge: 1`` for a soft purge.
The token is read from ``FASTLY_API_TOKEN`` (or the variable ``?token_env=`` names) and
needs the ``purge_select`` scope.

**Soft or hard.** A soft purge marks the objects stale; Fastly then serves them while
it refetches, within the answer's ``stale-while-revalidate``, which pyisr sets up to the
entry's expire. That is right for a stale mark (``revalidate_tag(tag, stale=True)``:
pyisr itself answers the old page while it regenerates), and wrong for an invalidation:
after ``revalidate_tag(tag)`` the next visitor must get the new page, from the edge as
from pyisr. So the default (``soft=1``) purges softly exactly what pyisr marked stale and
hard everything it invalidated; ``soft=0`` purges everything hard.
"""

from __future__ import annotations

from collections.abc import Sequence

from pyisr.cdn.client import LoopClient, check_status

DEFAULT_API = "https://api.fastly.com"


class FastlyPurger:
    """Purges keys of one Fastly service."""

    max_keys: int = 256
    max_bytes: int | None = None

    def __init__(self, service_id: str, token: str, *, soft: bool = True, api: str = DEFAULT_API) -> None:
        self.name = f"fastly://{service_id}"
        self._url = f"{api.rstrip('/')}/service/{service_id}/purge"
        self._token = token
        self._soft = soft
        self._client = LoopClient()

    async def purge(self, keys: Sequence[str], *, soft: bool) -> None:
        headers = {"fastly-key": self._token, "accept": "application/json"}
        if soft and self._soft:
            headers["fastly-soft-purge"] = "1"
        response = await self._client.request(
            "POST", self._url, headers=headers, json={"surrogate_keys": list(keys)}
        )
        check_status(response, self.name)

    async def close(self) -> None:
        await self._client.close()
