"""The validator (compile on simulated devices, read the collectives, compare with the plan).

The only part of sharding_roofline that imports JAX; the hlo package itself is pure text.
"""
