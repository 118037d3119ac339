"""A TCP proxy on 127.0.0.1 in front of the test broker that injects network faults.

Client-to-broker bytes pass as they are; broker-to-client bytes are cut into AMQP frames. Faults:

* :meth:`FaultProxy.hold` - the next ``Basic.Ack`` (a publisher confirm) and everything behind it on that
  connection wait ``seconds``: a broker whose confirm comes late, not one that never answers;
* :meth:`FaultProxy.cut` - every connection open now is closed (a reset both sides see);
* :meth:`FaultProxy.stall` - every connection open now goes silent both ways (bytes are read and dropped:
  a cable pulled, a NAT entry gone), then is closed after ``seconds``.
"""

from __future__ import annotations

import contextlib
import socket
import struct
import threading
import time

BASIC_ACK = (60, 80)  # class basic, method ack: from the broker, a publisher confirm


class FaultProxy:
    def __init__(self, host: str, port: int) -> None:
        self.target = (host, port)
        self.server = socket.create_server(("127.0.0.1", 0))
        self.port = self.server.getsockname()[1]
        self.hold_next: float | None = None
        self.held = 0
        self.lock = threading.Lock()
        self.pairs: list[tuple[socket.socket, socket.socket]] = []  # (client, upstream) of open connections
        self.silent: set[socket.socket] = set()  # sockets whose bytes are dropped (stalled connections)
        self.stopped = False
        threading.Thread(target=self._accept, daemon=True).start()

    def hold(self, seconds: float) -> None:
        """Hold the next confirm any connection receives for ``seconds``."""
        with self.lock:
            self.hold_next = seconds

    def cut(self) -> int:
        """Close every connection open now; how many."""
        with self.lock:
            pairs, self.pairs = self.pairs, []
        for pair in pairs:
            self._close(*pair)
        return len(pairs)

    def stall(self, seconds: float) -> int:
        """Every connection open now drops what it carries, both ways, then closes after ``seconds``; how many."""
        with self.lock:
            pairs, self.pairs = self.pairs, []
            for pair in pairs:
                self.silent.update(pair)

        def close() -> None:
            for pair in pairs:
                self._close(*pair)
            with self.lock:
                for pair in pairs:
                    self.silent.difference_update(pair)

        timer = threading.Timer(seconds, close)
        timer.daemon = True
        timer.start()
        return len(pairs)

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
            with self.lock:
                self.pairs.append((client, upstream))
            threading.Thread(target=self._pump, args=(client, upstream), daemon=True).start()
            threading.Thread(target=self._frames, args=(upstream, client), daemon=True).start()

    def _pump(self, src: socket.socket, dst: socket.socket) -> None:
        with contextlib.suppress(OSError):
            while data := src.recv(65536):
                if src not in self.silent:
                    dst.sendall(data)
        self._close(src, dst)
        src.close()  # each socket is the source of one thread: it closes it when done

    def _frames(self, src: socket.socket, dst: socket.socket) -> None:
        buf = b""
        with contextlib.suppress(OSError):
            while data := src.recv(65536):
                if src in self.silent:
                    continue
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
                    if src in self.silent:
                        break
                    dst.sendall(frame)
        self._close(src, dst)
        src.close()

    def _close(self, *socks: socket.socket) -> None:
        for s in socks:
            with contextlib.suppress(OSError):
                s.shutdown(socket.SHUT_RDWR)
        with self.lock:
            self.pairs = [p for p in self.pairs if p[0] not in socks and p[1] not in socks]

    def stop(self) -> None:
        self.stopped = True
        with contextlib.suppress(OSError):
            self.server.close()
        self.cut()
