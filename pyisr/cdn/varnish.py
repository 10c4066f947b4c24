"""Varnish with the xkey module (``varnish://HOST:PORT``): the purge request the shipped
VCL (``deploy/varnish/pyisr.vcl``) accepts.

``PURGE /`` with ``xkey-purge: k1 k2 …`` (or ``xkey-softpurge`` for a stale mark: the
objects stay in grace, served while refetched), and ``x-pyisr-purge-secret`` when a
secret is set (``PYISR_VARNISH_PURGE_SECRET``, or the variable ``?secret_env=`` names);
the VCL also accepts purges from the addresses its ACL allows. It answers 200 with
``x-pyisr-purged: <objects>``. A 401/403 is a wrong secret or an address outside the
ACL: not retried.
"""

from __future__ import annotations

from collections.abc import Sequence

from pyisr.cdn.client import LoopClient, check_status

#: The header of a hard purge, of a soft one, and of the secret (the VCL's names).
PURGE_HEADER = "xkey-purge"
SOFT_PURGE_HEADER = "xkey-softpurge"
SECRET_HEADER = "x-pyisr-purge-secret"


class VarnishPurger:
    """Purges keys at one Varnish by xkey."""

    #: Varnish refuses a request header line over 8 KB (``http_req_hdr_len``): the keys
    #: of one purge stay well under it, whatever their number.
    max_keys: int = 200
    max_bytes: int | None = 7000

    def __init__(self, host: str, port: int, *, secret: str | None = None) -> None:
        netloc = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
        self.name = f"varnish://{netloc}"
        self._url = f"http://{netloc}/"
        self._secret = secret
        self._client = LoopClient()

    async def purge(self, keys: Sequence[str], *, soft: bool) -> None:
        headers = {SOFT_PURGE_HEADER if soft else PURGE_HEADER: " ".join(keys)}
        if self._secret:
            headers[SECRET_HEADER] = self._secret
        response = await self._client.request("PURGE", self._url, headers=headers)
        check_status(response, self.name)

    async def close(self) -> None:
        await self._client.close()
