"""Serving a soup: inputs (request images bounded) ─▶ model (the pyfunc model, its own code) ◀ log (save_pyfunc: the
pyfunc folder written around a verified soup record) · verify (what is served or predicted is checked first) · app
(`ich serve`'s ASGI app).
"""
