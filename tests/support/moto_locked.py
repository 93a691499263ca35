"""moto_server for the auto-consul test suite.

Serves moto's WSGI application on a free loopback port and prints
`PORT=<n>` on its first line of stdout. Three changes from plain moto_server,
each one a measured difference from the real services:

* requests are applied one at a time (plain moto checks a PutObject condition
  and then writes without a lock; real S3 linearizes conditional writes);
* the IMDSv2 token response carries `X-aws-ec2-metadata-token-ttl-seconds`, as
  the real metadata service does (aws-config rejects a token without it);
* with --ignore-conditions, `If-None-Match` and `If-Match` are stripped from
  every request: a stand-in for an S3-compatible store that ignores them.

`GET /_stats` answers the number of requests served so far (for tests and
benchmarks that count requests); `POST /_stats/reset` sets it back to 0.
The server exits when its parent process goes away.
"""

import argparse
import os
import sys
import threading
import time

from moto.moto_server.werkzeug_app import DomainDispatcherApplication, create_backend_app
from werkzeug.serving import make_server


class Serialized:
    def __init__(self, app, ignore_conditions):
        self.app = app
        self.ignore_conditions = ignore_conditions
        self.lock = threading.Lock()
        self.requests = 0

    def __call__(self, environ, start_response):
        path = environ.get("PATH_INFO", "")
        if path.startswith("/_stats"):
            if environ.get("REQUEST_METHOD") == "POST":
                self.requests = 0
            body = str(self.requests).encode()
            start_response("200 OK", [("Content-Type", "text/plain"), ("Content-Length", str(len(body)))])
            return [body]
        if self.ignore_conditions:
            environ.pop("HTTP_IF_NONE_MATCH", None)
            environ.pop("HTTP_IF_MATCH", None)
        token_ttl = None
        if path == "/latest/api/token":
            token_ttl = environ.get("HTTP_X_AWS_EC2_METADATA_TOKEN_TTL_SECONDS", "21600")

        def start(status, headers, exc_info=None):
            if token_ttl is not None and not any(
                k.lower() == "x-aws-ec2-metadata-token-ttl-seconds" for k, _ in headers
            ):
                headers = list(headers) + [("X-aws-ec2-metadata-token-ttl-seconds", token_ttl)]
            return start_response(status, headers, exc_info)

        with self.lock:
            self.requests += 1
            # Drain the whole response under the lock so that the write is
            # complete before the next request is looked at.
            return list(self.app(environ, start))


def watch_parent():
    parent = os.getppid()
    while True:
        time.sleep(0.5)
        if os.getppid() != parent:
            os._exit(0)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--ignore-conditions", action="store_true")
    args = parser.parse_args()
    app = Serialized(DomainDispatcherApplication(create_backend_app), args.ignore_conditions)
    server = make_server("127.0.0.1", args.port, app, threaded=True)
    print(f"PORT={server.server_port}", flush=True)
    threading.Thread(target=watch_parent, daemon=True).start()
    server.serve_forever()


if __name__ == "__main__":
    sys.exit(main())
