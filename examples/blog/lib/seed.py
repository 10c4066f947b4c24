"""The 25 posts the blog starts with (the seeds' "there are 25 in this example").

Deterministic: the same titles, authors, dates and text on every machine, so a fresh
database always looks the same and tests can name what they expect to see.
"""

from __future__ import annotations

AUTHORS = ("Ada Moreau", "Ben Okafor", "Chloe Lindqvist", "Dev Raman", "Elena Sato")

# (title, paragraphs)
POSTS: list[tuple[str, tuple[str, ...]]] = [
    (
        "Hello, Incremental Static Regeneration",
        (
            "Static pages are fast and cheap to serve, but they go out of date the moment the "
            "content behind them changes. Incremental Static Regeneration keeps the speed and "
            "fixes the staleness: pages are served from a cache and rebuilt in the background.",
            "This blog is built that way. Every post you read here was rendered ahead of time, "
            "and each one quietly refreshes itself at most once a minute.",
        ),
    ),
    (
        "Why Stale-While-Revalidate Feels Instant",
        (
            "When a cached page is older than its window, the next visitor still gets the old "
            "copy immediately. Only then does the server start rendering a fresh one.",
            "Nobody waits for a render on the hot path. The price is that one visitor sees "
            "content that is a little old, which for a blog is almost always fine.",
        ),
    ),
    (
        "Choosing a Revalidation Window",
        (
            "Shorter windows mean fresher pages and more renders. Longer windows mean fewer "
            "renders and older pages. An hour is a sensible default for an index page.",
            "If you need precision rather than frequency, reach for on-demand revalidation "
            "instead of shrinking the window to a second.",
        ),
    ),
    (
        "On-Demand Revalidation in Practice",
        (
            "A webhook from your CMS can tell the site exactly which page changed. The site "
            "regenerates that one page and the next visitor sees the update.",
            "Protect the endpoint with a secret token: anyone who can call it can make your "
            "server render pages.",
        ),
    ),
    (
        "Tagging Your Data",
        (
            "Tags name the data a page depends on. Invalidate the tag and every page that read "
            "that data is rebuilt on its next request, however many there are.",
            "One write to the tag manifest is all it costs, no matter how large the site.",
        ),
    ),
    (
        "A Field Guide to Cache-Control",
        (
            "s-maxage tells shared caches how long a response is fresh; stale-while-revalidate "
            "tells them how long they may keep serving it while they fetch a new copy.",
            "Private, no-store responses never touch a shared cache at all.",
        ),
    ),
    (
        "SQLite Is a Perfectly Good Blog Database",
        (
            "A single file, no server, transactions, and decades of testing. For a blog with a "
            "few thousand posts it is more than enough.",
            "Put the data cache in front of it and most requests never open the file at all.",
        ),
    ),
    (
        "What Happens When a Render Fails",
        (
            "If regenerating a page throws, the last good version keeps being served. The "
            "failure is logged and the server tries again on a later request.",
            "Your readers never see a half-built page because the database blinked.",
        ),
    ),
    (
        "Prerendering Twenty-Five Pages in a Blink",
        (
            "The build renders every known page concurrently and writes them to the cache, so "
            "the very first visitor gets a cache hit.",
            "Pages nobody knew about at build time are rendered on their first request and "
            "cached from then on.",
        ),
    ),
    (
        "Fallback Pages, Blocking and Otherwise",
        (
            "With a blocking fallback, an unknown path is rendered while the visitor waits, "
            "exactly like a server-rendered page, and then cached.",
            "With a non-blocking fallback, the visitor gets a loading shell first and the real "
            "page replaces it when it is ready.",
        ),
    ),
    (
        "Dynamic Params Without Surprises",
        (
            "Decide up front what an unknown id means. If new posts can appear at any time, "
            "render them on demand. If the set is closed, answer 404.",
            "Either way, write it down in the page module where the next reader will look.",
        ),
    ),
    (
        "ETags and the Humble 304",
        (
            "A strong ETag lets a browser ask whether its copy is still good. When it is, the "
            "server answers with a tiny 304 and no body.",
            "Cached pages make this nearly free: the tag was computed when the page was stored.",
        ),
    ),
    (
        "Measuring the Hit Path",
        (
            "A cache hit should do no template work, no parsing and ideally no disk read. "
            "Measure it under load before you trust it.",
            "The numbers that matter are the tail latencies, not the average.",
        ),
    ),
    (
        "Layouts, Templates and a Little CSS",
        (
            "A shared layout template keeps the header, navigation and footer in one place. "
            "Each page fills in its own content block.",
            "A small stylesheet served as a static file does the rest.",
        ),
    ),
    (
        "Server Actions, the Python Way",
        (
            "An admin form posts to a route handler. The handler writes the new post and "
            "invalidates the posts tag, then redirects back to the blog.",
            "The next request for the list renders it fresh, with the new post at the top.",
        ),
    ),
    (
        "Debugging a Cache You Cannot See",
        (
            "Turn on cache debugging and every decision is logged with its key first: hit, "
            "stale, miss, regenerate.",
            "Grep for a path and you have its whole history.",
        ),
    ),
    (
        "Caching Fetches Like a Browser Would Not",
        (
            "A data cache for HTTP calls remembers responses across requests and processes. "
            "Only successful responses are stored.",
            "Give each fetch the tags of the data it returns and you can invalidate it by name.",
        ),
    ),
    (
        "Surviving a Restart",
        (
            "A filesystem cache outlives the process. Restart the server and pages keep their "
            "age and their revalidation windows.",
            "Tag invalidations are stored too, so nothing you invalidated comes back from the dead.",
        ),
    ),
    (
        "One Cache, Many Workers",
        (
            "Several worker processes can share one cache directory. A lock makes sure only one "
            "of them regenerates a stale page.",
            "The others keep serving the stale copy until the new one lands.",
        ),
    ),
    (
        "Writing for the Reader Who Arrives Late",
        (
            "Most visitors come from search, months after you published. Write posts that "
            "still make sense without the context of the week they were written.",
            "Date every post, and say what changed when you update one.",
        ),
    ),
    (
        "The Case for Boring Technology",
        (
            "Templates, a relational database and a cache in front: nothing here is new, and "
            "that is the point.",
            "Boring parts fail in well-understood ways and are easy to hire for.",
        ),
    ),
    (
        "Accessibility Starts With Plain HTML",
        (
            "Headings in order, real links, labels on form fields and enough contrast will get "
            "you most of the way there.",
            "Static HTML is also the fastest thing a browser can render.",
        ),
    ),
    (
        "Keeping Secrets Out of the Repository",
        (
            "Revalidation tokens and database passwords belong in the environment, not in the "
            "configuration file you commit.",
            "Rotate them like any other credential.",
        ),
    ),
    (
        "From Prototype to Production",
        (
            "Build once, start the server, and watch the cache headers with curl. If every "
            "request says HIT, you are done.",
            "If not, the debug log will tell you why.",
        ),
    ),
    (
        "What Comes After Post Twenty-Five",
        (
            "The twenty-sixth post was not known at build time. Its page is generated the first "
            "time someone asks for it, and cached from then on.",
            "Write it with the admin form and see for yourself.",
        ),
    ),
]

assert len(POSTS) == 25


def rows() -> list[tuple[int, str, str, str, str]]:
    """``(id, title, content, author, published)`` for each seed post, oldest first."""
    out = []
    for index, (title, paragraphs) in enumerate(POSTS):
        post_id = index + 1
        month, day = divmod(index * 12, 28)  # two or three posts a month through 2024
        published = f"2024-{month + 1:02d}-{day + 1:02d}"
        author = AUTHORS[index % len(AUTHORS)]
        out.append((post_id, title, "\n\n".join(paragraphs), author, published))
    return out
