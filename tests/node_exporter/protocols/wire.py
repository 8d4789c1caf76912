"""Named wire constants for the protocol tests.

The curl/nginx exchanges were captured byte for byte with a TCP relay between curl 7.88.1
and nginx 1.22.1 (Debian bookworm) on loopback; only the Host port is what the relay had.
The rest is written out from the RFCs that define them, as noted on each.
"""

from __future__ import annotations

# -- curl 7.88.1 <-> nginx 1.22.1 -------------------------------------------------------

CURL_GET_QUERY = (
    b"GET /api/v1/users/42?verbose=1 HTTP/1.1\r\n"
    b"Host: 127.0.0.1:18081\r\n"
    b"User-Agent: curl/7.88.1\r\n"
    b"Accept: */*\r\n"
    b"\r\n"
)
NGINX_200_JSON = (
    b"HTTP/1.1 200 OK\r\n"
    b"Server: nginx/1.22.1\r\n"
    b"Date: Tue, 24 Nov 2026 20:48:06 GMT\r\n"
    b"Content-Type: application/json\r\n"
    b"Content-Length: 23\r\n"
    b"Last-Modified: Tue, 24 Nov 2026 20:47:56 GMT\r\n"
    b"Connection: keep-alive\r\n"
    b'ETag: "6b05f7fc-17"\r\n'
    b"Accept-Ranges: bytes\r\n"
    b"\r\n"
    b'{"id":42,"name":"ada"}\n'
)

CURL_HEAD = b"HEAD /index.html HTTP/1.1\r\nHost: 127.0.0.1:18081\r\nUser-Agent: curl/7.88.1\r\nAccept: */*\r\n\r\n"
# Content-Length: 17 describes the GET body; a response to HEAD has none.
NGINX_HEAD_200 = (
    b"HTTP/1.1 200 OK\r\n"
    b"Server: nginx/1.22.1\r\n"
    b"Date: Tue, 24 Nov 2026 20:48:06 GMT\r\n"
    b"Content-Type: text/html\r\n"
    b"Content-Length: 17\r\n"
    b"Last-Modified: Tue, 24 Nov 2026 20:47:56 GMT\r\n"
    b"Connection: keep-alive\r\n"
    b'ETag: "6b05f7fc-11"\r\n'
    b"Accept-Ranges: bytes\r\n"
    b"\r\n"
)

CURL_GET_GZIP = (
    b"GET /stream.txt HTTP/1.1\r\n"
    b"Host: 127.0.0.1:18081\r\n"
    b"User-Agent: curl/7.88.1\r\n"
    b"Accept: */*\r\n"
    b"Accept-Encoding: deflate, gzip, br, zstd\r\n"
    b"\r\n"
)
# nginx's gzip filter drops Content-Length, so HTTP/1.1 gets a chunked body.
NGINX_CHUNKED_GZIP = (
    b"HTTP/1.1 200 OK\r\n"
    b"Server: nginx/1.22.1\r\n"
    b"Date: Tue, 24 Nov 2026 20:48:06 GMT\r\n"
    b"Content-Type: text/plain\r\n"
    b"Last-Modified: Tue, 24 Nov 2026 20:47:56 GMT\r\n"
    b"Transfer-Encoding: chunked\r\n"
    b"Connection: keep-alive\r\n"
    b'ETag: W/"6b05f7fc-1b8"\r\n'
    b"Content-Encoding: gzip\r\n"
    b"\r\n"
    b"30\r\n"
    b"\x1f\x8b\x08\x00\x00\x00\x00\x00\x04\x03\xcb\xc9\xccKU\xc8OS(.)JM\xccMMQ(I\xad(\xe1\xca\x19\x15\x1d"
    b"\xe4\xe1\x00\x00\xbf\xc3\x04\xcb\xb8\x01\x00\x00\r\n"
    b"0\r\n"
    b"\r\n"
)

CURL_POST_EXPECT = (
    b"POST /upload HTTP/1.1\r\n"
    b"Host: 127.0.0.1:18081\r\n"
    b"User-Agent: curl/7.88.1\r\n"
    b"Accept: */*\r\n"
    b"Expect: 100-continue\r\n"
    b"Content-Length: 16\r\n"
    b"Content-Type: application/x-www-form-urlencoded\r\n"
    b"\r\n"
)
CURL_POST_BODY = b"name=ada&lang=en"  # sent only after the 100 Continue
NGINX_100_CONTINUE = b"HTTP/1.1 100 Continue\r\n\r\n"
NGINX_201 = (
    b"HTTP/1.1 201 Created\r\n"
    b"Server: nginx/1.22.1\r\n"
    b"Date: Tue, 24 Nov 2026 20:48:06 GMT\r\n"
    b"Content-Type: text/plain\r\n"
    b"Content-Length: 8\r\n"
    b"Connection: keep-alive\r\n"
    b"\r\n"
    b"created\n"
)

