"""Command-line tools for weight files: inspect, convert, make_tiny."""
