"""Serving a soup: inputs (request images bounded) ─▶ model (the pyfunc model, logged as its own code) ◀ log
(log_pyfunc, signed as stored) · verify (what is served or predicted is checked first) · app (`ich serve`'s ASGI app).
"""
