"""The ``verifily`` command line: thin argument parsing over the library."""
