"""Shipping flow batches to the cluster processor: a drop-oldest buffer (``buffer``), the OTLP retry
rules (``retry``), and the background sender (``shipper``)."""

from node_exporter.ship.errors import ShipConfigError, ShipError
from node_exporter.ship.shipper import ClientTls, FlowShipper, ShipConfig

__all__ = ["ClientTls", "FlowShipper", "ShipConfig", "ShipConfigError", "ShipError"]
