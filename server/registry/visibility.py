"""Which adapters a tenant may use (`visible`): an adapter uploaded for a tenant is usable only with that tenant's
key; public adapters, adapters without an owner and the base model are usable by all. Callers answer an invisible
adapter with 404, as if it did not exist, so that ids do not leak between tenants.
"""
from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from server.registry.store import AdapterRecord


def visible(entry: AdapterRecord | Mapping[str, Any], tenant: str | None) -> bool:
    """May `tenant` (None: no key, open mode) use this adapter? `entry`: a registry record or its JSON form."""
    if isinstance(entry, AdapterRecord):
        owner, public = entry.tenant, entry.public
    else:
        owner, public = entry.get("tenant"), bool(entry.get("public"))
    return public or owner is None or owner == tenant
