#!/usr/bin/env python3
"""vhost-user proxy that watches the migration dirty log (stdlib only).

usage: vu-log-watch.py LISTEN_SOCK BACKEND_SOCK STATE_JSON [LOGFILE]

QEMU connects to LISTEN_SOCK; the proxy connects to BACKEND_SOCK and forwards every
message both ways (file descriptors included). When QEMU hands the dirty log to the
back-end (SET_LOG_BASE), the proxy maps the same memfd read-only and polls it every
2 ms, collecting the guest pages it ever sees marked. QEMU's log sync clears bits,
so what it sees is a lower bound of what the back-end marked; a back-end that
offers VHOST_F_LOG_ALL but never marks a page leaves it empty. Only the back-end
writes this log (QEMU reads and clears it), so a marked page is the back-end's.

STATE_JSON is rewritten whenever something changes:
  {"log_base": N (SET_LOG_BASE messages), "log_bytes": size of the log,
   "pages_seen": distinct guest pages seen marked,
   "used_rings": ["0x..."] (used ring addresses of the last SET_VRING_ADDR per queue),
   "used_ring_pages_seen": ["0x..."] (those whose page was seen marked),
   "log_all": whether the last SET_FEATURES had VHOST_F_LOG_ALL,
   "vring_log": whether a SET_VRING_ADDR asked for used-ring logging (VHOST_VRING_F_LOG)}
LOGFILE (optional) gets one line per message, with the wall-clock time (UTC, ms).
Serves one connection, then exits when either side closes."""
import json
import mmap
import os
import socket
import struct
import sys
import threading
import time

LISTEN, BACKEND, STATE = sys.argv[1:4]
LOGFILE = sys.argv[4] if len(sys.argv) > 4 else None
NAMES = {1: "GET_FEATURES", 2: "SET_FEATURES", 5: "SET_MEM_TABLE", 6: "SET_LOG_BASE",
         8: "SET_VRING_NUM", 9: "SET_VRING_ADDR", 10: "SET_VRING_BASE", 11: "GET_VRING_BASE",
         12: "SET_VRING_KICK", 13: "SET_VRING_CALL", 18: "SET_VRING_ENABLE", 37: "ADD_MEM_REG",
         38: "REM_MEM_REG"}
LOG_ALL = 1 << 26
lock = threading.Lock()
state = {"log_base": 0, "log_bytes": 0, "pages_seen": 0, "used_rings": [],
         "used_ring_pages_seen": [], "log_all": False, "vring_log": False}
seen = set()
used = {}  # queue index -> used ring guest address
logf = open(LOGFILE, "w", buffering=1) if LOGFILE else None


def note(s):
    if logf:
        now = time.time()
        logf.write("%s.%03dZ %s\n" % (time.strftime("%H:%M:%S", time.gmtime(now)),
                                     int(now * 1000) % 1000, s))


def publish():
    with lock:
        state["pages_seen"] = len(seen)
        state["used_rings"] = ["0x%x" % a for _, a in sorted(used.items())]
        state["used_ring_pages_seen"] = ["0x%x" % a for _, a in sorted(used.items())
                                         if a >> 12 in seen]
        tmp = STATE + ".tmp"
        with open(tmp, "w") as f:
            json.dump(state, f)
        os.replace(tmp, STATE)


def watch(fd, size, offset, stop):
    m = mmap.mmap(fd, size, mmap.MAP_SHARED, mmap.PROT_READ, offset=offset)
    os.close(fd)
    while not stop.wait(0.002):
        b = m[:]
        if b.count(0) == len(b):
            continue
        new = False
        for i, byte in enumerate(b):
            if byte:
                for bit in range(8):
                    if byte >> bit & 1 and i * 8 + bit not in seen:
                        seen.add(i * 8 + bit)
                        new = True
        if new:
            publish()


def recv_exact(sock, n, fds):
    buf = b""
    while len(buf) < n:
        d, f, _, _ = socket.recv_fds(sock, n - len(buf), 16)
        if not d:
            raise EOFError
        buf += d
        fds += f
    return buf


watchers = []
send_lock = threading.Lock()


def pump(src, dst, name):
    try:
        while True:
            fds = []
            hdr = recv_exact(src, 12, fds)
            req, flags, size = struct.unpack("<III", hdr)
            payload = recv_exact(src, size, fds) if size else b""
            reply = bool(flags & 0x4)
            if not reply:
                if req == 2 and len(payload) >= 8:
                    state["log_all"] = bool(struct.unpack_from("<Q", payload)[0] & LOG_ALL)
                    publish()
                if req == 9 and len(payload) >= 40:
                    idx, fl = struct.unpack_from("<II", payload)
                    used[idx] = struct.unpack_from("<Q", payload, 32)[0]
                    state["vring_log"] = state["vring_log"] or bool(fl & 1)
                    publish()
                if req == 6 and fds and len(payload) >= 16:
                    sz, off = struct.unpack_from("<QQ", payload)
                    state["log_base"] += 1
                    state["log_bytes"] = sz
                    stop = threading.Event()
                    watchers.append(stop)
                    threading.Thread(target=watch, args=(os.dup(fds[0]), sz, off, stop),
                                     daemon=True).start()
                    publish()
            note("%s %s%s size=%d fds=%d" % (name, NAMES.get(req, "REQ_%d" % req),
                                             " (reply)" if reply else "", size, len(fds)))
            with send_lock:
                if fds:
                    socket.send_fds(dst, [hdr + payload], fds)
                else:
                    dst.sendall(hdr + payload)
            for f in fds:
                os.close(f)
    except (EOFError, OSError) as e:
        note("%s closed (%s)" % (name, e))
    finally:
        for s in (src, dst):
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass


if os.path.exists(LISTEN):
    os.unlink(LISTEN)
publish()
ls = socket.socket(socket.AF_UNIX)
ls.bind(LISTEN)
ls.listen(1)
front, _ = ls.accept()
back = socket.socket(socket.AF_UNIX)
back.connect(BACKEND)
note("connected %s <-> %s" % (LISTEN, BACKEND))
t = threading.Thread(target=pump, args=(back, front, "B->F"), daemon=True)
t.start()
pump(front, back, "F->B")
t.join(2)
for w in watchers:
    w.set()
time.sleep(0.01)
publish()
