def handler(event, context):
    params = event.get("pathParameters") or {}
    return {"id": params.get("id"), "method": event.get("httpMethod"), "path": event.get("path")}
