"""The data path of the relay: client -> peer (Send indication, ChannelData) and peer -> client.

    from the client                 to the peer, when
    Send indication                 XOR-PEER-ADDRESS has a permission (its IP) and the
                                    to-peer bucket has room
    ChannelData                     the channel is bound (and not expired) and, likewise,
                                    permission and bandwidth allow
    from a peer                     to the client
    any datagram                    ChannelData (padded over TCP) when a channel is bound to the
                                    peer, else a Data indication; needs a permission and room in
                                    the to-client bucket; longer than 1528 bytes: dropped

Whatever is dropped is counted, globally (``counters``: no-allocation, no-channel,
no-permission, bandwidth, oversized, malformed) and in the allocation (``dropped``).  Anything
relayed counts as activity for the idle timeout.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable

from twisted.internet.interfaces import IReactorTime

from overlay.stun import Address, Method, StunClass, StunMessage, new_transaction_id
from overlay.turn import DATA, MAX_MESSAGE, XOR_PEER_ADDRESS, ChannelData, TurnError
from relay.allocations import Allocation, ClientKey

#: A Data indication adds 36 bytes (header, XOR-PEER-ADDRESS, DATA's header) to the data.
DATA_INDICATION_OVERHEAD = 36


class DataPath:
    def __init__(
        self,
        clock: IReactorTime,
        allocations: dict[ClientKey, Allocation],
        deliver: Callable[[ClientKey, bytes], None],
        counters: Counter[str],
    ) -> None:
        self.clock = clock
        self.allocations = allocations
        self.deliver = deliver
        self.counters = counters

    # -- data --------------------------------------------------------------------------------

    def _drop(self, allocation: Allocation | None, reason: str) -> None:
        self.counters[reason] += 1
        if allocation is not None:
            allocation.stats["dropped"] += 1

    def send_indication(self, client: ClientKey, message: StunMessage) -> None:
        allocation = self.allocations.get(client)
        if allocation is None:
            self._drop(None, "no-allocation")
            return
        peer, data = message.get(XOR_PEER_ADDRESS), message.get(DATA)
        if peer is None or data is None:
            self._drop(allocation, "malformed")
            return
        self._to_peer(allocation, peer, data)

    def channel_data(self, client: ClientKey, data: bytes) -> None:
        try:
            frame = ChannelData.parse(data)
        except TurnError:
            self.counters["malformed"] += 1
            return
        allocation = self.allocations.get(client)
        if allocation is None:
            self._drop(None, "no-allocation")
            return
        peer = allocation.channel_peer(frame.channel, self.clock.seconds())
        if peer is None:
            self._drop(allocation, "no-channel")
            return
        self._to_peer(allocation, peer, frame.data)

    def _to_peer(self, allocation: Allocation, peer: Address, data: bytes) -> None:
        now = self.clock.seconds()
        if not allocation.permitted(peer[0], now):
            self._drop(allocation, "no-permission")
            return
        if not allocation.to_peer.take(len(data), now):
            self._drop(allocation, "bandwidth")
            return
        allocation.socket.send(data, peer)
        allocation.last_relayed = now
        allocation.stats["packets-to-peer"] += 1
        allocation.stats["bytes-to-peer"] += len(data)
        self.counters["relayed-to-peer"] += 1

    def from_peer(self, allocation: Allocation, data: bytes, peer: Address) -> None:
        if self.allocations.get(allocation.key) is not allocation:
            return  # deleted; its socket is closing
        now = self.clock.seconds()
        if (
            len(data) > MAX_MESSAGE - DATA_INDICATION_OVERHEAD
        ):  # the Data indication's header and attributes
            self._drop(allocation, "oversized")
            return
        if not allocation.permitted(peer[0], now):
            self._drop(allocation, "no-permission")
            return
        if not allocation.to_client.take(len(data), now):
            self._drop(allocation, "bandwidth")
            return
        number = allocation.peer_channel(peer, now)
        if number is not None:
            out = ChannelData(number, data).to_bytes(padded=allocation.key[0] == "tcp")
        else:
            indication = StunMessage(
                Method.DATA,
                StunClass.INDICATION,
                new_transaction_id(),
                (XOR_PEER_ADDRESS(peer), DATA(data)),
            )
            out = bytes(indication)
        allocation.last_relayed = now
        allocation.stats["packets-to-client"] += 1
        allocation.stats["bytes-to-client"] += len(data)
        self.counters["relayed-to-client"] += 1
        self.deliver(allocation.key, out)
