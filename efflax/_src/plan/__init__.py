"""Plans: a training step compiled for hardware this machine does not have (``efflax plan``)."""
