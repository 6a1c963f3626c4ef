"""Hostile peers on loopback for the tests and the benchmark: a raw server, a proxy, a CA.

HostileServer answers each connection with the next behaviour of its script (slow bytes,
endless bodies, garbage, silence, resets), then like a healthy StackSense server.
ConnectProxy is an HTTP proxy (CONNECT tunnels and absolute-form requests) with Basic
credentials. make_ca() writes a throwaway CA and a certificate for 127.0.0.1 / localhost.
"""

import base64
import datetime
import itertools
import json
import select
import socket
import ssl
import struct
import threading
import time
import urllib.parse

GOOD_ANSWER = {"status": "ok", "server_id": 42, "server_name": "web-01",
               "heartbeat_received": True, "authenticated": True}


def response(status=200, body=b"", headers=(), length=True, reason="OK"):
    if not isinstance(body, bytes):
        body = body.encode() if isinstance(body, str) else json.dumps(body).encode()
    head = [f"HTTP/1.1 {status} {reason}"]
    head += [f"{name}: {value}" for name, value in headers]
    if length:
        head.append(f"Content-Length: {len(body)}")
    head.append("Connection: close")
    return ("\r\n".join(head) + "\r\n\r\n").encode("latin-1") + body


# -- behaviours: each is called with (connection, stop event) after the request was read


def answer(status=200, body=None, headers=(), **kwargs):
    data = response(status, GOOD_ANSWER if body is None else body, headers, **kwargs)
    return lambda conn, stop: conn.sendall(data)


def send_raw(data, then_wait_s=0.0):
    def behave(conn, stop):
        conn.sendall(data)
        stop.wait(then_wait_s)

    return behave


def trickle(data, every_s=0.05):
    """Send `data` (bytes, or an endless iterator of bytes) one byte every `every_s`."""

    def behave(conn, stop):
        for byte in (bytes([b]) for b in data) if isinstance(data, bytes) else data:
            if stop.wait(every_s):
                return
            conn.sendall(byte)

    return behave


def endless_headers():
    return itertools.chain([b"HTTP/1.1 200 OK\r\n"], itertools.cycle([b"X"]))


def endless_body(headers=b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n\r\n",
                 chunk=b"[" * 65536):
    """Headers without a length, then `chunk` for ever, as fast as the reader takes it."""

    def behave(conn, stop):
        conn.sendall(headers)
        while not stop.is_set():
            conn.sendall(chunk)

    return behave


def big_body(megabytes):
    def behave(conn, stop):
        conn.sendall(f"HTTP/1.1 200 OK\r\nContent-Length: {megabytes << 20}\r\n\r\n".encode())
        block = b" " * 65536
        for _ in range(megabytes * 16):
            if stop.is_set():
                return
            conn.sendall(block)

    return behave


def echo(server, status=500):
    """Answer `status` with the request echoed: head and body as sent, percent-encoded, and
    base64-encoded, as some proxies and error pages do (secrets in every form)."""

    def behave(conn, stop):
        head, body = server.requests[-1]
        text = head + "\r\n\r\n" + body.decode("latin-1")
        echoed = text + "\n" + urllib.parse.quote(text, safe="") + "\n" + \
            base64.b64encode(text.encode("latin-1")).decode()
        conn.sendall(response(status, echoed, headers=[("Content-Type", "text/plain")]))

    return behave


def interim_then(final, *interim_statuses):
    """Interim 1xx answers (103 Early Hints, 102 Processing) before the final answer."""
    heads = b"".join(f"HTTP/1.1 {status} Interim\r\nLink: </style.css>; rel=preload\r\n"
                     "\r\n".encode() for status in interim_statuses)
    return lambda conn, stop: conn.sendall(heads + final)


def header_flood(lines, line_bytes, status=200):
    """A head of `lines` header lines of `line_bytes` each, then a good answer."""
    filler = ("X-Flood: " + "a" * max(0, line_bytes - 11) + "\r\n").encode()

    def behave(conn, stop):
        body = json.dumps(GOOD_ANSWER).encode()
        conn.sendall(f"HTTP/1.1 {status} OK\r\nContent-Length: {len(body)}\r\n".encode())
        for _ in range(lines):
            if stop.is_set():
                return
            conn.sendall(filler)
        conn.sendall(b"\r\n" + body)

    return behave


