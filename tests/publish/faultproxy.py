"""A loopback TCP proxy that cuts connections mid-transfer: fault injection for real S3 traffic.

    with FaultProxy(("127.0.0.1", port)) as proxy:       # proxy.url → point the client here
        proxy.cut(upload_after=1_000_000, times=2)       # the next 2 connections that send > 1 MB die (RST)
        proxy.cut(download_after=1_000_000, times=None)  # every connection that receives > 1 MB dies

It counts the bytes each way and the multipart parts seen (`partNumber=` in request lines), so
tests can assert what went over the wire.
"""

from __future__ import annotations

import socket
import threading


class FaultProxy:
    def __init__(self, target: tuple[str, int]):
        self.target = target
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.listener.getsockname()[1]}"
        self.lock = threading.Lock()
        self.upload_after: int | None = None
        self.download_after: int | None = None
        self.cuts_left: int | None = 0
        self.cuts_done = 0
        self.bytes_up = 0
        self.bytes_down = 0
        self.parts_seen = 0
        self._stop = threading.Event()
        self._conns: list[socket.socket] = []

    def cut(self, upload_after: int | None = None, download_after: int | None = None, times: int | None = 1) -> None:
        """Cut connections that carry more than the given bytes; `times=None` cuts every one."""
        with self.lock:
            self.upload_after, self.download_after, self.cuts_left = upload_after, download_after, times

    def heal(self) -> None:
        self.cut(None, None, 0)

    def __enter__(self) -> FaultProxy:
        threading.Thread(target=self._accept, daemon=True).start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self.listener.close()
        for s in list(self._conns):
            _close(s)

    def _accept(self) -> None:
        while not self._stop.is_set():
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            upstream = socket.create_connection(self.target)
            self._conns += [client, upstream]
            pair = (client, upstream)
            threading.Thread(target=self._pump, args=(client, upstream, "up", pair), daemon=True).start()
            threading.Thread(target=self._pump, args=(upstream, client, "down", pair), daemon=True).start()

    def _may_cut(self, moved: int, direction: str) -> bool:
        with self.lock:
            limit = self.upload_after if direction == "up" else self.download_after
            if limit is None or moved <= limit or self.cuts_left == 0:
                return False
            if self.cuts_left is not None:
                self.cuts_left -= 1
            self.cuts_done += 1
            return True

    def _pump(
        self, src: socket.socket, dst: socket.socket, direction: str, pair: tuple[socket.socket, socket.socket]
    ) -> None:
        moved, tail = 0, b""
        try:
            while data := src.recv(65536):
                moved += len(data)
                with self.lock:
                    if direction == "up":
                        self.bytes_up += len(data)
                        window = tail + data
                        self.parts_seen += _parts(window) - _parts(tail)
                        tail = data[-16:]
                    else:
                        self.bytes_down += len(data)
                if self._may_cut(moved, direction):
                    for s in pair:  # drop both ends mid-stream, as a failed network path looks to the client
                        _close(s)
                    return
                dst.sendall(data)
        except OSError:
            pass
        finally:
            for s in pair:
                _close(s)


def _parts(data: bytes) -> int:
    return data.count(b"?partNumber=") + data.count(b"&partNumber=")


def _close(s: socket.socket) -> None:
    try:  # shutdown first: it wakes the other pump blocked in recv() on this socket; close alone would not
        s.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass
    try:
        s.close()
    except OSError:
        pass
