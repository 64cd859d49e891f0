"""Count, on a CPU, the host<->device transfers and device syncs one engine step would make on a GPU (chapter 4).

A decode step of a small model on a GPU is bound by the *host*: each synchronous copy or sync stops the Python
thread until the GPU has caught up, and every one costs tens of microseconds. The profiler shows them on a GPU;
this module finds the same places on a CPU-only machine, so a test can hold the step path to its budget:

* host-to-device copies ("h2d"): `torch.tensor(data, device=dev)`, `t.to(dev)` / `t.cuda()` of a host tensor,
  `dev_tensor.copy_(host_tensor)`, indexing a device tensor with a host index tensor or a Python list, and any
  other op that mixes a device tensor with a host tensor of more than one element (an implicit copy, or an error);
* device-to-host transfers ("d2h", each one a sync: the host waits for the GPU): `.tolist()`, `.item()`,
  `.cpu()`, `.numpy()`, `bool()` / `int()` / `float()` of a device tensor, `t.to("cpu")`, `host.copy_(dev)`;
* other syncs ("sync"): ops whose output size depends on device data (`nonzero`, `masked_select`, `unique`).

How it tells host from device on a machine that has only a CPU: the engine runs on the *virtual device*
`torch.device("cpu", 0)` (VIRTUAL_DEVICE), which stands for the accelerator; a plain "cpu" is the host. Tensors
cannot keep that index (they all report "cpu"), so a TorchFunctionMode follows them instead: a tensor is on the
device when it was created with device=VIRTUAL_DEVICE, moved there with .to(...), is a module parameter or buffer,
or came out of an op that read a device tensor. Everything else is on the host. A device tensor's `.device` reads
VIRTUAL_DEVICE inside the counter, so `.to(x.device)` and `device=x.device` follow x.

Each event is charged to the first minillm source line on the call stack. Lines inside the model's layers and
kernels ("forward") are counted apart from the step path: on a CPU the layers take their torch reference paths
and range checks (`int(input_ids.min())` runs only for CPU tensors), which a GPU forward does not.

    with StepTransfers(engine.runner.model) as counter:
        engine.step()
    counter.counts()        # {"h2d": 1, "d2h": 1, "sync": 0}: the step path's events
    counter.report()        # one line per event: kind, where, what
"""
from __future__ import annotations

import os
import sys
import weakref
from collections import Counter
from dataclasses import dataclass

import torch
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_flatten

# the accelerator, as far as the counter is concerned (see the module docstring)
VIRTUAL_DEVICE = torch.device("cpu", 0)

_DEVICE_PROPERTY = torch.Tensor.device
_D2H_METHODS = {"tolist", "item", "cpu", "numpy", "__bool__", "__int__", "__float__", "__index__"}
_SYNC_OPS = {"nonzero", "masked_select", "unique", "unique_consecutive", "argwhere"}
_FROM_DATA = {"tensor", "as_tensor", "asarray"}  # build a tensor from Python data: a copy when given a device
_PACKAGE = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # .../minillm
_FORWARD_DIRS = tuple(os.path.join(_PACKAGE, d) + os.sep for d in ("layers", "models", "kernels", "quant"))
_STEP_FILES_IN_LAYERS = (os.path.join(_PACKAGE, "layers", "sampler.py"),)  # the sampler is part of the step


@dataclass(frozen=True)
class TransferEvent:
    kind: str  # "h2d", "d2h" or "sync"
    op: str  # the torch function or method
    where: str  # "minillm/engine/model_runner.py:231 prepare"
    in_forward: bool  # inside the model's layers (not the step path)


def _device_arg(args: tuple, kwargs: dict) -> torch.device | None:
    """The target device of a creation op or .to(...), if one was given."""
    candidates = [kwargs.get("device")] + [a for a in args if isinstance(a, (str, torch.device))]
    for c in candidates:
        if c is None:
            continue
        try:
            return torch.device(c)
        except (RuntimeError, TypeError):
            continue
    return None


def this_of(args: tuple) -> object:
    return args[0] if args else None


