"""The counters engine: DIAL's limit rules at run time (:mod:`.limiter`: a request's
admission and settlement over its scopes' windows), the counters in this process's memory
(:mod:`.counters`) or in Redis (:mod:`.rediscounters`), and what the limits mean while the
shared storage fails (:mod:`.storage`).  Which windows a grant counts in is the config's
(``config/grants.py``): resolved when a snapshot is built."""
