"""Use cases: each combines domain rules with the ports, and knows nothing of gRPC."""
