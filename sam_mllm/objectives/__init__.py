"""Training objectives added to the language-modelling loss (SEA: ``sam_mllm.objectives.sea``)."""
