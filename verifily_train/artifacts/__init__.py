"""Run artifacts: immutable, checksummed folders under output.dir."""
