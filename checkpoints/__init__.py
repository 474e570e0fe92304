"""Shipped pipelines (`mnist/`, ...), installed as the package `t2i_checkpoints` so a wheel carries them."""
