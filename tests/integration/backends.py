"""Scriptable HTTP backends for forwarding tests (threads, 127.0.0.1 only)."""

from __future__ import annotations

import socket
import threading


class RawBackend:
    """Accepts connections and answers each request with ``respond(request_head, body)``.

    ``respond`` returns the raw bytes to send (or None to close without an
    answer); ``requests`` records every request head seen, ``connections``
    counts accepted sockets.  Request bodies are read by Content-Length or
    chunked framing (strictly enough for tests).
    """

    def __init__(self, respond, port: int = 0):
        self.respond = respond
        self.requests: list[bytes] = []
        self.bodies: list[bytes] = []
        self.connections = 0
        self.sock = socket.socket()
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind(("127.0.0.1", port))
        self.sock.listen(64)
        self.port = self.sock.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self.closing = False
        self.threads: list[threading.Thread] = []
        self.clients: list[socket.socket] = []
        t = threading.Thread(target=self._accept, daemon=True)
        t.start()
        self.threads.append(t)

    def _accept(self):
        while not self.closing:
            try:
                c, _ = self.sock.accept()
            except OSError:
                return
            self.connections += 1
            self.clients.append(c)
            t = threading.Thread(target=self._serve, args=(c,), daemon=True)
            t.start()

    def _serve(self, c: socket.socket):
        buf = b""
        c.settimeout(30)
        try:
            while True:
                while b"\r\n\r\n" not in buf:
                    data = c.recv(65536)
                    if not data:
                        return
                    buf += data
                head, buf = buf.split(b"\r\n\r\n", 1)
                self.requests.append(head)
                lower = head.lower()
                body = b""
                if b"transfer-encoding: chunked" in lower:
                    while True:
                        while b"\r\n" not in buf:
                            buf += c.recv(65536)
                        line, buf = buf.split(b"\r\n", 1)
                        size = int(line.split(b";")[0], 16)
                        while len(buf) < size + 2:
                            more = c.recv(1 << 20)
                            if not more:
                                return
                            buf += more
                        body_piece, buf = buf[:size], buf[size + 2:]
                        if size == 0:
                            break
                        body += body_piece
                elif b"content-length:" in lower:
                    n = int(lower.split(b"content-length:")[1].split(b"\r\n")[0])
                    while len(buf) < n:
                        more = c.recv(1 << 20)
                        if not more:
                            return
                        buf += more
                    body, buf = buf[:n], buf[n:]
                self.bodies.append(body)
                answer = self.respond(head, body)
                if answer is None:
                    return
                if callable(answer):
                    answer(c)
                    return
                c.sendall(answer)
        except OSError:
            return
        finally:
            c.close()

    def close(self):
        self.closing = True
        # shutdown() first: close() alone neither wakes a thread blocked in
        # accept()/recv() on the socket nor sends a FIN while that thread holds
        # it, so a peer could wait on a backend that is "closed".
        for sock in (self.sock, *self.clients):
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            sock.close()


def response(body: bytes, *headers: str, status: str = "200 OK") -> bytes:
    extra = "".join(h + "\r\n" for h in headers)
    return f"HTTP/1.1 {status}\r\n{extra}Content-Length: {len(body)}\r\n\r\n".encode() + body
