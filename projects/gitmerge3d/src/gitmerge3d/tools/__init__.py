"""Command-line tools: scene conversion and the FLOPs/latency/memory benchmark."""
