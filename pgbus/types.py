"""Types that plugins and handlers are written against (re-exported from where they live).

.. versionadded:: 0.1.0
"""

from __future__ import annotations

from pgbus._events import Decoder, Encoder, Outgoing
from pgbus._subscription import CallNext, Handler, Middleware, Router

__all__ = ["CallNext", "Decoder", "Encoder", "Handler", "Middleware", "Outgoing", "Router"]
