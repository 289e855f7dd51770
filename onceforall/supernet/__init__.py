"""The elastic supernet: its search space, ops and modules, BN recalibration, subnet
evaluation, exact MACs/params, checkpoints, and the importer of MIT's published supernets."""
