"""Engine: the dispatcher (claim, limits, leases, shutdown), request handlers and plugin discovery.

Imports the core and the connector contract; never gRPC.
"""
