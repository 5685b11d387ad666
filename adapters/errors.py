"""The one error every adapter check raises (the admin API answers it with 422 and its message)."""
from __future__ import annotations


class ArtifactError(ValueError):
    """An adapter that cannot be served as is; the message names the file, field, module or tensor and the problem."""
