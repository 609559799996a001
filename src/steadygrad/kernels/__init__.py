"""Fast paths derived from the reference transforms: flat buffers and the compiled fused step."""

from .flat import FlatGroup
from .fused import FusedStep, compile_enabled

__all__ = ["FlatGroup", "FusedStep", "compile_enabled"]
