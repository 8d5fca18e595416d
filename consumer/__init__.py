"""The consumer library: handlers that apply each message exactly once through the inbox table."""
