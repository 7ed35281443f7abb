def index(event, context):
    return {"function": "index", "event": event}


def user_list(event, context):
    return [{"name": "a"}, {"name": "b"}]
