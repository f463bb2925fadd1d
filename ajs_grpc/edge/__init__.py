"""The gRPC edge: proto <-> model mapping, the servicer and its pipeline, auth, config, server assembly."""
