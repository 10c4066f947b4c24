"""A webhook (``http(s)://HOST/PATH``): the keys as JSON, for a CDN pyisr has no adapter
for, or a purge service of one's own.

``POST`` with ``{"keys": [...], "soft": true|false}`` (the keys the responses carried in
``Surrogate-Key`` / ``Cache-Tag``), and ``Authorization: Bearer <token>`` when
``PYISR_CDN_WEBHOOK_TOKEN`` (or the variable ``?token_env=`` names) is set. Any 2xx
answer is success; 401, 403 and other client errors are not retried.
"""

from __future__ import annotations

from collections.abc import Sequence

from pyisr.cdn.client import LoopClient, check_status


class WebhookPurger:
    """Posts the keys of each purge to one URL."""

    max_keys: int = 500
    max_bytes: int | None = None

    def __init__(self, url: str, name: str, *, token: str | None = None) -> None:
        #: The URL without its query or credentials: what logs and health may show.
        self.name = name
        self._url = url
        self._token = token
        self._client = LoopClient()

    async def purge(self, keys: Sequence[str], *, soft: bool) -> None:
        headers = {"authorization": f"Bearer {self._token}"} if self._token else {}
        response = await self._client.request(
            "POST", self._url, headers=headers, json={"keys": list(keys), "soft": soft}
        )
        check_status(response, self.name)

    async def close(self) -> None:
        await self._client.close()
