"""The ASGI app `ich serve` runs: MLflow's own scoring server for the verified soup model, behind a guard on request
bodies.

MLflow's scoring server parses the JSON body before the model sees it, and two bodies make that parse raise
something other than its "invalid input" error, so the client got a 500: JSON nested deeper than Python's
recursion limit (RecursionError) and an integer of over 4,300 digits (ValueError). `bounded_bodies` reads each
/invocations body first and answers those, and bodies over a byte cap, with one 400 in MLflow's error format
({"error_code": "BAD_REQUEST", "message": ...}, no stack trace); anything else goes to MLflow's app unchanged.

Run as `uvicorn soups.serve.app:app` with the verified model folder in MLflow's own variable (what `mlflow
models serve --env-manager local` runs, with this module in place of mlflow.pyfunc.scoring_server.app).
"""
from __future__ import annotations

import json
import os
import re

from mlflow.pyfunc import scoring_server

from soups.serve import inputs
from soups.serve.inputs import REQUEST_STARTED, InputPolicy

MAX_BODY_DEPTH = 32  # a dataframe_split body nests 4 deep
MAX_DIGITS = 4300  # Python's int-from-text limit: a longer integer is a ValueError inside MLflow's parse
_STRING = re.compile(rb'"(?:[^"\\]|\\.)*"')
_LONG_NUMBER = re.compile(rb"[0-9]{%d,}" % (MAX_DIGITS + 1))


def max_body_bytes(policy: InputPolicy) -> int:
    """Base64 of the request's byte cap (4/3 of it) plus 1 MiB of JSON around it."""
    return policy.max_request_bytes * 4 // 3 + (1 << 20)


def body_problem(body: bytes, max_bytes: int) -> str | None:
    """Why a request body is refused before MLflow parses it, or None."""
    if len(body) > max_bytes:
        return _too_large(max_bytes)
    outside = _STRING.sub(b"", body)  # base64 and names: strings hold no nesting and no numbers
    depth = deepest = 0
    for c in outside.translate(None, delete=bytes(set(range(256)) - set(b"[]{}"))):
        depth += 1 if c in b"[{" else -1
        if depth > deepest:
            deepest = depth
            if deepest > MAX_BODY_DEPTH:
                return f"request body nested over {MAX_BODY_DEPTH} levels deep"
    if _LONG_NUMBER.search(outside):
        return f"request body holds a number of over {MAX_DIGITS} digits"
    return None


def _too_large(max_bytes: int) -> str:
    return f"request body over {max_bytes} bytes (the cap: ICH_SERVE_MAX_REQUEST_BYTES * 4/3 + 1 MiB)"


def bounded_bodies(app, max_bytes: int):
    """An ASGI app: `app`, with /invocations bodies checked by body_problem first (a refusal: one 400)."""
    async def guarded(scope, receive, send):
        if scope["type"] != "http" or scope.get("path") != "/invocations":
            return await app(scope, receive, send)
        REQUEST_STARTED.set(inputs.now())  # the decode budget counts from here (asyncio.to_thread, where MLflow runs
        # the model, copies this context)
        chunks, size, more = [], 0, True
        while more:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > max_bytes:  # stop reading: the rest is never buffered
                return await _refuse(send, _too_large(max_bytes))
            chunks.append(chunk)
            more = message.get("more_body", False)
        body = b"".join(chunks)
        if problem := body_problem(body, max_bytes):
            return await _refuse(send, problem)
        sent = False

        async def replay():
            nonlocal sent
            if not sent:
                sent = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()  # after the body: wait for the disconnect, as the server would

        return await app(scope, replay, send)
    return guarded


async def _refuse(send, problem: str) -> None:
    content = json.dumps({"error_code": "BAD_REQUEST", "message": f"Invalid input: {problem}"}).encode()
    await send({"type": "http.response.start", "status": 400,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(content)).encode())]})
    await send({"type": "http.response.body", "body": content})


def _make_app():
    model = scoring_server.load_model_with_mlflow_config(os.environ[scoring_server._SERVER_MODEL_PATH])
    return bounded_bodies(scoring_server.init(model), max_body_bytes(InputPolicy.from_env()))


app = _make_app() if os.environ.get(scoring_server._SERVER_MODEL_PATH) else None  # uvicorn's import, in the server
