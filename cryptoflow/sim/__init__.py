"""Local exchange simulator (REST + WebSocket on 127.0.0.1) with injectable faults.

    async with open_simulator(symbols=["BTCUSDT"], seed=0) as sim:
        sim.rest_url, sim.ws_url, sim.faults.add("ws_drop", symbol="BTCUSDT"), sim.book("BTCUSDT")

Standalone: ``python -m cryptoflow.sim --symbols BTCUSDT,ETHUSDT --port 0 --ws-port 0``.
"""

from cryptoflow.sim.faults import FAULT_KINDS, REST_FAULTS, WS_FAULTS, Fault, Faults, Stats
from cryptoflow.sim.server import Simulator, open_simulator, serve_simulator

__all__ = [
    "FAULT_KINDS",
    "REST_FAULTS",
    "WS_FAULTS",
    "Fault",
    "Faults",
    "Simulator",
    "Stats",
    "open_simulator",
    "serve_simulator",
]