def _is_device(d: torch.device | None) -> bool:
    return d is not None and (d.type != "cpu" or d.index is not None)


class _TensorSet:
    """A set of tensors by identity that does not keep them alive (a WeakSet would compare tensors with ==)."""

    def __init__(self) -> None:
        self._refs: dict[int, weakref.ref] = {}

    def add(self, t: torch.Tensor) -> None:
        self._refs[id(t)] = weakref.ref(t)

    def __contains__(self, t: object) -> bool:
        ref = self._refs.get(id(t))
        return ref is not None and ref() is t


class StepTransfers(TorchFunctionMode):
    """A TorchFunctionMode that tags device tensors and records every transfer and sync (module docstring).
    `modules`: models whose parameters and buffers live on the device; `tensors`: other device tensors that exist
    before the counter starts (KV caches, persistent buffers)."""

    def __init__(self, *modules: torch.nn.Module, tensors: tuple = ()) -> None:
        super().__init__()
        self._device = _TensorSet()
        self.events: list[TransferEvent] = []
        for module in modules:
            for t in list(module.parameters()) + list(module.buffers()):
                self._device.add(t)
            for sub in module.modules():  # tensors kept as plain attributes (KV cache views, scales)
                for value in vars(sub).values():
                    if isinstance(value, torch.Tensor):
                        self._device.add(value)
        for t in tensors:
            if isinstance(t, torch.Tensor):
                self._device.add(t)

    def mark_device(self, *tensors: torch.Tensor) -> None:
        for t in tensors:
            self._device.add(t)

    def on_device(self, t: object) -> bool:
        return isinstance(t, torch.Tensor) and t in self._device

    def reset(self) -> None:
        self.events.clear()

    def counts(self, in_forward: bool = False) -> dict[str, int]:
        """Events of the step path (or, with in_forward=True, of the model's layers) by kind."""
        tally = Counter(e.kind for e in self.events if e.in_forward == in_forward)
        return {kind: tally.get(kind, 0) for kind in ("h2d", "d2h", "sync")}

    def report(self, in_forward: bool = False) -> str:
        return "\n".join(f"{e.kind:4s} {e.op:14s} {e.where}" for e in self.events if e.in_forward == in_forward)

    # -- the mode ---------------------------------------------------------------------------------------------
    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = getattr(func, "__name__", str(func))
        flat, _ = tree_flatten((args, kwargs))
        tensors = [t for t in flat if isinstance(t, torch.Tensor)]
        dev_in = [t for t in tensors if t in self._device]
        kind, to_device = self._classify(name, args, kwargs, tensors, dev_in)
        if kind is not None:
            self._record(kind, name)
        out = func(*args, **kwargs)
        if kind is not None and name in ("to", "cuda", "cpu") and out is this_of(args):
            out = out.clone()  # a CPU "transfer" returns its input: the copy a GPU makes is a new tensor
        if name == "__get__" and getattr(func, "__self__", None) is _DEVICE_PROPERTY and dev_in:
            return VIRTUAL_DEVICE  # `.to(x.device)` / `device=x.device` then follow x to the device
        if to_device or (dev_in and kind != "d2h"):
            for t in tree_flatten(out)[0]:
                if isinstance(t, torch.Tensor):
                    self._device.add(t)
        return out

    def _classify(self, name: str, args: tuple, kwargs: dict, tensors: list, dev_in: list) -> tuple[str | None, bool]:
        """(event kind or None, whether the output lives on the device)."""
        this = args[0] if args else None
        if name in _FROM_DATA:
            target = _device_arg(args[1:], kwargs)
            return ("h2d" if _is_device(target) else None), _is_device(target)
        if name in ("to", "cuda", "cpu"):
            target = VIRTUAL_DEVICE if name == "cuda" else torch.device("cpu") if name == "cpu" \
                else _device_arg(args[1:], kwargs)
            if target is None or not isinstance(this, torch.Tensor):
                return None, False
            source_on_device = this in self._device
            if _is_device(target):
                return (None if source_on_device else "h2d"), True
            return ("d2h" if source_on_device else None), False
        if name in _D2H_METHODS:
            return ("d2h" if this in self._device else None), False
        if name in _SYNC_OPS and dev_in:
            return "sync", True
        if name == "copy_" and len(args) >= 2:
            dst_dev, src_dev = args[0] in self._device, args[1] in self._device
            return ("h2d" if dst_dev and not src_dev else "d2h" if src_dev and not dst_dev else None), dst_dev
        if name in ("__getitem__", "__setitem__", "index_select", "gather", "index_put_", "index_copy_") \
                and this in self._device:
            rest, _ = tree_flatten(args[1:])
            host_index = any((isinstance(t, torch.Tensor) and t not in self._device and t.numel() > 1)
                             for t in rest) or any(isinstance(a, list) for a in args[1:2])
            return ("h2d" if host_index else None), True
        if dev_in and any(t not in self._device and t.dim() > 0 and t.numel() > 1 for t in tensors):
            return "h2d", True  # an op mixing device and host data: an implicit copy (or an error on a GPU)
        if not dev_in and name not in ("__get__",):
            return None, _is_device(_device_arg((), kwargs))  # torch.empty(..., device=dev) and friends
        return None, bool(dev_in)

    def _record(self, kind: str, op: str) -> None:
        frame = sys._getframe(2)
        here = os.path.abspath(__file__)
        while frame is not None:
            path = os.path.abspath(frame.f_code.co_filename)
            if path.startswith(_PACKAGE + os.sep) and path != here:
                break
            frame = frame.f_back
        if frame is None:
            self.events.append(TransferEvent(kind, op, "<outside minillm>", False))
            return
        path = os.path.abspath(frame.f_code.co_filename)
        in_forward = path.startswith(_FORWARD_DIRS) and path not in _STEP_FILES_IN_LAYERS
        where = f"{os.path.relpath(path, os.path.dirname(_PACKAGE))}:{frame.f_lineno} {frame.f_code.co_name}"
        self.events.append(TransferEvent(kind, op, where, in_forward))


