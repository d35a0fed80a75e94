"""The OpenAI-compatible HTTP server (``flashlm serve``): :mod:`flashlm.server.app` (routes,
limits, streaming) over :mod:`flashlm.server.protocol` (the wire format) and the engine loop
of :mod:`flashlm.runtime.scheduler`. Needs the ``serve`` extra (starlette, uvicorn)."""
