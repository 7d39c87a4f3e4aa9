"""sharding_roofline: plan and cost sharded einsums across TPU and GPU meshes."""

__version__ = "0.1.0"
