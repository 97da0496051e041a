"""The compiler: flows traced into graphs (``trace``), and later placed and scheduled.

Pure: it imports no CUDA and creates no process group, so it runs anywhere.
"""

from flowgraph.compiler.graph import Graph, Node, SourceLocation
from flowgraph.compiler.trace import Proxy, TracedFlow, Tracer, trace_flow

__all__ = ["Graph", "Node", "Proxy", "SourceLocation", "TracedFlow", "Tracer", "trace_flow"]
