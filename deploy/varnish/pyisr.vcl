#
# Varnish in front of pyisr: the edge keeps what pyisr says may be shared, for as long
# as pyisr says, and drops it the moment pyisr invalidates it.
#
#   varnishd -a :80 -f /etc/varnish/pyisr.vcl -s malloc,1G
#   PYISR_CDN=varnish://127.0.0.1:80 pyisr start mysite --port 3000
#
# Needs Varnish 7 and the xkey vmod (Debian: apt-get install varnish varnish-modules).
# Check it compiles with `varnishd -C -f pyisr.vcl`.
#
# What the edge decides, rule by rule:
#
# * Freshness is pyisr's. A page is kept for `s-maxage` (pyisr sends the time left: its
#   `Age` counts), then served stale for `stale-while-revalidate` while Varnish asks pyisr
#   again in the background; pyisr's own STALE answer is kept only as a stale copy.
#   Nothing pyisr did not mark shareable is kept: `private`, `no-store`, `no-cache`,
#   `Set-Cookie`, `Vary: *`, or no caching headers at all.
# * Invalidations are pyisr's. Every cacheable answer names its tags in `Surrogate-Key`;
#   `revalidate_tag`, `revalidate_path` and `revalidate(path)` send
#   `PURGE /` with `xkey-purge: k1 k2` (or `xkey-softpurge` for `stale=True`), which drops
#   (or marks stale) every object carrying one of the keys, every encoding included.
# * Who bypasses the cache is decided as pyisr decides it: draft mode and logged-in
#   visitors (a framework's session cookie) reach pyisr, which renders for them alone.
#   Every other cookie is forwarded untouched but never splits the cache: a shared render
#   is built from nothing and never sees a visitor's cookies, so the page is the same for
#   everyone.
# * At most three copies of a page: Brotli, gzip and identity (Accept-Encoding is
#   reduced to the one encoding pyisr should answer with; pyisr stores all three, so
#   Varnish compresses nothing).
# * The tags stay behind the edge: `Surrogate-Key` and `Cache-Tag` are removed from what
#   visitors get, unless a purger asks with `x-pyisr-debug: 1`. `Cache-Status` says what
#   Varnish did, after pyisr's own entry.
#

vcl 4.1;

import std;
import xkey;

# The pyisr server (`pyisr start --host 127.0.0.1 --port 3000`). Several instances: use
# one backend each and a round-robin director (vmod directors); they share one cache
# through Redis, so any of them answers the same page.
backend pyisr {
    .host = "127.0.0.1";
    .port = "3000";
    .connect_timeout = 2s;
    .first_byte_timeout = 60s;
}

# Who may purge. Every pyisr instance (and every machine running scripts that call
# revalidate_tag) must be listed. When PYISR_VARNISH_PURGE_SECRET is set in varnishd's
# environment (systemd: `Environment=PYISR_VARNISH_PURGE_SECRET=...` in an override of
# varnish.service), a purge must also carry it in `x-pyisr-purge-secret`: set the same
# variable for pyisr, whose purges then send it.
acl purgers {
    "127.0.0.1";
    "::1";
}

# Cookies that mean "this visitor may get a page of their own": Django's session (a
# logged-in user gets a fresh render with `x-pyisr-cache: BYPASS`), Flask's and
# Starlette's session. Edit to match your site's login cookie; a site served by
# `pyisr start` alone (no framework) needs none of them, but listing them costs only
# the edge hits of visitors who carry them.
sub pyisr_has_session {
    if (req.http.Cookie ~ "(^|;\s*)(sessionid|session)=") {
        set req.http.X-Pyisr-Edge = "bypass; detail=session";
    }
}

