"""Fails at import time."""

import os

RATIO = 1 / int(os.environ.get("DIVISOR", "0"))


def main_handler(event, context):
    return RATIO
