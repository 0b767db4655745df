"""A loopback TCP relay that cuts one chosen connection midway: a NAS link that drops."""

from __future__ import annotations

import socket
import threading


class DroppingProxy:
    def __init__(self, target_port: int, drop_connection: int, drop_after_bytes: int):
        self.target_port = target_port
        self.drop_connection = drop_connection
        self.drop_after_bytes = drop_after_bytes
        self.connections = 0
        self.dropped = 0
        self.server = socket.create_server(("127.0.0.1", 0))
        self.port = self.server.getsockname()[1]
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self.server.accept()
            except OSError:
                return
            self.connections += 1
            upstream = socket.create_connection(("127.0.0.1", self.target_port))
            limit = self.drop_after_bytes if self.connections == self.drop_connection else None
            threading.Thread(target=self._pipe, args=(upstream, client, limit), daemon=True).start()
            threading.Thread(target=self._pipe, args=(client, upstream, None), daemon=True).start()

    def _pipe(self, src: socket.socket, dst: socket.socket, limit: int | None) -> None:
        sent = 0
        try:
            while data := src.recv(65536):
                dst.sendall(data)
                sent += len(data)
                if limit is not None and sent >= limit:
                    self.dropped += 1
                    break
        except OSError:
            pass
        for s in (src, dst):
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            s.close()

    def close(self) -> None:
        self.server.close()
