"""A tiny static server for the web client in web/ plus a dynamic /config.json (a dev tool, never shipped)."""

from __future__ import annotations

import argparse
import json
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlsplit

WEB_ROOT = Path(__file__).resolve().parent.parent / "web"
CONTENT_TYPES = {
    ".html": "text/html; charset=utf-8",
    ".js": "text/javascript; charset=utf-8",
    ".css": "text/css; charset=utf-8",
    ".json": "application/json; charset=utf-8",
    ".svg": "image/svg+xml",
    ".png": "image/png",
    ".jpg": "image/jpeg",
    ".ico": "image/x-icon",
}


class _Server(ThreadingHTTPServer):
    """The HTTP server, carrying the web root and the /config.json body its handlers serve."""

    daemon_threads = True
    # socketserver's default backlog of 5 refuses bursts of concurrent connections (load tests, 30 users at once).
    request_queue_size = 128

    def __init__(self, address: tuple[str, int], root: Path, config: bytes) -> None:
        super().__init__(address, _Handler)
        self.root = root
        self.config = config


class _Handler(BaseHTTPRequestHandler):
    """GET/HEAD of files under the web root and of /config.json; everything else is 404."""

    server: _Server

    def log_message(self, format: str, *args: Any) -> None:
        """Stay quiet: tests and the terminal do not need an access log."""

    def do_HEAD(self) -> None:
        """Answer like GET, without the body."""
        self._serve(head=True)

    def do_GET(self) -> None:
        """Serve a static file or the config."""
        self._serve(head=False)

    def _serve(self, *, head: bool) -> None:
        """Resolve the request path inside the web root and send the file, or 404."""
        path = unquote(urlsplit(self.path).path)
        if path == "/config.json":
            return self._send(200, self.server.config, CONTENT_TYPES[".json"], head)
        if path.endswith("/"):
            path += "index.html"
        parts = [p for p in path.split("/") if p]
        file = self._resolve(parts)
        if file is None:
            return self._send(404, b"not found\n", "text/plain; charset=utf-8", head)
        return self._send(200, file.read_bytes(), CONTENT_TYPES[file.suffix], head)

    def _resolve(self, parts: list[str]) -> Path | None:
        """The file the path names, or None when it is missing, not served, or outside the web root."""
        if any(p in (".", "..") or "\\" in p or "\x00" in p for p in parts):
            return None
        root = self.server.root.resolve()
        file = root.joinpath(*parts).resolve()
        if root not in file.parents or not file.is_file() or file.suffix not in CONTENT_TYPES:
            return None
        return file

    def _send(self, status: int, body: bytes, content_type: str, head: bool) -> None:
        """Send a complete response that no cache keeps."""
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Cache-Control", "no-store")
        self.send_header("X-Content-Type-Options", "nosniff")
        self.end_headers()
        if not head:
            self.wfile.write(body)


class WebServer:
    """The web client served on a loopback port, configured to talk to the given service base URLs."""

    def __init__(self, *, login_base_url: str, chat_base_url: str, host: str = "127.0.0.1", port: int = 0) -> None:
        config = {"login_base_url": login_base_url.rstrip("/"), "chat_base_url": chat_base_url.rstrip("/")}
        self._server = _Server((host, port), WEB_ROOT, json.dumps(config).encode())
        self._thread = threading.Thread(target=self._server.serve_forever, name="webserver", daemon=True)
        self.host, self.port = self._server.server_address[:2]

    @property
    def url(self) -> str:
        """The page's URL."""
        return f"http://{self.host}:{self.port}/"

    def start(self) -> WebServer:
        """Start serving in a daemon thread."""
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop serving and release the port."""
        if self._thread.is_alive():
            self._server.shutdown()
            self._thread.join(timeout=5)
        self._server.server_close()


def main(argv: list[str] | None = None) -> int:
    """Serve the web client until Ctrl-C."""
    parser = argparse.ArgumentParser(description="Serve web/ for local development (never shipped).")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8080)
    parser.add_argument("--login", default="http://127.0.0.1:9000", help="LoginService base URL")
    parser.add_argument("--chat", default="http://127.0.0.1:9001", help="ChatService base URL")
    args = parser.parse_args(argv)
    server = WebServer(login_base_url=args.login, chat_base_url=args.chat, host=args.host, port=args.port).start()
    print(f"Web client at {server.url} (login {args.login}, chat {args.chat}). Ctrl-C stops it.", flush=True)
    try:
        threading.Event().wait()
    except KeyboardInterrupt:
        pass
    finally:
        server.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
