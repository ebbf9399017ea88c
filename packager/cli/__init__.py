"""The command line: parses options, calls stages, converts errors once."""
