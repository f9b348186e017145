"""A lighter session state for amqtt's ``Session``.

amqtt gives every session its own ``transitions.Machine`` (states, transitions, events and
callbacks as objects): about 20 KB and tens of microseconds per CONNECT, for a three-state machine.
On a gateway holding ten thousand idle devices that is most of the broker's memory per device
(stack-notes: ~54 KB). ``SessionStates`` keeps the interface amqtt uses (``state``, ``connect()``,
``disconnect()``, ``is_connected()``, ...) and the same rules, raising the same ``MachineError``.
Its queues are ``LightQueue``s (see ``otad.mqtt.light``).
"""

from __future__ import annotations

from amqtt.mqtt.protocol import broker_handler
from amqtt.session import Session
from transitions import MachineError

from otad.mqtt.light import LightQueue

# trigger -> {source state: destination state}, as amqtt's Session._init_states declares them.
_TRANSITIONS = {
    "connect": {"new": "connected", "disconnected": "connected"},
    "disconnect": {"connected": "disconnected", "new": "disconnected", "disconnected": "disconnected"},
}


class SessionStates:
    __slots__ = ("_session", "state")

    def __init__(self, session: Session) -> None:
        self._session = session
        self.state = "new"

    def _fire(self, trigger: str) -> bool:
        destination = _TRANSITIONS[trigger].get(self.state)
        if destination is None:
            raise MachineError(f"Can't trigger event {trigger} from state {self.state}!")
        entering = destination != self.state
        self.state = destination
        if entering and destination == "connected":
            self._session._on_enter_connected()
        elif entering and destination == "disconnected":
            self._session._on_enter_disconnected()
        return True

    def connect(self) -> bool:
        return self._fire("connect")

    def disconnect(self) -> bool:
        return self._fire("disconnect")

    def is_new(self) -> bool:
        return self.state == "new"

    def is_connected(self) -> bool:
        return self.state == "connected"

    def is_disconnected(self) -> bool:
        return self.state == "disconnected"


class LightSession(Session):
    # otad's own per-session state lives in slots: added to the instance dict, two more keys would
    # make every session's dict grow into a private 1.5 KB copy.
    __slots__ = ("otad_verdict", "otad_filters", "otad_sent")

    def __init__(self) -> None:
        super().__init__()
        self.retained_messages = LightQueue()  # type: ignore[assignment]
        self.delivered_message_queue = LightQueue()  # type: ignore[assignment]
        self.otad_verdict = None
        self.otad_filters: set[str] | None = None
        self.otad_sent: dict[str, bytes] = {}  # command topic -> payload sent on the current connection

    def _init_states(self) -> None:
        self.transitions = SessionStates(self)  # type: ignore[assignment]

    def clear_queues(self) -> None:
        self.retained_messages = LightQueue()  # type: ignore[assignment]
        self.delivered_message_queue = LightQueue()  # type: ignore[assignment]


def use_light_sessions() -> None:
    """Make amqtt's CONNECT handling create ``LightSession``s.

    ``BrokerProtocolHandler.init_from_connect`` builds the session from the module-level name
    ``Session``; replacing that name is the one hook short of copying its 80 lines of CONNECT
    validation. It only affects the broker side of amqtt, which in this process is ours.
    """
    broker_handler.Session = LightSession  # type: ignore[misc]
