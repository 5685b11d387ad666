"""Errors the engine raises for something the caller (or their adapter) did; the API maps each to an HTTP status."""


class EngineError(Exception):
    status_code = 500
    error_type = "internal_error"


class UnknownAdapterError(EngineError):
    status_code = 404
    error_type = "adapter_not_found"


class PromptTooLongError(EngineError):
    status_code = 400
    error_type = "invalid_request_error"


class EngineOverloadedError(EngineError):
    status_code = 503
    error_type = "overloaded"


class InvalidAdapterError(EngineError):
    status_code = 422
    error_type = "invalid_adapter"


class AdapterQuarantinedError(InvalidAdapterError):
    """This adapter version made the engine fail and is refused until a new version is uploaded (422, like any
    adapter that cannot be served: retrying the same version cannot succeed, so not 503)."""

    error_type = "adapter_quarantined"
