"""A compiler process for parallel region builds (:func:`sdtm_compile.engines.build_inductor_parallel`).

Started as ``python <path of this file>``: it imports torch only, not this package. It reads one job per stdin
line (``<job file>\\t<artifact file>``; the job file holds an aten graph written by :func:`pickle_job` and its
input layouts), compiles it with Inductor's ``standalone_compile`` and answers one line on stdout: ``ok`` or
``error\\t<message>``. A separate interpreter, not ``multiprocessing``: spawned multiprocessing workers
re-import the user's ``__main__``, which breaks every script without an ``if __name__ == "__main__"`` guard.
"""

from __future__ import annotations

import pickle
import sys
from typing import Any


def job_bytes(aten_graph, inputs: list) -> bytes:
    """A job: the aten graph (``torch.fx._graph_pickler``, node metadata kept) and the layouts of its inputs."""
    from torch.fx._graph_pickler import GraphPickler

    layouts = [(tuple(t.shape), tuple(t.stride()), t.dtype) for t in inputs]
    return pickle.dumps((GraphPickler.dumps(aten_graph), layouts))


def pickle_job(path: str, aten_graph, inputs: list) -> None:
    """Write a job file (:func:`job_bytes`) for a compiler process."""
    with open(path, "wb") as f:
        f.write(job_bytes(aten_graph, inputs))


def compile_job(job_path: str) -> Any:
    """The aten graph in the job file ``job_path`` compiled (:func:`compile_job_bytes`)."""
    with open(job_path, "rb") as f:
        return compile_job_bytes(f.read())


def compile_job_bytes(job: bytes) -> Any:
    """The aten graph of a job compiled: an Inductor ``CompiledArtifact`` (callable, ``save``-able).

    Also how the parent process compiles a graph with count inputs itself: read back from its job, the graph
    has a fresh shape environment, which a saved artifact of symbolic counts needs (the lowered graph in memory
    still names the shape environment of its trace, and Inductor's ``save`` then fails: "no aot_autograd
    artifacts").
    """
    import torch
    from torch._inductor import standalone_compile
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.fx._graph_pickler import GraphPickler
    from torch.fx.experimental.symbolic_shapes import ShapeEnv

    pickled_graph, layouts = pickle.loads(job)
    # GraphPickler keeps the node metadata (fake values) that standalone_compile's saved artifact relies on
    graph = GraphPickler.loads(pickled_graph, FakeTensorMode(shape_env=ShapeEnv()))
    graph.recompile()
    inputs = [torch.empty_strided(shape, stride, dtype=dtype).zero_() for shape, stride, dtype in layouts]
    placeholders = [n.meta.get("val") for n in graph.graph.nodes if n.op == "placeholder"]
    symbolic = any(isinstance(s, torch.SymInt) for v in placeholders if isinstance(v, torch.Tensor) for s in v.shape)
    dynamic = "from_graph" if symbolic else "from_example_inputs"  # a count input's length stays symbolic
    with torch.no_grad():
        return standalone_compile(graph, inputs, dynamic_shapes=dynamic, donate_graph_module=True)


def warm_up() -> None:
    """Import Inductor and run its CPU probe before the first job arrives: the parent is still lowering regions.

    The probe (``valid_vec_isa_list``) compiles a test program per instruction set into Inductor's cache, under
    Inductor's file locks; the parent started the same probe earlier, so this process mostly waits for its
    programs and loads them (:mod:`sdtm_compile.engines.vec_isa_probe`).
    """
    import torch  # noqa: F401
    from torch._inductor import standalone_compile  # noqa: F401
    from torch._inductor.cpu_vec_isa import valid_vec_isa_list

    valid_vec_isa_list()


def main() -> None:
    try:
        warm_up()
    except Exception:  # the first job meets the same error and reports it
        pass
    for line in sys.stdin:
        job_path, out_path = line.rstrip("\n").split("\t")
        try:
            compile_job(job_path).save(path=out_path)
            answer = "ok"
        except Exception as err:  # reported to the parent, which builds the region itself
            answer = f"error\t{type(err).__name__}: {err}".replace("\n", " ")[:2000]
        sys.stdout.write(answer + "\n")
        sys.stdout.flush()


if __name__ == "__main__":
    main()
