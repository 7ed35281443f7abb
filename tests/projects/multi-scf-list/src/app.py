def index(event, context):
    return event


def user_list(event, context):
    return []
