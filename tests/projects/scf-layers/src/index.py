import common_util


def main_handler(event, context):
    return {"greeting": common_util.greet("scf")}
