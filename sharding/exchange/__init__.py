"""One file per collective kind a parallel context exchanges: halo rows, K/V blocks, GroupNorm moments."""
