"""The compiler: from the graph Dynamo traces to engines behind a dispatcher.

* :mod:`.capture`: trace a transformer with Dynamo once and keep its graph (export, tests);
* :mod:`.buckets`: :class:`BucketGraphs`, one rewritten graph per engine the method's schedule reaches;
* :mod:`.regions`: build engines region by region, one engine per distinct region;
* :mod:`.settings`: :class:`BackendSettings`, the backends' options;
* :mod:`.backend`: the ``sdtm`` / ``sdtm_trt`` backends (:class:`SDTMBackend`);
* :mod:`.compiled`: :class:`SDTMCompiledGraph`, what the backends return to Dynamo.
"""

from .backend import SDTMBackend, sdtm, sdtm_trt
from .buckets import BucketGraphs, DistinctGraph
from .capture import capture_dynamo_graph
from .compiled import SDTMCompiledGraph, compiled_graphs
from .regions import RegionalBuilder
from .settings import BackendSettings, load_tuned_options

__all__ = [
    "BackendSettings",
    "BucketGraphs",
    "DistinctGraph",
    "RegionalBuilder",
    "SDTMBackend",
    "SDTMCompiledGraph",
    "capture_dynamo_graph",
    "compiled_graphs",
    "load_tuned_options",
    "sdtm",
    "sdtm_trt",
]
