"""The gateway's transports: FastAPI over HTTP and gRPC, both over one pipeline."""
