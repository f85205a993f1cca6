"""A raw client of Streamlit's websocket protocol (BackMsg / ForwardMsg protobufs), for the tests that act as a
hostile client rather than a browser: it sends what it likes, as fast as it likes."""
from __future__ import annotations

import time
from dataclasses import dataclass, field

from streamlit.proto.BackMsg_pb2 import BackMsg
from streamlit.proto.ForwardMsg_pb2 import ForwardMsg
from streamlit.proto.WidgetStates_pb2 import WidgetState
from websockets.sync.client import connect


@dataclass
class Run:
    """What one script run sent: the elements' protos (delta.new_element), in order."""
    elements: list = field(default_factory=list)

    def widget(self, kind: str, label: str):
        for element in self.elements:
            if element.WhichOneof("type") == kind and getattr(element, kind).label == label:
                return getattr(element, kind)
        raise LookupError(f"no {kind} labelled {label!r} in {[e.WhichOneof('type') for e in self.elements]}")

    def texts(self, kind: str) -> list[str]:
        """The bodies of elements of a kind (alert, markdown, ...)."""
        out = []
        for element in self.elements:
            if element.WhichOneof("type") == kind:
                proto = getattr(element, kind)
                out.append(getattr(proto, "body", ""))
        return out


class StreamlitClient:
    def __init__(self, url: str):
        self.ws = connect(url.replace("http://", "ws://") + "/_stcore/stream", subprotocols=["streamlit"],
                          max_size=None)

    def send(self, msg: BackMsg) -> None:
        self.ws.send(msg.SerializeToString())

    def clear_cache(self) -> None:
        msg = BackMsg()
        msg.clear_cache = True
        self.send(msg)

    def run(self, widgets: list[WidgetState] = (), timeout: float = 60) -> Run:
        """Ask for a script run with these widget states and collect its elements until it finishes."""
        msg = BackMsg()
        msg.rerun_script.query_string = ""
        msg.rerun_script.widget_states.widgets.extend(widgets)
        self.send(msg)
        run, deadline = Run(), time.time() + timeout
        while time.time() < deadline:
            forward = ForwardMsg()
            forward.ParseFromString(self.ws.recv(timeout=max(0.1, deadline - time.time())))
            kind = forward.WhichOneof("type")
            if kind == "delta" and forward.delta.WhichOneof("type") == "new_element":
                run.elements.append(forward.delta.new_element)
            elif kind == "script_finished":
                return run
        raise TimeoutError("the script run did not finish")

    def close(self) -> None:
        self.ws.close()


def text_value(widget_id: str, text: str) -> WidgetState:
    state = WidgetState(id=widget_id)
    state.string_value = text
    return state


def trigger(widget_id: str) -> WidgetState:
    state = WidgetState(id=widget_id)
    state.trigger_value = True
    return state
