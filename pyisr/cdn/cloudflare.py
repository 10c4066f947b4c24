"""Cloudflare (``cloudflare://ZONE_ID``): purge by cache tags.

``POST /client/v4/zones/{zone}/purge_cache`` with ``Authorization: Bearer <token>`` and
``{"tags": [...]}``, 30 tags a call (the documented limit of plans that purge by tag);
the answer is JSON whose ``success`` says whether it was done. The token is read from
``CLOUDFLARE_API_TOKEN`` (or the variable ``?token_env=`` names) and needs the zone's
Cache Purge permission. Cloudflare has no soft purge by tag: a stale mark purges too.
"""

from __future__ import annotations

from collections.abc import Sequence

from pyisr.cdn.base import PurgeFailed
from pyisr.cdn.client import LoopClient, check_status, excerpt

DEFAULT_API = "https://api.cloudflare.com"


class CloudflarePurger:
    """Purges cache tags of one Cloudflare zone."""

    max_keys: int = 30
    max_bytes: int | None = None

    def __init__(self, zone_id: str, token: str, *, api: str = DEFAULT_API) -> None:
        self.name = f"cloudflare://{zone_id}"
        self._url = f"{api.rstrip('/')}/client/v4/zones/{zone_id}/purge_cache"
        self._token = token
        self._client = LoopClient()

    async def purge(self, keys: Sequence[str], *, soft: bool) -> None:
        response = await self._client.request(
            "POST",
            self._url,
            headers={"authorization": f"Bearer {self._token}", "accept": "application/json"},
            json={"tags": list(keys)},
        )
        check_status(response, self.name)
        try:
            answer = response.json()
        except ValueError:
            answer = None
        if not isinstance(answer, dict) or answer.get("success") is not True:
            raise PurgeFailed(
                f"{self.name} did not confirm the purge: {excerpt(response)}", kind="not confirmed"
            )

    async def close(self) -> None:
        await self._client.close()
