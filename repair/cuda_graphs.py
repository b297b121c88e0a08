"""Replay a whole forward pass as a CUDA graph: the launch cost of a small model, paid once.

A transformer this size is launch-bound on a GPU: on an H100 the eager forward of the digits ViT
takes 1.4–2.7 ms at batch 1 or 64 (depending on the host CPU), nearly all of it the host
queuing small kernels, while the same kernels replayed from a graph take 0.2–0.26 ms. AtPatch's
hooks add a few dozen more kernels per hooked layer, so eager they add 27–42 %; replayed (and
compiled), 7–8 % (``bench/results/atpatch_latency_cuda.md``). AtPatch can be captured because
on a GPU its hooks decide with tensor ops and never read a value back
(``repair.atpatch.runtime``); a row gate reads one value per request, so gated versions run eager.

One graph per batch-size bucket (powers of two up to ``max_batch``), captured on first use;
a batch is padded up to its bucket and the outputs sliced back, a larger one runs in chunks:
every sample's result depends on that sample alone (no batch statistics in these models), so
neither changes an answer.
"""
from __future__ import annotations

from typing import Callable

import torch

Outputs = tuple[torch.Tensor, ...]


def bucket(n: int) -> int:
    """The smallest power of two ≥ n."""
    return 1 << max(0, (n - 1).bit_length())


class GraphedForward:
    """``fn(x) -> tuple of tensors (batch first)``, replayed from per-bucket CUDA graphs.

    ``capture=False`` runs ``fn`` eagerly on the padded batch instead: the same padding and
    slicing on any device (what the CPU tests check)."""

    def __init__(self, fn: Callable[[torch.Tensor], Outputs], max_batch: int, capture: bool = True):
        self.fn, self.max_batch, self.capture = fn, bucket(max_batch), capture
        self._graphs: dict[int, tuple[torch.cuda.CUDAGraph | None, torch.Tensor, Outputs]] = {}

    @torch.inference_mode()
    def __call__(self, x: torch.Tensor) -> Outputs:
        n = len(x)
        if n > self.max_batch:  # larger than any graph: in graph-sized chunks
            chunks = [self(part) for part in x.split(self.max_batch)]
            return tuple(torch.cat(parts) for parts in zip(*chunks))
        size = bucket(n)
        graph, static_x, outputs = self._graphs.get(size) or self._capture(size, x)
        static_x[:n].copy_(x)
        if graph is None:
            outputs = self.fn(static_x)
        else:
            graph.replay()
        # clones: the next replay overwrites the graph's output buffers
        return tuple(o[:n].clone() for o in outputs)

    def _capture(self, size: int, x: torch.Tensor):
        static_x = torch.zeros((size, *x.shape[1:]), dtype=x.dtype, device=x.device)
        if not self.capture:
            entry = (None, static_x, ())
        else:
            # Warm-up on a side stream (first calls pick kernels, torch.compile compiles), then
            # capture. thread_local: another thread may run a model meanwhile (a hot swap).
            side = torch.cuda.Stream(x.device)
            side.wait_stream(torch.cuda.current_stream(x.device))
            with torch.cuda.stream(side):
                for _ in range(3):
                    self.fn(static_x)
            torch.cuda.current_stream(x.device).wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, capture_error_mode="thread_local"):
                outputs = self.fn(static_x)
            entry = (graph, static_x, outputs)
        self._graphs[size] = entry
        return entry
