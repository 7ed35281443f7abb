import json, os


def main_handler(event, context):
    out = os.environ.get("OUT")
    rec = {"event": event, "function": context.function_name, "namespace": context.namespace,
           "memory": context.memory_limit_in_mb, "time_limit": context.time_limit_in_ms,
           "remaining": context.get_remaining_time_in_millis(), "request_id": context.request_id,
           "version": context.function_version, "cwd": os.getcwd(),
           "secret_id": os.environ.get("TENCENTCLOUD_SECRETID")}
    if out:
        with open(out, "a") as f:
            f.write(json.dumps(rec) + "\n")
    return rec
