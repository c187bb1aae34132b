"""Shared keys (after AI Horde): keys that a ``canShare`` key hands out to others.

A shared key acts with its owner's project and roles: it is bound by the owner's limits,
per-key quotas and model restriction, and consumes the owner's counters.  Its own ``tokens``
cap (-1: none) stops it, and only it, once ``utilized >= tokens``.  It is tied to its owner
by the owner key's digest, which is looked up in the *current* config snapshot on every
request: when the owner key is removed, disabled, expired or loses ``canShare``, its shared
keys stop working with it.

The secret (``dps_`` + 43 base62 characters) is shown once, when the key is created; stores
keep only its SHA-256.  Two stores behind one protocol, chosen by the counter storage:
SQLite (stdlib; one proxy process per file, for memory counters) and Redis (every instance
sees the same keys).  While Redis is down (the counters' :class:`StorageHealth`, shared),
lookups follow the ``--storage-failure`` policy without waiting for it (see
:class:`SharedKeys`).

HTTP: ``POST/GET /v1/sharedkeys``, ``GET/PATCH/DELETE /v1/sharedkeys/{id}``, for the owner
key only (a shared key is refused with 403).

The rooms: :mod:`.model` (the key and its rules), :mod:`.store` (the store protocol),
:mod:`.sqlite` and :mod:`.redisstore` (the two stores), :mod:`.service` (what the app holds:
lookups under the outage policy, reserve and record); the handlers and the app wiring are in
:mod:`dialproxy.web.sharedkeys`.  Nothing here imports the web layer or :mod:`dialproxy.auth`.
"""
