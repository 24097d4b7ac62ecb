"""Models built from glmtg.layers: one readable file per architecture."""
