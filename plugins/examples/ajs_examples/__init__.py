"""Example job plugins for ajs-grpc, installed as their own distribution."""
