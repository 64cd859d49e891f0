"""One copy up, one copy down: how a step's numbers cross between host and device (chapter 4).

A decode step of a small model takes about a millisecond of GPU time or less, and the host has to keep up. Each
`torch.tensor(list, device="cuda")` is a separate host-to-device copy from pageable memory, which the CUDA driver
performs synchronously (it stages the bytes through a pinned bounce buffer and waits), and each `.tolist()` of a
device tensor is a device-to-host copy that waits for everything queued before it. Seven small tensors up and a few
scalars down cost more host time than the whole forward of a 135M model. So every step here does

* ONE host-to-device copy. The step's integer metadata (token ids, positions, cache slots, sequence lengths, block
  tables, the sampled rows, sampling parameters) is written into one page-locked ("pinned") host buffer, field after
  field at 16-byte-aligned offsets, and copied with one `copy_(non_blocking=True)` into a device buffer of the same
  layout; the tensors the model reads are typed views cut from it (int64 ids, int32 lengths, float32 temperatures:
  `bytes[offset:offset + n].view(dtype)`). From pinned memory the copy is a true asynchronous DMA: the host queues
  it and moves on. vLLM's persistent input buffers and TensorRT-LLM's runtime buffers follow the same idea.
* ONE device-to-host transfer: the sampled token ids, with their log-probabilities (and the logits) appended to the
  same int32 words only when a request asked for them (`download`). The host must wait for that one anyway: it needs
  the tokens to schedule the next step. Unless it schedules without them: under async scheduling
  (minillm/engine/async_step.py) the words go with `non_blocking=True` into a pinned buffer of a `DownloadRing`
  and are read one step later, and the next step's inputs take the tokens on the device (`resolve_deferred_ids`).

The host buffer is reused every step. The copy that reads it runs later, on the GPU's timeline, so before writing
new values `reserve` makes sure the previous copy has finished (an event query: free in the normal case, since the
step's token download waited for the copy long ago; a real wait only after a step that downloaded nothing).
On a CPU both buffers are ordinary memory and the copy is a memcpy: the same code path, tested without a GPU.
"""
from __future__ import annotations

import math

import numpy as np
import torch

# Every field starts at a multiple of 16 bytes. 8 would align any int64/int32/float32 view, but Triton compiles a
# kernel variant per pointer argument that is or is not 16-byte aligned: with 8, the offsets of the block table
# or the sequence lengths moved between the two classes as batch sizes changed, and the attention kernels
# recompiled mid-run (1-1.5 s each on the H200, inside the first requests' TTFT).
ALIGN = 16
_NUMPY = {torch.int64: np.int64, torch.int32: np.int32, torch.float32: np.float32}


