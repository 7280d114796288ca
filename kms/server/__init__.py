"""The gRPC edge: configuration, authentication, servicers, error mapping and the process entry point."""
