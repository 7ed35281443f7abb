def main_handler(event, context):
    with open("./demo.html", encoding="utf-8") as f:
        html = f.read()
    return {"isBase64Encoded": False, "statusCode": 200,
            "headers": {"Content-Type": "text/html; charset=utf-8"}, "body": html}
