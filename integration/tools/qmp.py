#!/usr/bin/env python3
"""Minimal QMP client (stdlib only).

usage: qmp.py SOCKET 'CMD [json-args]' ...
e.g.   qmp.py qmp.sock 'migrate {"uri": "unix:mig.sock"}' query-migrate
Prints each command's answer ({"return": ...} or {"error": ...}) as one JSON line;
asynchronous events are skipped. Exits 1 if the socket cannot be reached."""
import json
import socket
import sys

try:
    s = socket.socket(socket.AF_UNIX)
    s.settimeout(30)
    s.connect(sys.argv[1])
except OSError as e:
    print(json.dumps({"error": {"class": "ConnectError", "desc": str(e)}}))
    sys.exit(1)
f = s.makefile("rw")


def call(name, args=None):
    msg = {"execute": name}
    if args:
        msg["arguments"] = args
    f.write(json.dumps(msg) + "\n")
    f.flush()
    while True:
        line = f.readline()
        if not line:
            return {"error": {"class": "Disconnected", "desc": "QMP connection closed"}}
        r = json.loads(line)
        if "event" not in r:
            return r


f.readline()  # greeting
call("qmp_capabilities")
for c in sys.argv[2:]:
    name, _, a = c.partition(" ")
    print(json.dumps(call(name, json.loads(a) if a else None)), flush=True)
