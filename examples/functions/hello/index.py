"""An SCF-style Python function: file index.py, handler main_handler(event, context)."""

import os


def main_handler(event, context):
    print(f"{os.environ['GREETING']}: {event.get('Type')} {event.get('Time')} {event.get('Message')!r}")
    return {
        "request_id": context.request_id,
        "remaining_ms": context.get_remaining_time_in_millis(),
        "event": event,
    }
