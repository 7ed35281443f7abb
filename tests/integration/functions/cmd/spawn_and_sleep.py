"""Starts a grandchild that sleeps, records both pids in the file the event names, sleeps."""

import json
import os
import subprocess
import sys
import time

event = json.load(sys.stdin)
grandchild = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
with open(event["pidfile"] + ".tmp", "w") as f:
    json.dump({"child": os.getpid(), "grandchild": grandchild.pid}, f)
os.rename(event["pidfile"] + ".tmp", event["pidfile"])
print("started", grandchild.pid, file=sys.stderr, flush=True)
time.sleep(600)
