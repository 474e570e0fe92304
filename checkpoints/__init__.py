"""Shipped pipelines (`mnist/`, ...), installed as the package `t2i.checkpoints` so a wheel carries them."""
