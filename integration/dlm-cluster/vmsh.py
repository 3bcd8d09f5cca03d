#!/usr/bin/env python3
"""Run one shell command in a guest through its serial console (a QEMU unix-socket chardev).
usage: vmsh.py SOCKET 'command' [timeout_s]     -> prints the output, exits with the command's rc
The guest side is a read/eval loop on a serial port with echo off (see guest-init), one
line per command: a command of several lines goes as one line that decodes it (base64)."""
import base64, os, re, socket, sys, time
sock, cmd = sys.argv[1], sys.argv[2]; timeout = float(sys.argv[3]) if len(sys.argv) > 3 else 60
if "\n" in cmd:
    cmd = 'eval "$(echo %s | base64 -d)"' % base64.b64encode(cmd.encode()).decode()
tag = os.urandom(4).hex(); marker = re.compile(rb"__RC_%s=(\d+)" % tag.encode())
s = socket.socket(socket.AF_UNIX); s.connect(sock); s.settimeout(0.5)
s.sendall(("{ %s ; } 2>&1; echo __RC_%s=$?\n" % (cmd, tag)).encode())
buf, end = b"", time.time() + timeout
while time.time() < end:
    try:
        d = s.recv(65536)
        if not d: break
        buf += d
    except socket.timeout:
        pass
    m = marker.search(buf)
    if m:
        sys.stdout.write(buf[:m.start()].replace(b"\r", b"").decode(errors="replace"))
        sys.exit(int(m.group(1)))
sys.stdout.write(buf.replace(b"\r", b"").decode(errors="replace"))
print(f"\nvmsh: TIMEOUT after {timeout}s waiting for: {cmd}", file=sys.stderr); sys.exit(124)
