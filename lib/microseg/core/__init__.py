"""Foundations every layer uses: config, the Spark session, the lake's tables and schemas,
run records."""
