"""Training recipes, one per trainable stage, over the loop in `stages.trainer`."""
