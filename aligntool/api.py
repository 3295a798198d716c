"""The Python API: aligntool.train, evaluate and compress, the commands as functions."""