# -- scenarios: one engine step of each kind, counted --------------------------------------------------------------
# What a step may cost, the budget tests/test_step_transfers.py holds the engine to: one packed host-to-device copy
# of the step's integer metadata and one device-to-host transfer of what the host needs back (the sampled tokens;
# logprobs and logits ride in the same transfer when asked), nothing else.
STEP_BUDGET = {"h2d": 1, "d2h": 1, "sync": 0}
SCENARIOS = ("prefill", "decode", "decode_sampled", "decode_logprobs", "verify", "decode_graph", "verify_graph")


def tiny_llama(seed: int = 0):
    """(model, config): a 2-layer random Llama small enough that a step's time is all host work."""
    from minillm.config import ModelConfig
    from minillm.engine.worker import RandomWeights
    config = ModelConfig(vocab_size=300, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024)
    return RandomWeights(seed)(config, torch.device("cpu"), torch.float32), config


def build_engine(model, config, device: torch.device, *, max_num_seqs: int = 4, num_speculative_tokens: int = 0,
                 enforce_eager: bool | None = None, max_model_len: int = 128):
    """A continuous-batching engine over paged blocks (with n-gram speculation when num_speculative_tokens > 0)."""
    from minillm.config import EngineConfig
    from minillm.engine.llm_engine import LLMEngine
    from minillm.loader.no_tokenizer import NoTokenizer
    spec = None if num_speculative_tokens == 0 else \
        {"method": "ngram", "num_speculative_tokens": num_speculative_tokens}
    block_size = 16
    engine_config = EngineConfig(max_model_len=max_model_len, max_num_seqs=max_num_seqs, block_size=block_size,
                                 num_kv_blocks=(max_num_seqs + 1) * (max_model_len // block_size),
                                 max_num_batched_tokens=max(max_model_len, 64 * max_num_seqs),
                                 speculative_config=spec, enforce_eager=enforce_eager)
    dtype = next(model.parameters()).dtype
    return LLMEngine(model, NoTokenizer(), config, engine_config, device=device, dtype=dtype)


def force_drafts(engine) -> None:
    """Every verify step carries the full k drafts: the n-gram proposer's, topped up with the last token (a random
    model's output rarely repeats, and a step without drafts is not the verify step being measured)."""
    decoder = engine.speculative
    propose = decoder.proposer.propose_with_probs

    def topped_up(seqs, wanted):
        drafts, probs = propose(seqs, wanted)
        return [d + [s.last_token_id] * (k - len(d)) for s, d, k in zip(seqs, drafts, wanted)], probs
    decoder.proposer.propose_with_probs = topped_up


def host_graphs(*args, **kwargs):
    """A DecodeCUDAGraphs that runs on a CPU: no device check, no synchronisation, and 'recording' keeps the
    forward, which 'replay' reruns into the same output tensor (arguments: DecodeCUDAGraphs'). What it exercises is
    the bookkeeping a real graph depends on: every input read from the static buffers, padding rows, buckets."""
    from minillm.engine.cuda_graph import DecodeCUDAGraphs

    class HostGraphs(DecodeCUDAGraphs):
        def _check_device(self, device):
            pass

        def _synchronize(self):
            pass

        def _record(self, forward):
            out = forward()  # a tensor, or a tuple of them (a sampling graph: hidden, greedy tokens)

            class Replay:
                def replay(self):
                    fresh = forward()
                    for static, new in zip(out, fresh) if isinstance(out, tuple) else ((out, fresh),):
                        static.copy_(new)
            return Replay(), out
    return HostGraphs(*args, **kwargs)


def attach_host_graphs(engine) -> None:
    """Capture host_graphs for the engine's runner, so that its decode steps take the CUDA-graph path on a CPU."""
    from minillm.speculative.config import verify_query_lens
    runner, config = engine.runner, engine.engine_config
    graphs = host_graphs(runner.model, config.max_num_seqs, -(-engine.max_model_len // runner.block_size),
                         runner.block_size, engine.model_config.hidden_size, runner.dtype, runner.device,
                         query_lens=verify_query_lens(config), sample=True)
    with torch.inference_mode():
        graphs.capture()
    runner.cuda_graphs = graphs
    if engine.speculative is not None:
        engine.speculative.pad_drafts = True  # what the engine does when graphs of (1, 1 + k) exist


def count_scenario(scenario: str, batch: int = 2, k: int = 3) -> StepTransfers:
    """Build a tiny engine on VIRTUAL_DEVICE under a counter, bring it to the step `scenario` names, count that
    one step. Returns the counter (its events are that step's)."""
    from minillm.sampling_params import SamplingParams
    if scenario not in SCENARIOS:
        raise ValueError(f"unknown scenario {scenario!r}; allowed: {', '.join(SCENARIOS)}")
    model, config = tiny_llama()
    speculative = scenario.startswith("verify")
    params = SamplingParams(temperature=0, max_tokens=40, ignore_eos=True)
    if scenario == "decode_sampled":
        params = SamplingParams(temperature=0.8, top_k=20, top_p=0.9, max_tokens=40, ignore_eos=True)
    elif scenario == "decode_logprobs":
        params = SamplingParams(temperature=0, logprobs=3, max_tokens=40, ignore_eos=True)
    with StepTransfers(model) as counter:
        engine = build_engine(model, config, VIRTUAL_DEVICE, max_num_seqs=max(batch, 2),
                              num_speculative_tokens=k if speculative else 0)
        if scenario.endswith("graph"):
            attach_host_graphs(engine)
        if speculative:
            force_drafts(engine)
        for i in range(batch):
            engine.add_request(str(i), [(7 * i + j) % 256 for j in range(9 + 3 * i)], params)
        if scenario != "prefill":
            engine.step()  # the prefill
            engine.step()  # a first decode (or verify): per-request state is set up
        verify_steps = engine.speculative.metrics.num_verify_steps if speculative else 0
        counter.reset()
        engine.step()
        if speculative and engine.speculative.metrics.num_verify_steps < verify_steps + batch:
            raise RuntimeError(f"the counted step of scenario {scenario!r} did not verify drafts for every sequence")
    return counter
