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


# RequestOutput.error_type of a request failed because its adapter was quarantined (else "internal_error").
ADAPTER_QUARANTINED = "adapter_quarantined"
