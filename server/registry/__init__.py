"""The registry room: what lives in Redis and how a replica reads it.

- `store.py`: `Registry` (adapters in Redis: chunked blobs, versions, events), `AdapterRecord`, its errors
- `embedded.py`: the supervised embedded redis-server used when `REDIS_URL` is unset
- `adapters.py`: adapter id (+ tenant) -> `AdapterRef` with host-side deltas (record cache, host tier)
- `api_keys.py`: `ApiKeyStore` (API keys -> tenants, by digest), `MULTIPLEX_API_KEYS`, the tenant pattern
- `visibility.py`: `visible`, which adapters a tenant may use

Imports `adapters`, `server.config`, `server.engine.request`/`errors` (the types it hands over); never `server.api`.
"""
