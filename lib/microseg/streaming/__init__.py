"""Near-real-time segments with Structured Streaming."""