CURL_IF_NONE_MATCH = (
    b"GET /index.html HTTP/1.1\r\n"
    b"Host: 127.0.0.1:18081\r\n"
    b"User-Agent: curl/7.88.1\r\n"
    b"Accept: */*\r\n"
    b'If-None-Match: "6b05f7fc-11"\r\n'
    b"\r\n"
)
NGINX_304 = (
    b"HTTP/1.1 304 Not Modified\r\n"
    b"Server: nginx/1.22.1\r\n"
    b"Date: Tue, 24 Nov 2026 20:48:12 GMT\r\n"
    b"Last-Modified: Tue, 24 Nov 2026 20:47:56 GMT\r\n"
    b"Connection: keep-alive\r\n"
    b'ETag: "6b05f7fc-11"\r\n'
    b"\r\n"
)

# Two requests in one write (pipelining); nginx answers both, in order, in one stream.
PIPELINED_GET_1 = b"GET /index.html HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n"
PIPELINED_GET_2 = (
    b"GET /orders/7f3c2a9e-1b4d-4e8a-9c2f-0a1b2c3d4e5f/items HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n"
)
NGINX_PIPELINED_200 = (
    b"HTTP/1.1 200 OK\r\n"
    b"Server: nginx/1.22.1\r\n"
    b"Date: Tue, 24 Nov 2026 20:48:12 GMT\r\n"
    b"Content-Type: text/html\r\n"
    b"Content-Length: 17\r\n"
    b"Last-Modified: Tue, 24 Nov 2026 20:47:56 GMT\r\n"
    b"Connection: keep-alive\r\n"
    b'ETag: "6b05f7fc-11"\r\n'
    b"Accept-Ranges: bytes\r\n"
    b"\r\n"
    b"hello from nginx\n"
)
NGINX_PIPELINED_404 = (
    b"HTTP/1.1 404 Not Found\r\n"
    b"Server: nginx/1.22.1\r\n"
    b"Date: Tue, 24 Nov 2026 20:48:12 GMT\r\n"
    b"Content-Type: text/html\r\n"
    b"Content-Length: 153\r\n"
    b"Connection: close\r\n"
    b"\r\n"
    b"<html>\r\n"
    b"<head><title>404 Not Found</title></head>\r\n"
    b"<body>\r\n"
    b"<center><h1>404 Not Found</h1></center>\r\n"
    b"<hr><center>nginx/1.22.1</center>\r\n"
    b"</body>\r\n"
    b"</html>\r\n"
)

# -- from the RFCs -----------------------------------------------------------------------

# RFC 6455 1.2/1.3: the opening handshake, then one masked client text frame "Hello".
WS_UPGRADE_REQUEST = (
    b"GET /chat HTTP/1.1\r\n"
    b"Host: server.example.com\r\n"
    b"Upgrade: websocket\r\n"
    b"Connection: Upgrade\r\n"
    b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
    b"Origin: http://example.com\r\n"
    b"Sec-WebSocket-Protocol: chat, superchat\r\n"
    b"Sec-WebSocket-Version: 13\r\n"
    b"\r\n"
)
WS_101 = (
    b"HTTP/1.1 101 Switching Protocols\r\n"
    b"Upgrade: websocket\r\n"
    b"Connection: Upgrade\r\n"
    b"Sec-WebSocket-Accept: s3pPLMBiTxaQ9kYGzzhZRbK+xOo=\r\n"
    b"Sec-WebSocket-Protocol: chat\r\n"
    b"\r\n"
)
WS_CLIENT_FRAME = bytes.fromhex("818537fa213d7f9f4d5158")  # RFC 6455 5.7, masked "Hello"
WS_SERVER_FRAME = bytes.fromhex("810548656c6c6f")  # RFC 6455 5.7, unmasked "Hello"

# RFC 1945: an HTTP/1.0 response without Content-Length ends when the server closes.
HTTP10_GET = b"GET /legacy HTTP/1.0\r\nUser-Agent: Wget/1.21.3\r\n\r\n"
HTTP10_UNTIL_CLOSE = b"HTTP/1.0 200 OK\r\nContent-Type: text/plain\r\n\r\nno length, read until close\n"

# RFC 9112 7.1 with a trailer section (7.1.2).
CHUNKED_WITH_TRAILERS = (
    b"HTTP/1.1 200 OK\r\n"
    b"Transfer-Encoding: chunked\r\n"
    b"Trailer: Server-Timing\r\n"
    b"\r\n"
    b"7;ext=1\r\n"
    b"Mozilla\r\n"
    b"9\r\n"
    b"Developer\r\n"
    b"7\r\n"
    b"Network\r\n"
    b"0\r\n"
    b"Server-Timing: total;dur=12\r\n"
    b"\r\n"
)

# W3C trace-context 3.2 example.
TRACEPARENT = b"00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"
