"""The data cache: ``cached`` (Next.js' ``unstable_cache``) and ``fetch``."""
