"""Byte relays between the host and a lab's nodes: ssh's ProxyCommand (standard input and output
to a node's port) and port forwarding (a port on the host to a node's port), each connection to
the node opened from the lab's gateway namespace when the lab is isolated (``netns.connect``).
May import: ``common``, ``adapters.netns``.
"""

from __future__ import annotations

import contextlib
import os
import selectors
import socket
import threading
from collections.abc import Callable

from labbuilder.adapters import netns

CHUNK = 65536


def open_node(namespace: str | None, host: str, port: int) -> socket.socket:
    """A connection to a node's port that waits 10 s to connect and then as long as it idles."""
    sock = netns.connect(namespace, host, port, timeout=10.0)
    sock.settimeout(None)
    return sock


def pipe_stdio(sock: socket.socket, stdin: int = 0, stdout: int = 1) -> None:
    """Copy ``stdin`` to ``sock`` and ``sock`` to ``stdout`` until the node closes; the end of
    ``stdin`` half-closes the connection (ssh then waits for the node's last bytes)."""
    with selectors.DefaultSelector() as selector:
        selector.register(sock, selectors.EVENT_READ, "node")
        selector.register(stdin, selectors.EVENT_READ, "stdin")
        while True:
            for key, _ in selector.select():
                if key.data == "node":
                    data = sock.recv(CHUNK)
                    if not data:
                        return
                    _write_all(stdout, data)
                else:
                    data = os.read(stdin, CHUNK)
                    if data:
                        sock.sendall(data)
                    else:
                        selector.unregister(stdin)
                        with contextlib.suppress(OSError):
                            sock.shutdown(socket.SHUT_WR)


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


def _pump(source: socket.socket, sink: socket.socket) -> None:
    with contextlib.suppress(OSError):
        while data := source.recv(CHUNK):
            sink.sendall(data)
    with contextlib.suppress(OSError):
        sink.shutdown(socket.SHUT_WR)


def _serve(client: socket.socket, connect: Callable[[], socket.socket]) -> None:
    with client:
        try:
            node = connect()
        except OSError:
            return  # the client sees its connection closed
        with node:
            back = threading.Thread(target=_pump, args=(node, client), daemon=True)
            back.start()
            _pump(client, node)
            back.join()


class Forward:
    """A listening socket on the host whose connections are relayed to ``host``:``port`` as
    seen from ``namespace`` (None: from the host), until ``close``."""

    def __init__(
        self, listen: tuple[str, int], namespace: str | None, host: str, port: int
    ) -> None:
        self.namespace, self.host, self.port = namespace, host, port
        self._listener = socket.create_server(listen, reuse_port=False)
        self.address: tuple[str, int] = self._listener.getsockname()[:2]
        self._closed = threading.Event()

    def _connect(self) -> socket.socket:
        return open_node(self.namespace, self.host, self.port)

    def serve_forever(self) -> None:
        while not self._closed.is_set():
            try:
                client, _ = self._listener.accept()
            except OSError:
                if self._closed.is_set():
                    return
                raise
            threading.Thread(target=self._run, args=(client,), daemon=True).start()

    def _run(self, client: socket.socket) -> None:
        _serve(client, self._connect)

    def close(self) -> None:
        self._closed.set()
        with contextlib.suppress(OSError):
            self._listener.shutdown(socket.SHUT_RDWR)
        self._listener.close()
