"""Serving a local web application (the class board) with waitress."""

from __future__ import annotations

from typing import Any

from waitress.server import TcpWSGIServer, create_server


class WebServer:
    """``app`` (a WSGI application) listening on ``host:port`` (0: a port the system
    chooses) from construction; ``run`` serves until ``close`` or KeyboardInterrupt."""

    def __init__(self, app: Any, host: str, port: int) -> None:
        server = create_server(app, host=host, port=port, threads=4, ident="labbuilder")
        assert isinstance(server, TcpWSGIServer)  # one host and port: one TCP server
        self._server = server
        self._closed = False
        shown = f"[{host}]" if ":" in host else host
        self.url = f"http://{shown}:{server.getsockname()[1]}/"

    def run(self) -> None:
        """Serve until ``close`` (returns) or Ctrl-C (raises KeyboardInterrupt: waitress stops
        on it quietly, and the caller must still see it)."""
        self._server.run()
        if not self._closed:
            self.close()
            raise KeyboardInterrupt

    def close(self) -> None:
        self._closed = True
        self._server.close()
