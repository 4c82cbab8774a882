"""optax transforms and training tools: SAF/MESA, sharpness probes, ProxSkip, cyclic LRs."""
