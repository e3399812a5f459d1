"""Serving a soup: inputs (request images bounded) ─▶ model (the pyfunc model, its own code) ◀ pyfunc_folder
(save_pyfunc: the pyfunc folder written around a verified soup) ◀ verify (what is served or predicted is checked
first) ◀ log (log_pyfunc: how older versions were logged) · app (`ich serve`'s ASGI app).
"""
