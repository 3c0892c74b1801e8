"""Training objectives: next-token prediction on supervised positions and the embedding losses."""
