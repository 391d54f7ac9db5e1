"""A loopback TCP forwarder that can be cut and restored, to make a real endpoint go away in the
middle of a request."""

from __future__ import annotations

import socket
import threading

from flows.server import free_port


class TcpProxy:
    def __init__(self, target_port: int, cut_when: bytes | None = None):
        self.target_port, self.cut_when = target_port, cut_when
        self.port = free_port()
        self._conns: list[socket.socket] = []
        self._lock = threading.Lock()
        self.cut_happened = threading.Event()
        self._server = None

    def start(self) -> None:
        server = socket.socket()
        server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        server.bind(("127.0.0.1", self.port))
        server.listen(64)
        self._server = server
        threading.Thread(target=self._accept, args=(server,), daemon=True).start()

    def stop(self) -> None:
        """Close the listening socket and every open connection: the endpoint is gone."""
        with self._lock:
            if self._server:
                # shutdown() wakes the thread blocked in accept(); close() alone would leave the
                # socket listening until that accept() returns (Linux), letting a retry through.
                try:
                    self._server.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
                self._server.close()
                self._server = None
            for c in self._conns:
                try:
                    c.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
                c.close()
            self._conns.clear()

    def _accept(self, server: socket.socket) -> None:
        while True:
            try:
                client, _ = server.accept()
            except OSError:
                return
            upstream = socket.create_connection(("127.0.0.1", self.target_port))
            with self._lock:
                self._conns += [client, upstream]
            threading.Thread(target=self._pipe, args=(client, upstream, True), daemon=True).start()
            threading.Thread(target=self._pipe, args=(upstream, client, False), daemon=True).start()

    def _pipe(self, src: socket.socket, dst: socket.socket, inbound: bool) -> None:
        try:
            while data := src.recv(65536):
                if inbound and self.cut_when and self.cut_when in data and not self.cut_happened.is_set():
                    self.cut_happened.set()
                    dst.sendall(data[: len(data) // 2])  # half a request reaches the server
                    self.stop()
                    return
                dst.sendall(data)
        except OSError:
            pass
        finally:
            for s in (src, dst):
                try:
                    s.close()
                except OSError:
                    pass
