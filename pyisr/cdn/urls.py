"""CDN adapters named by URL (``cdn = ["varnish://127.0.0.1:6081"]``, ``PYISR_CDN``)."""

from __future__ import annotations

from urllib.parse import urlsplit

#: Schemes and what each names, for error messages.
SCHEMES = {
    "varnish": "varnish://HOST:PORT (a Varnish running deploy/varnish/pyisr.vcl)",
    "fastly": "fastly://SERVICE_ID (token in FASTLY_API_TOKEN)",
    "cloudflare": "cloudflare://ZONE_ID (token in CLOUDFLARE_API_TOKEN)",
    "http": "http://HOST/PATH (a webhook that receives the keys as JSON)",
    "https": "https://HOST/PATH (a webhook that receives the keys as JSON)",
}


def check_cdn_url(url: str) -> str:
    """``url`` if it names a CDN pyisr can purge, else ``ValueError`` saying what would."""
    parts = urlsplit(url.strip())
    if parts.scheme not in SCHEMES:
        known = "; ".join(SCHEMES.values())
        raise ValueError(f"{url!r} is not a CDN URL pyisr knows: use {known}")
    if not parts.netloc:
        raise ValueError(f"{url!r} names no host or id: {SCHEMES[parts.scheme]}")
    return url.strip()


def parse_cdn_urls(value: object) -> tuple[str, ...]:
    """A TOML list of CDN URLs, or a comma-separated string (``PYISR_CDN``)."""
    items = value.split(",") if isinstance(value, str) else value
    if not isinstance(items, list | tuple) or not all(isinstance(i, str) for i in items):
        raise ValueError('expected a list of CDN URLs, such as ["varnish://127.0.0.1:6081"]')
    return tuple(check_cdn_url(i) for i in items if i.strip())
