"""Fast paths derived from the reference transforms: flat buffers and the compiled fused step."""

from .flat import FlatGroup
from .fused import FusedExecutor, compile_enabled

__all__ = ["FlatGroup", "FusedExecutor", "compile_enabled"]
