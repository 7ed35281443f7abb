"""The OpenAPI 3.0 description of the HTTP API (served at ``GET /openapi.json``)."""

from __future__ import annotations

from typing import Any

from bridge import __version__


def _json(schema: dict[str, Any], description: str) -> dict[str, Any]:
    return {"description": description, "content": {"application/json": {"schema": schema}}}


def _ref(name: str) -> dict[str, Any]:
    return {"$ref": f"#/components/schemas/{name}"}


_PROBLEM = _json(_ref("Problem"), "Error")
_AUTH = {
    "401": _json(_ref("Problem"), "No or unknown bearer token"),
    "403": _json(_ref("Problem"), "Outside the token's scope"),
}


def spec() -> dict[str, Any]:
    scf_error = _json(
        _ref("InvocationError"), "The invocation failed; the status code keeps its error class"
    )
    return {
        "openapi": "3.0.3",
        "info": {
            "title": "event-bridge API",
            "version": __version__,
            "description": "SCF-style Invoke API, health, metrics, status and dead letters of one event-bridge daemon.",
        },
        "components": {
            "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}},
            "schemas": {
                "Problem": {
                    "type": "object",
                    "required": ["error"],
                    "properties": {
                        "error": {
                            "type": "object",
                            "required": ["code", "message"],
                            "properties": {
                                "code": {"type": "string"},
                                "message": {"type": "string"},
                            },
                        }
                    },
                },
                "InvocationError": {
                    "type": "object",
                    "required": ["errorCode", "errorMessage", "errorType", "errorClass"],
                    "properties": {
                        "errorCode": {"type": "integer"},
                        "errorMessage": {"type": "string"},
                        "errorType": {"type": "string"},
                        "errorClass": {
                            "type": "string",
                            "enum": [
                                "invalid_request",
                                "throttled",
                                "function_error",
                                "system_error",
                            ],
                        },
                        "requestId": {"type": "string"},
                        "stackTrace": {"type": "string"},
                    },
                },
                "Accepted": {
                    "type": "object",
                    "required": ["RequestId", "accepted"],
                    "properties": {
                        "RequestId": {"type": "string"},
                        "accepted": {"type": "boolean"},
                    },
                },
                "DeadLetter": {
                    "type": "object",
                    "required": ["RequestId", "ErrorCode", "ErrorMessage", "Body", "ErrorClass"],
                    "properties": {
                        "RequestId": {"type": "string"},
                        "ErrorCode": {"type": "integer"},
                        "ErrorMessage": {"type": "string"},
                        "ErrorClass": {"type": "string"},
                        "ErrorDetail": {"type": "string"},
                        "Attempts": {"type": "integer"},
                        "Reason": {"type": "string"},
                        "Body": {
                            "type": "object",
                            "required": [
                                "RequestSource",
                                "FunctionName",
                                "ClientContext",
                                "RetryNum",
                            ],
                            "properties": {
                                "RequestSource": {"type": "string"},
                                "FunctionName": {"type": "string"},
                                "TriggerName": {"type": "string"},
                                "InvocationType": {"type": "string"},
                                "ClientContext": {"type": "string"},
                                "RetryNum": {"type": "integer"},
                                "PushTime": {"type": "string"},
                            },
                        },
                    },
                },
            },
        },
        "security": [{"bearer": []}],
        "paths": {
            "/healthz": {
                "get": {
                    "summary": "Liveness",
                    "security": [],
                    "responses": {
                        "200": _json(
                            {
                                "type": "object",
                                "required": ["status"],
                                "properties": {"status": {"type": "string"}},
                            },
                            "Alive",
                        )
                    },
                }
            },
            "/openapi.json": {
                "get": {
                    "summary": "This description",
                    "security": [],
                    "responses": {"200": _json({"type": "object"}, "OpenAPI 3")},
                }
            },
            "/readyz": {
                "get": {
                    "summary": "Readiness: started, every trigger had its first connect "
                    "attempt; not_connected names those still down (action: read)",
                    "responses": {
                        "200": _json(
                            {
                                "type": "object",
                                "required": ["ready"],
                                "properties": {
                                    "ready": {"type": "boolean"},
                                    "state": {"type": "string"},
                                    "not_connected": {
                                        "type": "object",
                                        "description": "trigger → its last connect error",
                                        "additionalProperties": {"type": "string"},
                                    },
                                },
                            },
                            "Ready",
                        ),
                        "503": _json(
                            {
                                "type": "object",
                                "required": ["ready"],
                                "properties": {
                                    "ready": {"type": "boolean"},
                                    "state": {"type": "string"},
                                    "not_connected": {
                                        "type": "object",
                                        "additionalProperties": {"type": "string"},
                                    },
                                },
                            },
                            "Not ready",
                        ),
                        **_AUTH,
                    },
                }
            },
            "/metrics": {
                "get": {
                    "summary": "Prometheus metrics (action: read)",
                    "responses": {
                        "200": {
                            "description": "Text exposition format",
                            "content": {"text/plain": {"schema": {"type": "string"}}},
                        },
                        **_AUTH,
                    },
                }
            },
            "/status": {
                "get": {
                    "summary": "Triggers, next fire times, in flight, queue depth, dead letters, source lag (action: read)",
                    "responses": {
                        "200": _json(
                            {
                                "type": "object",
                                "required": [
                                    "version",
                                    "state",
                                    "ready",
                                    "functions",
                                    "triggers",
                                    "queue",
                                    "dead_letters",
                                ],
                                "properties": {
                                    "version": {"type": "string"},
                                    "state": {"type": "string"},
                                    "ready": {"type": "boolean"},
                                    "uptime_s": {"type": "number"},
                                    "in_flight": {"type": "integer"},
                                    "functions": {"type": "object"},
                                    "triggers": {"type": "object"},
                                    "queue": {"type": "object"},
                                    "dead_letters": {"type": "integer"},
                                },
                            },
                            "Status",
                        ),
                        **_AUTH,
                    },
                }
            },
            "/functions/{name}/invocations": {
                "post": {
                    "summary": "Invoke a function (SCF Invoke API; action: invoke)",
                    "parameters": [
                        {
                            "name": "name",
                            "in": "path",
                            "required": True,
                            "schema": {"type": "string"},
                        },
                        {
                            "name": "X-Invocation-Type",
                            "in": "header",
                            "required": False,
                            "schema": {
                                "type": "string",
                                "enum": ["RequestResponse", "Event"],
                                "default": "RequestResponse",
                            },
                        },
                    ],
                    "requestBody": {
                        "required": False,
                        "description": "The event: a JSON object (6 MB RequestResponse, 128 KB Event)",
                        "content": {"application/json": {"schema": {"type": "object"}}},
                    },
                    "responses": {
                        "200": {
                            "description": "The function's result (any JSON)",
                            "content": {"application/json": {"schema": {}}},
                        },
                        "202": _json(_ref("Accepted"), "Accepted into the durable queue (Event)"),
                        "400": {
                            "description": "Invalid request",
                            "content": {
                                "application/json": {
                                    "schema": {"oneOf": [_ref("Problem"), _ref("InvocationError")]}
                                }
                            },
                        },
                        **_AUTH,
                        "404": scf_error,
                        "413": {
                            "description": "Event too large",
                            "content": {
                                "application/json": {
                                    "schema": {"oneOf": [_ref("Problem"), _ref("InvocationError")]}
                                }
                            },
                        },
                        "429": scf_error,
                        "500": scf_error,
                        "503": {
                            "description": "System error",
                            "content": {
                                "application/json": {
                                    "schema": {"oneOf": [_ref("Problem"), _ref("InvocationError")]}
                                }
                            },
                        },
                    },
                }
            },
            "/deadletters": {
                "get": {
                    "summary": "Dead letters, oldest first (action: read; only functions in scope)",
                    "parameters": [
                        {
                            "name": "function",
                            "in": "query",
                            "required": False,
                            "schema": {"type": "string"},
                        },
                        {
                            "name": "limit",
                            "in": "query",
                            "required": False,
                            "schema": {
                                "type": "integer",
                                "minimum": 1,
                                "maximum": 10000,
                                "default": 100,
                            },
                        },
                    ],
                    "responses": {
                        "200": _json(
                            {
                                "type": "object",
                                "required": ["items", "count"],
                                "properties": {
                                    "items": {"type": "array", "items": _ref("DeadLetter")},
                                    "count": {"type": "integer"},
                                },
                            },
                            "Dead letters",
                        ),
                        "400": _PROBLEM,
                        **_AUTH,
                    },
                }
            },
            "/deadletters/{id}": {
                "get": {
                    "summary": "One dead letter (action: read)",
                    "parameters": [
                        {"name": "id", "in": "path", "required": True, "schema": {"type": "string"}}
                    ],
                    "responses": {
                        "200": _json(_ref("DeadLetter"), "The dead letter"),
                        "404": _PROBLEM,
                        **_AUTH,
                    },
                }
            },
            "/deadletters/replay": {
                "post": {
                    "summary": "Put dead letters back into the durable queue (action: admin)",
                    "requestBody": {
                        "required": True,
                        "content": {
                            "application/json": {
                                "schema": {
                                    "type": "object",
                                    "properties": {
                                        "function": {"type": "string"},
                                        "ids": {"type": "array", "items": {"type": "string"}},
                                    },
                                }
                            }
                        },
                    },
                    "responses": {
                        "200": _json(
                            {
                                "type": "object",
                                "required": ["replayed", "count"],
                                "properties": {
                                    "replayed": {"type": "array", "items": {"type": "string"}},
                                    "count": {"type": "integer"},
                                },
                            },
                            "Requeued",
                        ),
                        "400": _PROBLEM,
                        **_AUTH,
                    },
                }
            },
        },
    }
