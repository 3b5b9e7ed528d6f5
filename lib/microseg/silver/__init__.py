"""Silver: identity stitching and sessions."""
