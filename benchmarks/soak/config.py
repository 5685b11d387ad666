"""The soak's settings, fixed constants and the records its parts pass around."""
from __future__ import annotations

from dataclasses import dataclass, field


TENANTS = {"alpha": "soak-key-alpha", "beta": "soak-key-beta"}
ADMIN_TOKEN = "soak-admin-token"
PROMPTS = ("The soak test", "Adapters churn while", "x", "Redis is killed twice and the server keeps serving")
RANKS = (2, 4, 8, 16, 32, 64)
TARGET_SETS = (("q_proj", "v_proj"), ("q_proj", "k_proj", "v_proj", "o_proj"), ("gate_proj", "up_proj", "down_proj"),
               ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"))
CROSS_TENANT_FRACTION = 0.03  # requests for the other tenant's adapter: 404, always
BASE_FRACTION = 0.08  # requests for the base model
STREAM_FRACTION = 0.5
REDIS_DOWN_MARGIN_S = 1.0  # a 503 this long after recovery was seen still counts as the outage's
STARTUP_TIMEOUT_S = 300
ABSENT = -1  # the state of a deleted adapter (variants are 0..num_variants-1)


@dataclass(frozen=True)
class SoakConfig:
    model: str = "tiny"
    duration_s: float = 300.0
    num_clients: int = 32
    num_adapters: int = 12
    num_variants: int = 3
    max_adapter_slots: int = 4
    max_tokens: int = 16
    churn_interval_s: float = 3.0
    gone_s: float = 1.0
    num_redis_kills: int = 2
    request_timeout_s: float = 120.0
    max_rss_growth: float = 0.25  # of the start RSS, plus RSS_SLACK_BYTES
    seed: int = 0


RSS_SLACK_BYTES = 32 << 20  # allocator noise on a process of ~500 MB: arenas grown by a burst are not all returned
RSS_SAMPLE_S = 10.0


@dataclass
class Adapter:
    adapter_id: str
    rank: int
    targets: tuple[str, ...]
    tenant: str | None  # None: public
    archives: list[bytes] = field(default_factory=list)  # per variant: a .tar.gz of its format-1 directory


@dataclass
class Change:
    """One admin operation on an adapter: its state moved from `old` to `new` at some moment of [sent, done]."""

    sent: float
    done: float
    old: int
    new: int


@dataclass
class Outcome:
    client: int
    tenant: str
    adapter_id: str | None
    prompt: int
    stream: bool
    sent: float
    done: float
    status: int | None  # None: no HTTP answer
    error_type: str | None = None
    text: str | None = None
    detail: str | None = None