sub vcl_recv {
    # Our own request headers are ours: a visitor never sets them.
    unset req.http.X-Pyisr-Edge;
    unset req.http.X-Pyisr-Edge-Encoding;
    if (req.http.x-pyisr-debug && client.ip !~ purgers) {
        unset req.http.x-pyisr-debug;
    }

    if (req.method == "PURGE") {
        call pyisr_purge;
    }
    # Never forward the purge secret, whatever the method.
    unset req.http.x-pyisr-purge-secret;

    # Only GET and HEAD are cached (pyisr caches nothing else either).
    if (req.method != "GET" && req.method != "HEAD") {
        set req.http.X-Pyisr-Edge = "bypass; detail=method";
        return (pass);
    }
    # pyisr's own endpoints (revalidate, health, cache, metrics, the dashboard, draft
    # mode, Pages props) answer per caller or must be fresh: never cached here.
    if (req.url ~ "^/_pyisr(/|$)") {
        set req.http.X-Pyisr-Edge = "bypass; detail=pyisr-endpoint";
        return (pass);
    }
    # Draft mode: an editor's requests are rendered fresh and never stored (pyisr checks
    # the cookie's signature; the edge only needs to let it through).
    if (req.http.Cookie ~ "(^|;\s*)__pyisr_draft=") {
        set req.http.X-Pyisr-Edge = "bypass; detail=draft";
        return (pass);
    }
    if (req.http.Authorization) {
        set req.http.X-Pyisr-Edge = "bypass; detail=authorization";
        return (pass);
    }
    call pyisr_has_session;
    if (req.http.X-Pyisr-Edge) {
        return (pass);
    }

    call pyisr_encoding;
    # Varnish's built-in rules would pass every request carrying a cookie (analytics
    # cookies included): look it up instead. What is stored is decided by the response.
    return (hash);
}

# A purge: authorised by the ACL and, when configured, the secret.
sub pyisr_purge {
    if (client.ip !~ purgers) {
        return (synth(403, "Forbidden"));
    }
    if (std.getenv("PYISR_VARNISH_PURGE_SECRET") != ""
        && req.http.x-pyisr-purge-secret != std.getenv("PYISR_VARNISH_PURGE_SECRET")) {
        return (synth(403, "Forbidden"));
    }
    if (!req.http.xkey-purge && !req.http.xkey-softpurge) {
        return (synth(400, "Name the keys in xkey-purge or xkey-softpurge"));
    }
    set req.http.x-pyisr-purged = 0;
    if (req.http.xkey-purge) {
        set req.http.x-pyisr-purged = std.integer(req.http.x-pyisr-purged, 0)
            + xkey.purge(req.http.xkey-purge);
    }
    if (req.http.xkey-softpurge) {
        set req.http.x-pyisr-purged = std.integer(req.http.x-pyisr-purged, 0)
            + xkey.softpurge(req.http.xkey-softpurge);
    }
    return (synth(200, "Purged"));
}

# Accept-Encoding reduced to what pyisr stores: br, gzip, or nothing. Kept in a header of
# our own because Varnish rewrites Accept-Encoding itself (to gzip or nothing) after
# vcl_recv; the response's `Vary: Accept-Encoding` is pointed at it (vcl_backend_response).
sub pyisr_encoding {
    if (req.http.Accept-Encoding ~ "(?i)(^|,)\s*br\s*(,|;\s*q=(1|0?\.0*[1-9])|$)") {
        set req.http.X-Pyisr-Edge-Encoding = "br";
    } elsif (req.http.Accept-Encoding ~ "(?i)(^|,)\s*(x-)?gzip\s*(,|;\s*q=(1|0?\.0*[1-9])|$)") {
        set req.http.X-Pyisr-Edge-Encoding = "gzip";
    }
}

sub vcl_hit {
    if (obj.ttl <= 0s) {
        # Within grace: served now, refreshed in the background (one fetch at a time).
        set req.http.X-Pyisr-Edge = "hit; fwd=stale";
    } else {
        set req.http.X-Pyisr-Edge = "hit";
    }
}

sub vcl_miss {
    set req.http.X-Pyisr-Edge = "fwd=miss";
}

sub vcl_backend_fetch {
    # Ask for the encoding the visitor's copy is kept in (Varnish would ask for gzip);
    # a bypass keeps the visitor's own Accept-Encoding.
    if (bereq.http.X-Pyisr-Edge !~ "^bypass") {
        if (bereq.http.X-Pyisr-Edge-Encoding) {
            set bereq.http.Accept-Encoding = bereq.http.X-Pyisr-Edge-Encoding;
        } else {
            unset bereq.http.Accept-Encoding;
        }
    }
    unset bereq.http.X-Pyisr-Edge;
}

