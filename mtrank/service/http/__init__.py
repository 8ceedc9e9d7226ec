"""The HTTP edge of the service (docs/architecture.md §5), one job per module:

- :mod:`.middleware`: the one wrapper around every request, which applies the pieces below;
- :mod:`.request_id`: the request id (``X-Request-ID`` in, checked, echoed or replaced);
- :mod:`.body`: reading the body within the request's deadline and size limit;
- :mod:`.disconnect`: dropping work whose client hung up;
- :mod:`.access_log`: the one log line of a request;
- :mod:`.errors`: exceptions → JSON answers (4xx, 503, 504, and the 500 of a server fault);
- :mod:`.rank`: ``POST /v1/rank``, which calls the ranker;
- :mod:`.auth`: the admin endpoint's bearer token.
"""
