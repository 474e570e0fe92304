"""unCLIP (DALL-E 2) text-to-image: `from unclip import UnCLIPPipeline`."""

__all__ = ["UnCLIPPipeline", "UnCLIPOutput"]


def __getattr__(name: str):
    """The API loads on first use (PEP 562), so `import unclip.errors` stays free of torch."""
    if name in __all__:
        from unclip import api

        return getattr(api, name)
    raise AttributeError(f"module 'unclip' has no attribute {name!r}")
