"""What the engine refuses, as plain domain exceptions: they say what went wrong, not how HTTP answers it (that is
server/api/errors.py's table)."""


class EngineError(Exception):
    """Something the engine cannot do; subclasses say why (the base class itself: a bug, answered as internal)."""


class UnknownAdapterError(EngineError):
    """No such adapter, or not one this tenant may use (never said apart, so that ids do not leak)."""


class PromptTooLongError(EngineError):
    """The prompt is empty or leaves no room for a token within the model's context."""


class EngineOverloadedError(EngineError):
    """The queue is at its limit; retrying later can succeed."""


class TenantOverloadedError(EngineOverloadedError):
    """This tenant already has as many requests in flight as one tenant may; retrying later can succeed."""


class InvalidAdapterError(EngineError):
    """This adapter cannot be served by this backbone or device pool; retrying the same version cannot succeed."""


class AdapterQuarantinedError(InvalidAdapterError):
    """This adapter version made the engine fail and is refused until a new version is uploaded."""


class AdapterOverflowError(InvalidAdapterError):
    """This request's adapter made its logits not finite (NaN or infinity): its values overflow the model's dtype on
    this input. Only the request fails; the adapter stays served (another tenant's prompt must not be able to take a
    public adapter away from everyone)."""


# RequestOutput.error_type of a request failed because of its adapter (else "internal_error"): quarantined, or its
# logits were not finite.
ADAPTER_QUARANTINED = "adapter_quarantined"
ADAPTER_OVERFLOW = "adapter_overflow"
