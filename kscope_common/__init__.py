"""Code both the node agent and the cluster processor use: gRPC retry rules, logging setup."""
