"""A deliberately slow HTTP handler for parsrv's autoscaling test: socket activation (fd 3),
one request at a time, 20 ms of "work" each, so one handler serves at most ~50 per second.
Under `--notify` it says READY=1 (sd_notify) once it is about to accept, as a server
speaking the protocol does: parsrv then knows when it serves instead of guessing (a second)."""
import os
import socket
import time

assert os.environ.get("LISTEN_PID") == str(os.getpid()), "not started by parsrv"
listener = socket.socket(fileno=3)
body = f"slow pid {os.getpid()}\n".encode()
notify = os.environ.get("NOTIFY_SOCKET")
if notify:
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as said:
        said.sendto(b"READY=1", "\0" + notify[1:] if notify.startswith("@") else notify)
while True:
    conn, _ = listener.accept()
    with conn:
        head = b""  # the whole request head: answering after its first segment resets the rest
        while len(head) < 4096 and not head.endswith(b"\r\n\r\n"):
            part = conn.recv(4096 - len(head))
            if not part:
                break
            head += part
        time.sleep(0.02)
        conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\nConnection: close\r\n\r\n%s" % (len(body), body))