def silence(conn, stop):
    stop.wait(30)


def reset(conn, stop):
    conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))


class HostileServer:
    """A TCP (or TLS) server on 127.0.0.1:0 whose connections follow a script of behaviours."""

    def __init__(self, tls_context=None, host="127.0.0.1"):
        self.tls_context = tls_context
        self.script = []
        self.requests = []
        self.connections = 0
        self.lock = threading.Lock()
        self.stop = threading.Event()
        self.listener = socket.socket()
        self.listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.listener.bind((host, 0))
        self.listener.listen(32)
        self.listener.settimeout(0.05)
        self.port = self.listener.getsockname()[1]
        self.url = ("https" if tls_context else "http") + f"://{host}:{self.port}"
        self.threads = []
        self.acceptor = threading.Thread(target=self.accept_loop, daemon=True)
        self.acceptor.start()

    def then(self, *behaviours):
        with self.lock:
            self.script.extend(behaviours)
        return self

    def accept_loop(self):
        while not self.stop.is_set():
            try:
                conn, _ = self.listener.accept()
            except OSError:
                continue
            with self.lock:
                self.connections += 1
                behaviour = self.script.pop(0) if self.script else answer()
            thread = threading.Thread(target=self.serve, args=(conn, behaviour), daemon=True)
            self.threads.append(thread)
            thread.start()

    def serve(self, conn, behaviour):
        try:
            conn.settimeout(5)
            if self.tls_context:
                conn = self.tls_context.wrap_socket(conn, server_side=True)
            self.requests.append(read_request(conn))
            behaviour(conn, self.stop)
        except (OSError, ValueError):
            pass  # the agent hung up: that is what the tests want
        finally:
            conn.close()

    def close(self):
        self.stop.set()
        self.acceptor.join()
        self.listener.close()
        for thread in self.threads:
            thread.join(5)


def read_request(conn):
    """Read one request head and its Content-Length body; return (head text, body)."""
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = conn.recv(65536)
        if not chunk:
            raise ValueError("no request")
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    length = 0
    for line in head.split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            length = int(value)
    while len(body) < length:
        chunk = conn.recv(65536)
        if not chunk:
            break
        body += chunk
    return head.decode("latin-1"), body


class DeadAddress:
    """An address:port that drops connection attempts, as a broken route does: a listener
    whose accept queue is full (Linux then drops new SYNs, and a connect hangs)."""

    def __init__(self, host, port):
        self.listener = socket.socket()
        self.listener.bind((host, port))
        self.listener.listen(0)
        self.fillers = []
        for _ in range(2):
            filler = socket.socket()
            filler.setblocking(False)
            filler.connect_ex((host, port))
            self.fillers.append(filler)
        time.sleep(0.05)

    def close(self):
        for sock in [*self.fillers, self.listener]:
            sock.close()


