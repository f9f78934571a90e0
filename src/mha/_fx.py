"""``torch.fx`` symbolic tracing: mha's modules are leaves of a trace, as ``torch.nn``'s are.

torch.fx's tracer records a call of a ``torch.nn`` module as one ``call_module``
node and traces into every other module. Traced into, mha's forward would meet
proxies where it checks shapes and reads masks, and fail where torch's module
traced (``torch.fx.symbolic_trace``, FX quantization, feature extractors built on
fx). mha's modules record themselves as that one node instead; the graph calls
them with real tensors when it runs.
"""

from __future__ import annotations

from typing import Any

from torch import nn
from torch.fx import Proxy, Tracer


def leaf_call(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], cache: Any = None) -> Any:
    """The ``call_module`` node of ``module(*args, **kwargs, cache=cache)`` when an argument
    is a ``torch.fx.Proxy`` (the call is being traced) and ``module`` is not the traced
    root: a proxy of what the call returns (typed Any, as it stands for the module's
    outputs); None otherwise, and the call runs as usual. ``cache``, mha's own argument,
    is recorded only when given: the graph then calls torch's module as well (after
    ``mha.swap(graph_module, to="torch")``)."""
    if cache is not None:
        kwargs = {**kwargs, "cache": cache}
    for arg in (*args, *kwargs.values()):
        if isinstance(arg, Proxy):
            tracer = arg.tracer
            if not isinstance(tracer, Tracer) or getattr(tracer, "root", None) is module:
                return None
            return tracer.create_proxy("call_module", tracer.path_of_module(module), args, kwargs)
    return None
