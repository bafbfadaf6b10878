"""A WSGI app that takes 3 s to load, for gunicorn --preload as a parsrv handler
(tests/tests/systemd.rs): gunicorn says READY=1 (sd_notify) only once it is loaded. When
loading ends it creates the file named by $SLOW_BOOT_MARKER/<pid>, so a test can tell
whether parsrv took the handler as ready before it was."""
import os
import time

time.sleep(3)
with open(os.path.join(os.environ["SLOW_BOOT_MARKER"], str(os.getpid())), "w"):
    pass


def app(environ, start_response):
    body = f"slow boot pid {os.getpid()}\n".encode()
    start_response("200 OK", [("Content-Type", "text/plain"), ("Content-Length", str(len(body)))])
    return [body]
