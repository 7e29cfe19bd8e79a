"""The HTTP side's refusals, one hierarchy: each knows its status, its `error_type` and the
`tgi_request_failure` label it counts under; the error middleware answers them all, in TGI's
error shape `{"error": ..., "error_type": ...}`."""


class ApiError(Exception):
    status = 500
    error_type = "internal"
    failure: str | None = None  # the tgi_request_failure label, if it counts as a failure
    prefix = ""  # put before the message in the response

    def __init__(self, message: str):
        super().__init__(message)
        self.message = message

    @property
    def text(self) -> str:
        return self.prefix + self.message


class ValidationError(ApiError, ValueError):
    """A request the API refuses (422, "Input validation error: ...")."""

    status, error_type, failure, prefix = 422, "validation", "validation", "Input validation error: "


class TemplateError(ApiError, ValueError):
    """The chat template is missing or failed to render (422)."""

    status, error_type, failure, prefix = 422, "template_error", "template", "Template error: "


class Overloaded(ApiError):
    """More than --max-concurrent-requests in flight (429)."""

    status, error_type, failure = 429, "overloaded", "overloaded"

    def __init__(self):
        super().__init__("Model is overloaded")


class OpenAIError(ApiError):
    """An OpenAI-route refusal with its own `error_type` (counted as a validation failure, as TGI does)."""

    failure = "validation"

    def __init__(self, message: str, error_type: str, status: int = 422):
        super().__init__(message)
        self.error_type, self.status = error_type, status