sub vcl_backend_response {
    if (bereq.uncacheable) {
        return (deliver);
    }
    # A background refresh that failed keeps the stale copy (pyisr keeps its last good
    # page too; it answers 500 only when it has none).
    if (beresp.status >= 500 && bereq.is_bgfetch) {
        return (abandon);
    }
    # Never shared: what pyisr (or the app behind it) answered for one visitor, and what
    # says nothing about caching (a file from public/, with its Last-Modified, is kept for
    # Varnish's default_ttl, two minutes).
    if (beresp.http.Set-Cookie
        || beresp.http.Cache-Control ~ "(?i)(^|,)\s*(private|no-store|no-cache)\b"
        || beresp.http.Vary == "*"
        || (!beresp.http.Cache-Control && !beresp.http.Expires && !beresp.http.Last-Modified)) {
        call pyisr_not_kept;
    }
    # pyisr answered its own stale copy (it is re-rendering it, e.g. after
    # `revalidate_tag(tag, stale=True)`): keep it only as a stale copy, so the next
    # visitor still gets it at once while Varnish asks pyisr again in the background.
    # (1ms, not 0s: Varnish never looks up an object whose TTL is zero, grace or not.)
    if (beresp.http.x-pyisr-cache == "STALE") {
        set beresp.ttl = 1ms;
        if (beresp.grace < 10s) {
            set beresp.grace = 10s;
        }
    }
    # Already past its s-maxage (an Age beyond it), and not pyisr's stale copy: not kept.
    if (beresp.ttl <= 0s) {
        call pyisr_not_kept;
    }
    # The keys xkey indexes this object under: pyisr's tags, as sent in Surrogate-Key.
    if (beresp.http.Surrogate-Key) {
        set beresp.http.xkey = beresp.http.Surrogate-Key;
    }
    # One copy per encoding (see pyisr_encoding), never one per visitor's cookies: a
    # page pyisr cached was rendered without them (a framework's `Vary: Cookie` comes
    # from reading the session to decide bypass; session holders were passed above).
    if (beresp.http.Vary) {
        set beresp.http.Vary = regsuball(beresp.http.Vary, "(?i)\baccept-encoding\b", "X-Pyisr-Edge-Encoding");
        if (beresp.http.x-pyisr-cache) {
            set beresp.http.Vary = regsuball(beresp.http.Vary, "(?i)(^|,)\s*cookie\s*(?=,|$)", "");
            set beresp.http.Vary = regsub(beresp.http.Vary, "^[\s,]+", "");
            if (beresp.http.Vary == "") {
                unset beresp.http.Vary;
            }
        }
    }
    return (deliver);
}

# Remembered as uncacheable for a minute ("hit-for-miss"): requests for it are not queued
# behind each other, and a later shareable answer is cached again at once.
sub pyisr_not_kept {
    set beresp.uncacheable = true;
    set beresp.ttl = 60s;
    set beresp.grace = 0s;
    return (deliver);
}

sub vcl_backend_error {
    # pyisr unreachable while refreshing in the background: keep serving the stale copy.
    if (bereq.is_bgfetch) {
        return (abandon);
    }
}

sub vcl_deliver {
    # Visitors see the response's own `Vary: Accept-Encoding` again (Varnish appends one of
    # its own to gzip objects: one is enough).
    if (resp.http.Vary ~ "(?i)\bx-pyisr-edge-encoding\b") {
        set resp.http.Vary = regsuball(resp.http.Vary, "(?i)(^|,)\s*accept-encoding\s*(?=,|$)", "");
        set resp.http.Vary = regsub(resp.http.Vary, "^[\s,]+", "");
        set resp.http.Vary = regsuball(resp.http.Vary, "(?i)\bx-pyisr-edge-encoding\b", "Accept-Encoding");
    }
    # RFC 9211: this cache's word after pyisr's ("pyisr; hit, varnish; hit").
    if (!req.http.X-Pyisr-Edge) {
        set req.http.X-Pyisr-Edge = "fwd=bypass";
    }
    if (resp.http.Cache-Status) {
        set resp.http.Cache-Status = resp.http.Cache-Status + ", varnish; " + req.http.X-Pyisr-Edge;
    } else {
        set resp.http.Cache-Status = "varnish; " + req.http.X-Pyisr-Edge;
    }
    # The tags name how a site is built (tables, ids, layouts): kept from visitors, shown
    # to a purger asking with `x-pyisr-debug: 1`. (With a CDN in front of this Varnish,
    # keep the header it purges by: Cache-Tag for Cloudflare, Surrogate-Key for Fastly.)
    unset resp.http.xkey;
    if (!req.http.x-pyisr-debug) {
        unset resp.http.Surrogate-Key;
        unset resp.http.Cache-Tag;
    }
}

sub vcl_synth {
    if (req.method == "PURGE") {
        if (resp.status == 200) {
            set resp.http.x-pyisr-purged = req.http.x-pyisr-purged;
        }
        set resp.http.Content-Type = "text/plain; charset=utf-8";
        set resp.body = resp.reason + {"
"};
        return (deliver);
    }
}
