"""One config per row of the paper's tables (Geigle et al., TACL 2022); shared settings: common."""
