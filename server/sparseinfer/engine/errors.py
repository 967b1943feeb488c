"""The engine's typed errors: what a caller (the CLI, the server's batcher) needs to know to react.

- ``InvalidRequest``: the request can never run as given; ``field`` names the parameter at fault, so the
  server can answer INVALID_ARGUMENT with the field's wire path without reading the message.
- ``RequestFailed``: one request failed inside a step that went on for the others (its logits were not
  finite, or its own sampler or detokenizer raised). It takes the place of that request's event; the request
  has ended and its cache slot is free.
- ``StepFailed``: the step as a whole raised. ``committed`` says whether the model forward had completed
  (every row's cache position and sparsity tally advanced, so the rows' state is no longer what it was)
  or not (nothing changed: the same sequences may be stepped again, e.g. one at a time to find the one that
  fails).
"""

from __future__ import annotations

from typing import Any


class InvalidRequest(ValueError):
    """A request the engine refuses; ``field`` is the parameter at fault, ``detail`` what is wrong with it
    (``str(error)`` is ``message``, by default ``f"{field} {detail}"``)."""

    def __init__(self, field: str, detail: str, message: str | None = None) -> None:
        super().__init__(message if message is not None else f"{field} {detail}")
        self.field = field
        self.detail = detail


class RequestFailed(RuntimeError):
    """One request's failure within a step; its batch-mates were not affected."""

    def __init__(self, request_id: Any, reason: str) -> None:
        super().__init__(reason)
        self.request_id = request_id
        self.reason = reason


class StepFailed(RuntimeError):
    """A whole step raised (the cause is chained as ``__cause__``); see the module docstring for
    ``committed``."""

    def __init__(self, kind: str, committed: bool, cause: BaseException) -> None:
        super().__init__(f"the {kind} step failed ({'after' if committed else 'before'} its forward "
                         f"committed): {cause!r}")  # fmt: skip
        self.kind = kind
        self.committed = committed
