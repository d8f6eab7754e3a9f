"""The next batches made ahead, in a background thread, on their own CUDA stream: the
pattern of NVIDIA's DALI and apex's `data_prefetcher`. Used by the GPU decode path
(`orchestrator/train/member.py`) and by evaluation's recompute path."""
from __future__ import annotations

import torch


class Prefetcher:
    """Iterator over `work(*item)` for the items of `items`, `depth` ahead, made by a
    background thread (`work` returns a tuple of tensors: augmented batches here, ready
    batches in `ensemble.core.predictions.recompute`).

    On CUDA the thread queues each item's work (decode, augmentation) on its own stream,
    so it overlaps the main stream's kernels, and its Python work overlaps the consumer's
    (torch releases the GIL inside ops). The consumer's stream waits on the item's event
    before using it. An exception in the thread is raised from `next()`; `close()` (or
    leaving a `with` block) stops the thread when the consumer stops early."""

    _END = object()

    def __init__(self, items, work, device: torch.device, depth: int = 2):
        import queue
        import threading

        self.items, self.work, self.device = items, work, torch.device(device)
        self.cuda = self.device.type == "cuda"
        self.queue: queue.Queue = queue.Queue(maxsize=depth)
        self.stopped = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True, name="prefetch")
        self.thread.start()

    def _put(self, entry) -> None:
        import queue

        while not self.stopped.is_set():
            try:
                return self.queue.put(entry, timeout=0.1)
            except queue.Full:
                continue

    def _run(self) -> None:
        stream = torch.cuda.Stream(self.device) if self.cuda else None
        try:
            for item in self.items:
                if self.stopped.is_set():
                    return
                if stream is None:
                    self._put((self.work(*item), None))
                    continue
                with torch.cuda.stream(stream):
                    out = self.work(*item)
                    event = torch.cuda.Event()
                    event.record(stream)
                self._put((out, event))
            self._put((self._END, None))
        except BaseException as exc:  # noqa: BLE001 - handed to the consumer
            self._put((exc, None))

    def close(self) -> None:
        self.stopped.set()
        self.thread.join(timeout=5)

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __iter__(self):
        return self

    def __next__(self):
        out, event = self.queue.get()
        if out is self._END:
            raise StopIteration
        if isinstance(out, BaseException):
            raise out
        if event is not None:
            current = torch.cuda.current_stream(self.device)
            current.wait_event(event)
            for t in out:
                if isinstance(t, torch.Tensor) and t.is_cuda:
                    t.record_stream(current)  # the allocator must not hand them back to the side stream early
        return out
