"""A handler in a subfolder: handler = "pkg.nested.main_handler"."""

import os


def main_handler(event, context):
    return {"file": __file__, "cwd": os.getcwd()}
