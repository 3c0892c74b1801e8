"""The OLA-VLM model: vision towers, projector, sequence builder, task tokens, predictors, OlaVLM."""
