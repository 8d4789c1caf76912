"""Named HTTP/2 wire constants for the protocol tests.

RFC 7541 Appendix C header blocks are copied from the RFC (each checked against the PyPI ``hpack``
decoder in test_hpack.py). The gRPC exchange was captured byte for byte with a TCP relay between a
grpcio 1.85.4 client and server (both grpc-c 58, Python) on loopback: one unary call
``/demo.v1.Echo/Ping`` with a traceparent answered OK, then one the server aborted with NOT_FOUND and
a grpc-message, on one connection; only the :authority port is what the relay had.
"""

from __future__ import annotations

import struct

from node_exporter.protocols.http2 import PREFACE

# -- RFC 7541 Appendix C ------------------------------------------------------------------

C3_REQUESTS = (  # C.3: requests without Huffman coding, one connection
    bytes.fromhex("828684410f7777772e6578616d706c652e636f6d"),
    bytes.fromhex("828684be58086e6f2d6361636865"),
    bytes.fromhex("828785bf400a637573746f6d2d6b65790c637573746f6d2d76616c7565"),
)
C4_REQUESTS = (  # C.4: the same requests with Huffman coding
    bytes.fromhex("828684418cf1e3c2e5f23a6ba0ab90f4ff"),
    bytes.fromhex("828684be5886a8eb10649cbf"),
    bytes.fromhex("828785bf408825a849e95ba97d7f8925a849e95bb8e8b4bf"),
)
C_REQUEST_FIELDS = (
    ((b":method", b"GET"), (b":scheme", b"http"), (b":path", b"/"), (b":authority", b"www.example.com")),
    ((b":method", b"GET"), (b":scheme", b"http"), (b":path", b"/"), (b":authority", b"www.example.com"),
     (b"cache-control", b"no-cache")),
    ((b":method", b"GET"), (b":scheme", b"https"), (b":path", b"/index.html"), (b":authority", b"www.example.com"),
     (b"custom-key", b"custom-value")),
)  # fmt: skip
C_REQUEST_TABLE_SIZES = (57, 110, 164)  # dynamic table size after each request (RFC text)
C5_RESPONSES = (  # C.5: responses without Huffman, table size 256 (evictions in the 2nd and 3rd)
    bytes.fromhex(
        "4803333032580770726976617465611d4d6f6e2c203231204f637420323031332032303a31333a323120474d546e17"
        "68747470733a2f2f7777772e6578616d706c652e636f6d"
    ),
    bytes.fromhex("4803333037c1c0bf"),
    bytes.fromhex(
        "88c1611d4d6f6e2c203231204f637420323031332032303a31333a323220474d54c05a04677a69707738666f6f3d4153"
        "444a4b48514b425a584f5157454f50495541585157454f49553b206d61782d6167653d333630303b2076657273696f6e3d31"
    ),
)
C6_RESPONSES = (  # C.6: the same responses with Huffman coding
    bytes.fromhex(
        "488264025885aec3771a4b6196d07abe941054d444a8200595040b8166e082a62d1bff6e919d29ad171863c78f0b97c8e9ae82ae43d3"
    ),
    bytes.fromhex("4883640effc1c0bf"),
    bytes.fromhex(
        "88c16196d07abe941054d444a8200595040b8166e084a62d1bffc05a839bd9ab77ad94e7821dd7f2e6c7b335dfdfcd5b"
        "3960d5af27087f3672c1ab270fb5291f9587316065c003ed4ee5b1063d5007"
    ),
)
C_RESPONSE_STATUS = (b"302", b"307", b"200")
C_RESPONSE_TABLE_SIZES = (222, 222, 215)
C_RESPONSE_TABLE_ENTRIES = (4, 4, 3)
SIZE_UPDATE_256 = bytes.fromhex("3fe101")  # dynamic table size update to 256 (5-bit prefix integer)

# -- grpcio 1.85.4 client <-> server, one connection --------------------------------------

GRPC_C2S = bytes.fromhex(
    "505249202a20485454502f322e300d0a0d0a534d0d0a0d0a000024040000000000000200000000000300000000000400"
    "400000000500400000000600004000fe0300000001000004080000000000003f00010000000401000000000001140104"
    "0000000140053a70617468122f64656d6f2e76312e4563686f2f50696e67400a3a617574686f726974790f3132372e30"
    "2e302e313a34343737338386400c636f6e74656e742d74797065106170706c69636174696f6e2f677270634002746508"
    "747261696c6572734014677270632d6163636570742d656e636f64696e67176964656e746974792c206465666c617465"
    "2c20677a6970400a757365722d6167656e7430677270632d707974686f6e2f312e38352e3420677270632d632f35382e"
    "302e3020286c696e75783b2063687474703229000b7472616365706172656e743730302d306166373635313931366364"
    "34336464383434386562323131633830333139632d623761643662373136393230333333312d30310000040800000000"
    "010000000500000700010000000100000000026869000004080000000000000000050000080601000000009ce09bada3"
    "2a71a8000008060000000000c45df20664b97c07000008010400000003c3c28386c1c0bfbe0000040800000000030000"
    "000500000900010000000300000000046661696c0000040800000000000000000c000008060100000000eca2b8bbe480"
    "a826"
)
GRPC_S2C = bytes.fromhex(
    "000018040000000000000400400000000500400000000600004000fe0300000001000004080000000000003f00010000"
    "00040100000000000004080000000000000000070000080600000000009ce09bada32a71a800004e0104000000018840"
    "0c636f6e74656e742d74797065106170706c69636174696f6e2f677270634014677270632d6163636570742d656e636f"
    "64696e67176964656e746974792c206465666c6174652c20677a697000000c0000000000010000000007706f6e673a68"
    "6900001e010500000001400b677270632d7374617475730130000c677270632d6d657373616765000000080601000000"
    "00c45df20664b97c0700003601050000000388c0400b677270632d7374617475730135000c677270632d6d6573736167"
    "65166e6f20737563682075736572207365637265742d343200000408000000000000000009000008060000000000eca2"
    "b8bbe480a826"
)
GRPC_TRACEPARENT = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"

# -- RFC 9113 frames, written out from its section 4.1 layout -----------------------------


def frame(ftype: int, flags: int, stream_id: int, payload: bytes = b"", length: int | None = None) -> bytes:
    """A frame header (RFC 9113 4.1) and payload; ``length`` overrides the header's length field."""
    n = len(payload) if length is None else length
    return struct.pack("!BHBBI", n >> 16, n & 0xFFFF, ftype, flags, stream_id) + payload


SETTINGS_EMPTY = frame(4, 0, 0)
SETTINGS_ACK = frame(4, 1, 0)
SETTINGS_TABLE_256 = frame(4, 0, 0, struct.pack("!HI", 1, 256))
PING = frame(6, 0, 0, b"12345678")
WINDOW_UPDATE = frame(8, 0, 0, struct.pack("!I", 65535))
CLIENT_START = PREFACE + SETTINGS_EMPTY
