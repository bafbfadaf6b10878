"""A WSGI app for gunicorn running as a parsrv handler (tests/tests/handlers.rs)."""
import os


def app(environ, start_response):
    body = f"gunicorn pid {os.getpid()}\n".encode()
    start_response("200 OK", [("Content-Type", "text/plain"), ("Content-Length", str(len(body)))])
    return [body]
