"""Request checks apart from the routes: a body within its size limit, a job's webhook and policy, refusals as JSON."""

from __future__ import annotations

import json
import logging
import os
from typing import Any

from aiohttp import ClientPayloadError, web

from schemas.hosts import check_url
from schemas.limits import DocumentError, parse_json

log = logging.getLogger("ftw.endpoint")
MB = 1024 * 1024
DAY_MS = 24 * 3600 * 1000


def fail(status: int, message: str) -> web.HTTPException:
    cls = {
        400: web.HTTPBadRequest,
        401: web.HTTPUnauthorized,
        404: web.HTTPNotFound,
        409: web.HTTPConflict,
        413: web.HTTPRequestEntityTooLarge,
    }[status]
    kwargs = {"max_size": 0, "actual_size": 0} if status == 413 else {}
    return cls(text=json.dumps({"error": message}), content_type="application/json", **kwargs)


@web.middleware
async def json_errors(request: web.Request, handler):
    """Every refusal as JSON; an unexpected exception is a 500 that the server survives."""
    try:
        return await handler(request)
    except web.HTTPException as e:
        if e.content_type == "application/json" or e.status < 400:
            raise
        reason = e.text if e.text and not e.text.startswith(f"{e.status}:") else e.reason
        if e.status == 413:
            reason = f"request body too large ({reason})"
        return web.json_response({"error": reason}, status=e.status)
    except Exception:
        log.exception("internal error on %s %s", request.method, request.path)
        return web.json_response({"error": "internal error of the endpoint (see its log)"}, status=500)


async def read_json(request: web.Request, limit: int, strict: bool = True) -> Any:
    if request.content_length is not None and request.content_length > limit:
        raise fail(
            413,
            f"request body of {request.content_length} bytes is over the {limit // MB} MB limit "
            "of this route; put large data in S3 and pass its URI",
        )
    try:
        body = await request.read()
    except (ConnectionResetError, ClientPayloadError) as e:  # the client went away mid-upload: nothing to do
        log.info(
            "%s %s: the client closed the connection before its body arrived (%s)",
            request.method,
            request.path,
            type(e).__name__,
        )
        raise fail(400, "request body incomplete: the connection closed before all of it arrived") from None
    if len(body) > limit:
        raise fail(413, f"request body of {len(body)} bytes is over the {limit // MB} MB limit of this route")
    try:
        return parse_json(body, "request body", limit, strict)
    except DocumentError as e:
        raise fail(400, str(e)) from None


def parse_request(
    body: Any, default_execution_timeout_ms: int, default_ttl_ms: int
) -> tuple[dict[str, Any], str | None, int, int]:
    """The job a /run or /runsync body asks for: (payload, webhook, executionTimeout ms, ttl ms)."""
    if not isinstance(body, dict):
        raise fail(400, 'request body must be a JSON object like {"input": {...}}')
    if body.get("input") is None:
        raise fail(400, "request body has no 'input': the job goes under the key input")
    webhook = body.get("webhook")
    if webhook is not None:
        if not isinstance(webhook, str) or not webhook.startswith(("http://", "https://")):
            raise fail(400, f"webhook must be an http(s) URL, got {str(webhook)[:200]!r}")
        problem = check_url(webhook, os.environ, "webhook")
        if problem:
            raise fail(400, problem)
    policy = {} if body.get("policy") is None else body["policy"]
    if not isinstance(policy, dict):
        raise fail(400, 'policy must be an object: {"executionTimeout": ms, "ttl": ms}')
    execution_timeout = _policy_ms(policy, "executionTimeout", default_execution_timeout_ms, low=5001, high=7 * DAY_MS)
    ttl = _policy_ms(policy, "ttl", default_ttl_ms, low=10_000, high=7 * DAY_MS)
    payload = {"input": body["input"]}
    if body.get("s3Config") is not None:
        if not isinstance(body["s3Config"], dict):
            raise fail(400, "s3Config must be an object: {accessId, accessSecret, bucketName, endpointUrl}")
        payload["s3Config"] = body["s3Config"]
    return payload, webhook, execution_timeout, ttl


def _policy_ms(policy: dict[str, Any], key: str, default: int, low: int, high: int) -> int:
    value = policy.get(key, default)
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise fail(400, f"policy.{key} must be an integer number of milliseconds in [{low}, {high}], got {value!r}")
    return value
