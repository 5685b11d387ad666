"""The registry room: what lives in Redis and how a replica reads it.

- `store.py`: `Registry` (adapters in Redis: chunked blobs, versions, events), `AdapterRecord`, its errors
- `embedded.py`: the supervised embedded redis-server used when `REDIS_URL` is unset
- `adapters.py`: adapter id (+ tenant) -> `AdapterRef` with host-side deltas (record cache, host tier)

Imports `adapters`, `server.config`, `server.engine.request`/`errors` (the types it hands over); never `server.api`.
"""
