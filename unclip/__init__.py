"""unCLIP (DALL-E 2) text-to-image: `from unclip import UnCLIPPipeline`."""
from unclip.api import UnCLIPOutput, UnCLIPPipeline

__all__ = ["UnCLIPPipeline", "UnCLIPOutput"]