def aligned(offset: int) -> int:
    return -(-offset // ALIGN) * ALIGN


class FieldLayout:
    """Offsets of named fields packed one after another from `start` (bytes, ALIGN-aligned)."""

    def __init__(self, start: int = 0) -> None:
        self.end = aligned(start)
        self.fields: dict[str, tuple[int, torch.dtype, tuple[int, ...]]] = {}

    def add(self, name: str, dtype: torch.dtype, shape: tuple[int, ...]) -> None:
        if dtype not in _NUMPY:
            raise ValueError(f"field {name!r}: dtype must be one of {list(_NUMPY)}, got {dtype}")
        self.fields[name] = (self.end, dtype, shape)
        self.end = aligned(self.end + math.prod(shape) * dtype.itemsize)


class UploadBuffer:
    """A pinned host buffer and a device buffer of the same size: stage fields on the host, copy once, read typed
    views on the device. `growable=False` keeps the device buffer at one address for its lifetime (CUDA graphs
    record addresses: their static inputs are views of such a buffer)."""

    def __init__(self, device: torch.device, nbytes: int, growable: bool = True) -> None:
        if nbytes < 1:
            raise ValueError(f"an upload buffer needs at least 1 byte, got {nbytes}")
        self.device, self.growable = torch.device(device), growable
        self._pinned = self.device.type == "cuda"
        self._copied = torch.cuda.Event() if self._pinned else None
        self._pending = False
        self._allocate(aligned(nbytes))

    def _allocate(self, nbytes: int) -> None:
        self.nbytes = nbytes
        self.host = torch.zeros(nbytes, dtype=torch.uint8, pin_memory=self._pinned)
        self._host_bytes = self.host.numpy()  # numpy writes a Python list straight into the pinned pages
        self.device_bytes = torch.zeros(nbytes, dtype=torch.uint8, device=self.device)
        self._views: dict = {}  # (offset, dtype, shape) -> device view; nbytes -> the slices one upload copies

    def reserve(self, nbytes: int) -> None:
        """Make the host buffer writable for `nbytes` bytes: wait for the previous copy out of it, grow if needed."""
        if self._pending and not self._copied.query():
            self._copied.synchronize()
        self._pending = False
        if nbytes > self.nbytes:
            if not self.growable:
                raise ValueError(f"this step needs {nbytes} bytes of metadata, the fixed buffer holds {self.nbytes}")
            self._allocate(aligned(max(nbytes, 2 * self.nbytes)))

    def host_view(self, offset: int, dtype: torch.dtype, shape: tuple[int, ...]) -> np.ndarray:
        """A numpy view of the host buffer: write the field's values into it."""
        size = math.prod(shape) * dtype.itemsize
        return self._host_bytes[offset:offset + size].view(_NUMPY[dtype]).reshape(shape)

    def device_view(self, offset: int, dtype: torch.dtype, shape: tuple[int, ...]) -> torch.Tensor:
        """The typed device view of a field (cached: a decode step of the same shape reuses last step's views)."""
        key = (offset, dtype, shape)
        view = self._views.get(key)
        if view is None:
            if len(self._views) >= 1024:
                self._views.clear()
            size = math.prod(shape) * dtype.itemsize
            view = self._views[key] = self.device_bytes[offset:offset + size].view(dtype).view(shape)
        return view

    def views(self, layout: FieldLayout) -> dict[str, torch.Tensor]:
        return {name: self.device_view(*spec) for name, spec in layout.fields.items()}

    def upload(self, nbytes: int) -> None:
        """The step's one host-to-device copy: bytes [0, nbytes) of the host buffer, queued without waiting."""
        pair = self._views.get(nbytes)  # the two slices, cached like the views (a decode step repeats its size)
        if pair is None:
            pair = self._views[nbytes] = (self.device_bytes[:nbytes], self.host[:nbytes])
        pair[0].copy_(pair[1], non_blocking=True)
        if self._copied is not None:
            self._copied.record()
            self._pending = True


def _tokens_alone(shapes: list[tuple[torch.dtype, torch.Size]]) -> bool:
    """One int64 part (a step's sampled tokens, nothing else asked for): sent as its own bits, two words per value,
    with no kernel on the device (narrowing and concatenating are a kernel each, ~50 us of host time on the H200)."""
    return len(shapes) == 1 and shapes[0][0] == torch.int64


def _words(parts: list[torch.Tensor]) -> torch.Tensor:
    """The parts as one device vector of int32 words: int64 values narrowed (token ids, ranks and row indices fit),
    float32 kept bit for bit; a lone int64 part bit for bit (`_tokens_alone`)."""
    if _tokens_alone([(p.dtype, p.shape) for p in parts]):
        return parts[0].reshape(-1).view(torch.int32)
    words = []
    for part in parts:
        if part.dtype == torch.float32:
            words.append(part.reshape(-1).view(torch.int32))
        elif part.dtype in (torch.int64, torch.int32):
            words.append(part.reshape(-1).to(torch.int32))
        else:
            raise TypeError(f"download takes int64, int32 or float32 tensors, got {part.dtype}")
    return torch.cat(words)


def _unpack(host: torch.Tensor, shapes: list[tuple[torch.dtype, torch.Size]], copy_floats: bool) -> list[torch.Tensor]:
    """Cut host int32 words back into tensors of the original dtypes (int64 for integer parts) and shapes.
    `copy_floats`: float parts are copied out of `host` (a reused buffer) rather than viewed."""
    if _tokens_alone(shapes):
        return [host[:2 * shapes[0][1].numel()].view(torch.int64).clone().view(shapes[0][1])]
    out, offset = [], 0
    for dtype, shape in shapes:
        n = shape.numel()
        chunk = host[offset:offset + n]
        if dtype == torch.float32:
            chunk = chunk.view(torch.float32).clone() if copy_floats else chunk.view(torch.float32)
        else:
            chunk = chunk.to(torch.int64)
        out.append(chunk.view(shape))
        offset += n
    return out


def download(parts: list[torch.Tensor]) -> list[torch.Tensor]:
    """Bring device tensors to the host in ONE transfer: each is flattened to int32 words (int64 values narrowed,
    which token ids, ranks and row indices fit; float32 by its bits), the words are concatenated on the device and
    copied once; the host cuts them back into tensors of the original dtypes (int64 for integer parts) and shapes."""
    if not parts:
        return []
    if len(parts) == 1 and parts[0].dtype != torch.float32:
        return [parts[0].cpu()]
    return _unpack(_words(parts).cpu(), [(p.dtype, p.shape) for p in parts], copy_floats=False)


class PendingDownload:
    """A download queued by DownloadRing.start: `wait()` blocks until it has landed and returns the tensors."""

    def __init__(self, ring: "DownloadRing", slot: int, generation: int, host: torch.Tensor,
                 shapes: list[tuple[torch.dtype, torch.Size]], event) -> None:
        self.ring, self.slot, self.generation = ring, slot, generation
        self.host, self.shapes, self.event = host, shapes, event

    def wait(self) -> list[torch.Tensor]:
        if self.ring.generations[self.slot] != self.generation:
            raise RuntimeError(f"download slot {self.slot} was reused before this download was read: wait for a "
                               f"step's download before starting {len(self.ring.generations)} more")
        if self.event is not None:
            self.event.synchronize()  # the only wait: for this step's sampling and its copy, not for later work
        return _unpack(self.host, self.shapes, copy_floats=True)


class DownloadRing:
    """Downloads that do not wait (async scheduling, minillm/engine/async_step.py): the step's words are copied
    with `non_blocking=True` into one of `num_slots` pinned host buffers and a CUDA event is recorded after the
    copy; the host reads them later (`PendingDownload.wait`), after it has queued the next step. With two slots,
    step N's download may still be pending while step N+1's is queued. On a CPU the copy is a plain memcpy and
    the event is None: the same code path."""

    def __init__(self, device: torch.device, num_slots: int = 2) -> None:
        if num_slots < 1:
            raise ValueError(f"a download ring needs at least 1 slot, got {num_slots}")
        self.device = torch.device(device)
        self._pinned = self.device.type == "cuda"
        self.buffers: list[torch.Tensor | None] = [None] * num_slots
        self.generations = [0] * num_slots
        self.events = [torch.cuda.Event() for _ in range(num_slots)] if self._pinned else [None] * num_slots
        self._next = 0

    def start(self, parts: list[torch.Tensor]) -> PendingDownload:
        """Queue the download of `parts` (int64 / int32 / float32 device tensors); returns its handle."""
        slot = self._next
        self._next = (slot + 1) % len(self.buffers)
        shapes = [(p.dtype, p.shape) for p in parts]
        words = _words(parts) if parts else torch.empty(0, dtype=torch.int32, device=self.device)
        n = words.numel()
        buffer = self.buffers[slot]
        if buffer is None or buffer.numel() < n:  # grown, never shrunk: a steady decode reuses its two buffers
            buffer = self.buffers[slot] = torch.empty(max(n, 1024), dtype=torch.int32, pin_memory=self._pinned)
        self.generations[slot] += 1
        host = buffer[:n]
        host.copy_(words, non_blocking=self._pinned)
        event = self.events[slot]  # reused: the generation check refuses a handle whose slot was taken again
        if event is not None:
            event.record()
        return PendingDownload(self, slot, self.generations[slot], host, shapes, event)


# >>> exercise ch06.resolve_deferred_ids
def resolve_deferred_ids(input_ids: torch.Tensor, previous_tokens: torch.Tensor | None) -> None:
    """Async scheduling's device-side gather: put the previous step's sampled tokens into this step's input ids.

    Under async scheduling (minillm/engine/async_step.py) the host builds step N+1 while the GPU still runs step
    N, so it does not know the tokens step N is sampling. Where a sequence's next input is such a token, the host
    writes a placeholder: the id -(r + 1) stands for row r of step N's sampled tokens (`previous_tokens`, int64
    [S], still on the device). Replace every negative id by previous_tokens[-id - 1] and keep the others, IN
    PLACE (input_ids is a view of the step's upload, or of a CUDA graph's static input, that the forward reads).
    Stay on the device: no .item(), .tolist() or Python loop over elements, each of which would make the host
    wait for step N and undo the overlap. For the same reason nothing checks that -id - 1 < S: rows out of range
    are the caller's bug (clamp them to a valid row; their value is then wrong, not a crash).

    Example: input_ids [5, -1, 7, -3, 0], previous_tokens [40, 41, 42] -> input_ids [5, 40, 7, 42, 0].
    Raise ValueError if previous_tokens is None or empty (the previous step sampled nothing).
    """
    # >>> solution
    if previous_tokens is None or previous_tokens.numel() == 0:
        raise ValueError("the step defers input ids to the previous step's samples, but that step sampled nothing")
    deferred = input_ids < 0
    rows = (-1 - input_ids).clamp_(0, previous_tokens.numel() - 1)  # other rows read row 0, then are kept
    input_ids.copy_(torch.where(deferred, previous_tokens[rows], input_ids))
    # <<< solution
# <<< exercise