class ConnectProxy:
    """An HTTP proxy on 127.0.0.1:0 with Basic credentials: CONNECT tunnels to loopback.

    `trickle_s` set: answers CONNECT with an endless header, one byte every trickle_s.
    """

    def __init__(self, user="agent", password="s3cret-proxy-pw", trickle_s=None, refuse=407):
        self.refuse = refuse  # the answer to wrong credentials: 407, or 401 as tinyproxy does
        self.expected = "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()
        self.trickle_s = trickle_s
        self.requests = []
        self.stop = threading.Event()
        self.listener = socket.socket()
        self.listener.bind(("127.0.0.1", 0))
        self.listener.listen(16)
        self.listener.settimeout(0.05)
        self.port = self.listener.getsockname()[1]
        self.threads = []
        self.acceptor = threading.Thread(target=self.accept_loop, daemon=True)
        self.acceptor.start()

    def url(self, user="agent", password="s3cret-proxy-pw"):
        return f"http://{user}:{password}@127.0.0.1:{self.port}"

    def accept_loop(self):
        while not self.stop.is_set():
            try:
                conn, _ = self.listener.accept()
            except OSError:
                continue
            thread = threading.Thread(target=self.serve, args=(conn,), daemon=True)
            self.threads.append(thread)
            thread.start()

    def serve(self, conn):
        try:
            conn.settimeout(5)
            head, _ = read_request(conn)
            request_line, *lines = head.split("\r\n")
            headers = dict(line.split(": ", 1) for line in lines if ": " in line)
            self.requests.append(request_line)
            if headers.get("Proxy-Authorization") != self.expected:
                conn.sendall(response(self.refuse, "proxy auth required", reason="Proxy "
                                      "Authentication Required" if self.refuse == 407
                                      else "Unauthorized",
                                      headers=[("Proxy-Authenticate", "Basic")]))
                return
            method, target, _ = request_line.split(" ")
            if method != "CONNECT" or not target.startswith("127.0.0.1:"):
                conn.sendall(response(403, "only CONNECT to loopback"))
                return
            if self.trickle_s:
                trickle(endless_headers(), self.trickle_s)(conn, self.stop)
                return
            upstream = socket.create_connection(("127.0.0.1", int(target.split(":")[1])))
            conn.sendall(b"HTTP/1.1 200 Connection established\r\n\r\n")
            self.pipe(conn, upstream)
        except (OSError, ValueError):
            pass
        finally:
            conn.close()

    def pipe(self, conn, upstream):
        with upstream:
            conn.settimeout(None)
            while not self.stop.is_set():
                readable, _, _ = select.select([conn, upstream], [], [], 0.05)
                for source in readable:
                    data = source.recv(65536)
                    if not data:
                        return
                    (upstream if source is conn else conn).sendall(data)

    def close(self):
        self.stop.set()
        self.acceptor.join()
        self.listener.close()
        for thread in self.threads:
            thread.join(5)


def make_ca(directory, name="Throwaway Test CA"):
    """Write ca.pem, server.pem and server.key (127.0.0.1 / localhost) into `directory`."""
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    now = datetime.datetime.now(datetime.timezone.utc)

    def build(subject, issuer, public_key, signing_key, ca, sans=None):
        builder = (x509.CertificateBuilder()
                   .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)]))
                   .issuer_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, issuer)]))
                   .public_key(public_key).serial_number(x509.random_serial_number())
                   .not_valid_before(now - datetime.timedelta(hours=1))
                   .not_valid_after(now + datetime.timedelta(days=2))
                   .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True))
        if sans:
            builder = builder.add_extension(x509.SubjectAlternativeName(sans), critical=False)
        return builder.sign(signing_key, hashes.SHA256())

    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_cert = build(name, name, ca_key.public_key(), ca_key, True)
    server_key = ec.generate_private_key(ec.SECP256R1())
    server_cert = build("127.0.0.1", name, server_key.public_key(), ca_key, False, [
        x509.IPAddress(ipaddress.ip_address("127.0.0.1")), x509.DNSName("localhost")])
    pem = serialization.Encoding.PEM
    (directory / "ca.pem").write_bytes(ca_cert.public_bytes(pem))
    (directory / "server.pem").write_bytes(server_cert.public_bytes(pem))
    (directory / "server.key").write_bytes(server_key.private_bytes(
        pem, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()))
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(str(directory / "server.pem"), str(directory / "server.key"))
    return str(directory / "ca.pem"), context


class NotifyRecorder:
    """A NOTIFY_SOCKET datagram socket recording (monotonic time, message) in a thread."""

    def __init__(self, path):
        self.path = str(path)
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(self.path)
        self.sock.settimeout(0.05)
        self.messages = []
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self.loop, daemon=True)
        self.thread.start()

    def loop(self):
        while not self.stop.is_set():
            try:
                data = self.sock.recv(4096)
            except OSError:
                continue
            self.messages.append((time.monotonic(), data.decode()))

    def pings(self):
        return [at for at, message in self.messages if "WATCHDOG=1" in message]

    def close(self):
        self.stop.set()
        self.thread.join()
        self.sock.close()
