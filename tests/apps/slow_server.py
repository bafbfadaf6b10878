"""A deliberately slow HTTP handler for parsrv's autoscaling test: socket activation (fd 3),
one request at a time, 20 ms of "work" each, so one handler serves at most ~50 per second."""
import os
import socket
import time

assert os.environ.get("LISTEN_PID") == str(os.getpid()), "not started by parsrv"
listener = socket.socket(fileno=3)
body = f"slow pid {os.getpid()}\n".encode()
while True:
    conn, _ = listener.accept()
    with conn:
        conn.recv(4096)
        time.sleep(0.02)
        conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\nConnection: close\r\n\r\n%s" % (len(body), body))
