import tinypkg


def main_handler(event, context):
    return {"tiny": tinypkg.VERSION, "file": tinypkg.__file__}
