"""Core: the model (Request, Response, states and their rules), the one error tree, the job plugin API.

Imports nothing of the project above it and nothing of gRPC.
"""
