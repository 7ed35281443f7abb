import json, os


def main_handler(event, context):
    body = event["Records"][0]["CMQ"]["msgBody"]
    with open(os.environ["OUT"], "a") as f:
        f.write(json.dumps({"msgBody": body}) + "\n")
    return body
