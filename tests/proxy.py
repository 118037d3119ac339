"""A TCP proxy on 127.0.0.1 in front of the test broker that can hold back a publisher confirm.

Client-to-broker bytes pass as they are; broker-to-client bytes are cut into AMQP frames, and while
``hold_next`` is set the next ``Basic.Ack`` (a publisher confirm) and everything behind it on that
connection wait ``hold_next`` seconds: a broker whose confirm comes late, not one that never answers.
"""

from __future__ import annotations

import contextlib
import socket
import struct
import threading
import time

BASIC_ACK = (60, 80)  # class basic, method ack: from the broker, a publisher confirm


class ConfirmHolder:
    def __init__(self, host: str, port: int) -> None:
        self.target = (host, port)
        self.server = socket.create_server(("127.0.0.1", 0))
        self.port = self.server.getsockname()[1]
        self.hold_next: float | None = None
        self.held = 0
        self.lock = threading.Lock()
        self.sockets: list[socket.socket] = []
        self.stopped = False
        threading.Thread(target=self._accept, daemon=True).start()

    def hold(self, seconds: float) -> None:
        """Hold the next confirm any connection receives for ``seconds``."""
        with self.lock:
            self.hold_next = seconds

    def _accept(self) -> None:
        while not self.stopped:
            try:
                client, _ = self.server.accept()
            except OSError:
                return
            try:
                upstream = socket.create_connection(self.target, timeout=5)
            except OSError:
                client.close()
                continue
            upstream.settimeout(None)
            self.sockets += [client, upstream]
            threading.Thread(target=self._pump, args=(client, upstream), daemon=True).start()
            threading.Thread(target=self._frames, args=(upstream, client), daemon=True).start()

    def _pump(self, src: socket.socket, dst: socket.socket) -> None:
        with contextlib.suppress(OSError):
            while data := src.recv(65536):
                dst.sendall(data)
        self._close(src, dst)

    def _frames(self, src: socket.socket, dst: socket.socket) -> None:
        buf = b""
        with contextlib.suppress(OSError):
            while data := src.recv(65536):
                buf += data
                while len(buf) >= 7:
                    size = struct.unpack(">I", buf[3:7])[0]
                    if len(buf) < 8 + size:
                        break
                    frame, buf = buf[: 8 + size], buf[8 + size:]
                    if frame[0] == 1 and size >= 4 and struct.unpack(">HH", frame[7:11]) == BASIC_ACK:
                        with self.lock:
                            delay, self.hold_next = self.hold_next, None
                        if delay:
                            self.held += 1
                            time.sleep(delay)
                    dst.sendall(frame)
        self._close(src, dst)

    @staticmethod
    def _close(*socks: socket.socket) -> None:
        for s in socks:
            with contextlib.suppress(OSError):
                s.shutdown(socket.SHUT_RDWR)

    def stop(self) -> None:
        self.stopped = True
        with contextlib.suppress(OSError):
            self.server.close()
        self._close(*self.sockets)
