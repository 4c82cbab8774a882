"""Implementation modules; see the public package of the same name."""
