"""Implementation modules; see the public module ``efflax.losses``."""
