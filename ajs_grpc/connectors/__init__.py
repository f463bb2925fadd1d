"""Connectors: where requests wait and Responses are kept."""

from ajs_grpc.connectors.base import Claim, Connector, ConnectorListener, JobFilter, Page, Renewal
from ajs_grpc.connectors.memory import MemoryConnector

__all__ = ["Claim", "Connector", "ConnectorListener", "JobFilter", "MemoryConnector", "Page", "Renewal"]
