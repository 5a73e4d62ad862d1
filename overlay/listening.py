"""A service that listens on an endpoint and knows the address it got.

Like Twisted's ``StreamServerEndpointService`` but a failure to listen raises at once from
``startService`` (so a command can print one line and exit), and ``address`` tells the port
actually bound (for ``--port 0``).
"""

from __future__ import annotations

from typing import Any

from twisted.application.service import Service
from twisted.internet.interfaces import IListeningPort, IProtocolFactory, IStreamServerEndpoint
from twisted.python.failure import Failure


class ListeningService(Service):
    def __init__(self, endpoint: IStreamServerEndpoint, factory: IProtocolFactory) -> None:
        self.endpoint = endpoint
        self.factory = factory
        self.port: IListeningPort | None = None

    def startService(self) -> None:
        super().startService()  # type: ignore[no-untyped-call]
        outcome: list[IListeningPort | Failure] = []
        self.endpoint.listen(self.factory).addBoth(outcome.append)
        if not outcome:
            raise RuntimeError("listening did not complete at once")
        result = outcome[0]
        if isinstance(result, Failure):
            self.running = False
            result.raiseException()
        assert not isinstance(result, Failure)
        self.port = result

    def stopService(self) -> Any:
        super().stopService()  # type: ignore[no-untyped-call]
        if self.port is not None:
            port, self.port = self.port, None
            return port.stopListening()
        return None

    def attach(self, parent: Any) -> ListeningService:
        """``setServiceParent``, typed."""
        self.setServiceParent(parent)  # type: ignore[no-untyped-call]
        return self

    @property
    def address(self) -> Any:
        return self.port.getHost() if self.port is not None else None
