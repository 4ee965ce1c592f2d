"""
A Triton replica whose name starts resolving (a scaled-up pod once Ready) is probed up at once: gRPC backs a
failed lookup off per channel, up to two minutes, so the endpoint makes new channels while its name does not
resolve (bff/triton.py). A DNS server on loopback answers NXDOMAIN and then the address; a gRPC server there
answers liveness, as Triton does.
"""

from __future__ import annotations

import asyncio
import struct
import time

import grpc
from tritonclient.grpc import service_pb2, service_pb2_grpc

from bff.triton import UNRESOLVED, Endpoint

A, NXDOMAIN = 1, 3
BACKED_OFF = 3  # gRPC's own lookups come at ~0, 1 and 2.6 s, the next one 2 s or more after that


class Dns(asyncio.DatagramProtocol):
    """NXDOMAIN for every name until `address` is set, then that IPv4 address (and no IPv6 one)."""

    def __init__(self) -> None:
        self.address: str | None = None
        self.lookups = 0  # A queries seen

    def connection_made(self, transport: asyncio.DatagramTransport) -> None:
        self.transport = transport

    def datagram_received(self, data: bytes, addr: tuple) -> None:
        end = 12  # the header; the question's name follows as length-prefixed labels
        while data[end]:
            end += data[end] + 1
        question, (qtype,) = data[12:end + 5], struct.unpack("!H", data[end + 1:end + 3])
        self.lookups += qtype == A
        answer = self.address is not None and qtype == A
        flags = 0x8180 | (0 if self.address else NXDOMAIN)  # a response, recursion desired and available
        reply = struct.pack("!6H", data[0] << 8 | data[1], flags, 1, int(answer), 0, 0) + question
        if answer:  # the name by pointer to the question, class IN, TTL 0, four bytes
            reply += struct.pack("!HHHIH4B", 0xC00C, A, 1, 0, 4, *map(int, self.address.split(".")))
        self.transport.sendto(reply, addr)


class Live(service_pb2_grpc.GRPCInferenceServiceServicer):
    async def ServerLive(self, request, context) -> service_pb2.ServerLiveResponse:
        return service_pb2.ServerLiveResponse(live=True)


async def _replica_appears() -> None:
    transport, dns = await asyncio.get_running_loop().create_datagram_endpoint(Dns, local_addr=("127.0.0.1", 0))
    server = grpc.aio.server()
    service_pb2_grpc.add_GRPCInferenceServiceServicer_to_server(Live(), server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    # the dns:// authority sends this channel's lookups to the server above
    endpoint = Endpoint(f"dns://127.0.0.1:{transport.get_extra_info('sockname')[1]}/replica.test:{port}", "")
    try:
        deadline = time.monotonic() + 10
        while dns.lookups < BACKED_OFF and time.monotonic() < deadline:
            assert not await endpoint.alive() and UNRESOLVED in endpoint.why, endpoint.why
            await asyncio.sleep(0.05)
        dns.address = "127.0.0.1"  # the pod is Ready: its name resolves now
        assert await endpoint.alive(), endpoint.why  # the next probe, not gRPC's next lookup seconds later
        await asyncio.wait_for(endpoint.channel.channel_ready(), 1)  # and streams go to it too
    finally:
        await endpoint.close()
        await server.stop(None)
        transport.close()


def test_a_replica_whose_name_resolves_later_is_probed_up_at_once():
    asyncio.run(_replica_appears())
