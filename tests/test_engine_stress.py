"""Randomized differential stress test of LLMEngine: every feature at once against one request run alone.

For each seed a scenario is drawn: an engine configuration (prefix caching, chunked prefill with a small token
budget, preemption by recompute or swap, async scheduling, FCFS or priority policy, speculative decoding by n-gram,
n-gram tree, lookahead, self-speculation, untrained Medusa / Medusa-tree / EAGLE / EAGLE-tree / MTP heads or a
one-layer draft model, block size 4/8/16, a KV pool small enough to preempt, an fp8 KV cache) and a stream of
events (requests arriving at random steps, with random prompt lengths, some sharing long prefixes so the prefix
cache hits, random max_tokens, some with stop_token_ids or stop strings
that really fire, min_tokens, ignore_eos, seeded sampling, log-probs of sampled and prompt tokens, a poisoned
request whose text or forward raises; aborts of waiting, running or swapped requests).
The engine is driven step by step (add_request / step / abort) and checked after every step:

    the scheduler's and block manager's bookkeeping holds (queues, ref counts, free + evictable + used = all);
    an aborted request holds no device or CPU block the moment abort returns;
    no request is reported finished twice, none after its abort, none that was never added;
    at the end every block is free (ref counts zero, CPU swap space empty), and each request that was not aborted
    finished with a finish_reason and the token ids and text of the same request run alone in a fresh engine
    with none of the features (fp32 on the CPU: the same tokens, not merely close logits; the same KV cache dtype
    and poison), with the same log-probs within LP_TOL (the raw target model's, speculative or not);
    a poisoned request ends in "error" as it does alone, and so may only the requests of a failed step that
    could not be rerun one at a time (step_isolation.can_isolate). One exception: where
    two greedy candidates tie (logits within TIE; a batch of another shape rounds them the other way round), the
    run may part from the reference if every token from there is still a greedy choice (Reference.parts_at_a_tie).
    With an fp8 KV cache "tie" means FP8_TOL and log-probs agree within FP8_LP_TOL: a prefill attends to exact
    K/V, a chunk or a cache hit to fp8-rounded K/V, so the batch legitimately moves the numbers.

CI runs SEEDS seeds (about a quarter of a second each on a CPU). A longer hunt: MINILLM_STRESS_SEEDS=2000 (and
MINILLM_STRESS_FIRST=10000 to start elsewhere). A failing seed prints its scenario, which a regression test below
can replay by hand.
"""
from __future__ import annotations

import contextlib
import os
import random
from dataclasses import dataclass, field

import pytest
import torch

from minillm.config import EngineConfig
from minillm.engine.llm_engine import LLMEngine
from minillm.sampling_params import SamplingParams
from test_engine import tiny_config, tiny_model
from tiny import ByteTokenizer, one_thread  # noqa: F401  (one_thread: autouse fixture)

SEEDS = 30
FIRST = int(os.environ.get("MINILLM_STRESS_FIRST", 0))
NUM_SEEDS = int(os.environ.get("MINILLM_STRESS_SEEDS", SEEDS))
MAX_LEN = 64  # max_model_len of every engine (the reference's too: "length" at the same place)
K = 3  # speculative tokens per step
TIE = 1e-4  # logits this close are a tie: which one greedy takes depends on the batch's shape (rounding)
LP_TOL = 1e-4  # log-probs of the same token in two batches of other shapes (fp32 rounding)
LP_WIDTH = 5  # the widest top-k a request asks for; the reference scores that many
# fp8 KV: a prefill attends to its fresh, exact K/V, while chunked prefill, a prefix-cache hit, recompute and a
# verify step read the fp8-rounded K/V of earlier tokens from the cache: their logits differ by up to about 0.1
# nats from the run alone (tests/test_fp8_kv_cache.py's LOGPROB_TOL), so greedy may part far from a tie. The log-prob
# of an unlikely token moves more: 0.26 nats seen for a prompt token of rank 124 under chunks of 2 tokens, and
# chunks of 7 alone made greedy take a token 0.28 below the exact argmax (seed 2331: fp8 rounding, not a bug).
FP8_TOL = 0.5
FP8_LP_TOL = 0.5
POISON_TEXT = 298  # a token the tokenizer cannot decode: the request whose prompt ends in it fails alone
POISON_FORWARD = 297  # a token that makes the model's forward raise (the step reruns one request at a time)


@dataclass
class Request:
    prompt: tuple[int, ...]
    max_tokens: int
    stop_token_ids: tuple[int, ...] = ()
    stop: tuple[str, ...] = ()
    min_tokens: int = 0
    ignore_eos: bool = False
    seed: int | None = None  # a seeded sampled request (temperature 0.8): its own stream, whatever the batch
    priority: int = 0
    logprobs: int | None = None  # top-k log-probs of each sampled token (and of each prompt token)
    prompt_logprobs: int | None = None

    def params(self, logprobs: int | None = None, prompt_logprobs: int | None = None) -> SamplingParams:
        """Its SamplingParams; the reference passes its own (wider) log-prob widths."""
        return SamplingParams(temperature=0.0 if self.seed is None else 0.8, seed=self.seed,
                              max_tokens=self.max_tokens, stop_token_ids=list(self.stop_token_ids),
                              stop=list(self.stop), min_tokens=self.min_tokens, ignore_eos=self.ignore_eos,
                              priority=self.priority, logprobs=self.logprobs if logprobs is None else logprobs,
                              prompt_logprobs=self.prompt_logprobs if prompt_logprobs is None else prompt_logprobs)

    def key(self) -> tuple:
        """What the output depends on (not the priority, nor the log-prob widths: the reference scores them all)."""
        return (self.prompt, self.max_tokens, self.stop_token_ids, self.stop, self.min_tokens, self.ignore_eos,
                self.seed)


@dataclass
class Scenario:
    """An engine configuration and events: (step, "add", request id, Request) or (step, "abort", request id, None),
    applied before the engine's step number `step` (0-based)."""

    options: dict
    spec: str | None  # None or a speculative method: SPEC_METHODS
    events: list[tuple[int, str, str, Request | None]] = field(default_factory=list)
    # None; "text": the tokenizer fails on POISON_TEXT; "forward": that and the model fails on POISON_FORWARD
    # (only without speculation, whose proposers reach into the model); the reference's too
    poison: str | None = None


@pytest.fixture(scope="module")
def model_and_config():
    config = tiny_config(max_position_embeddings=128)
    return tiny_model(config, seed=5), config


@pytest.fixture(scope="module")
def head_dirs(model_and_config, tmp_path_factory):
    """Untrained Medusa and EAGLE heads (random, each head different) saved as train-heads saves them: they draft
    poorly, which is what a differential test wants (rejections and rollbacks), never wrongly."""
    from minillm.speculative.heads import HeadConfig, save_heads
    from minillm.speculative.train_heads import initial_heads
    model, config = model_and_config
    dirs = {}
    for kind, num_heads in (("medusa", K), ("eagle", 1), ("mtp", K)):
        head_config = HeadConfig.for_target(kind, config, num_heads)
        heads = initial_heads(head_config, model)
        with torch.no_grad():
            for p in heads.parameters():
                p.add_(0.05 * torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())))
        dirs[kind] = str(save_heads(tmp_path_factory.mktemp("heads") / kind, heads, head_config))
    return dirs


class FussyTokenizer(ByteTokenizer):
    """Cannot decode POISON_TEXT: making the text of a request that holds it raises (a per-request failure)."""

    def decode(self, token_ids, *args, **kwargs):
        if POISON_TEXT in list(token_ids):
            raise ValueError(f"cannot decode token {POISON_TEXT} (test)")
        return super().decode(token_ids, *args, **kwargs)

    def decode_batch(self, batch, *args, **kwargs):
        return [self.decode(ids, *args, **kwargs) for ids in batch]


class PoisonedModel(torch.nn.Module):
    """The model, except that a forward whose input holds POISON_FORWARD raises."""

    def __init__(self, inner) -> None:
        super().__init__()
        self.inner = inner

    def forward(self, input_ids, positions):
        if bool((input_ids == POISON_FORWARD).any()):
            raise RuntimeError(f"poisoned token {POISON_FORWARD}")
        return self.inner(input_ids, positions)

    def compute_logits(self, hidden):
        return self.inner.compute_logits(hidden)


class Reference:
    """Outputs of requests each run alone in a plain engine (no prefix cache, chunking, preemption, async or
    speculation; the scenario's KV cache dtype and poison), computed once per distinct request, with the
    log-probs of every sampled and prompt token (top LP_WIDTH)."""

    def __init__(self, model_and_config) -> None:
        self.model, self.config = model_and_config
        self.cache: dict[tuple, tuple[list[int], str, str]] = {}
        self.outputs: dict[tuple, object] = {}  # the same key -> the finished RequestOutput

    def __call__(self, req: Request) -> tuple[list[int], str]:
        return self.run(req)[:2]

    def run(self, req: Request, kv_cache_dtype: str = "auto", poison: str | None = None
            ) -> tuple[list[int], str, str]:
        """(token ids, finish reason, text)."""
        key = (req.key(), kv_cache_dtype, poison)
        if key not in self.cache:
            engine = LLMEngine(PoisonedModel(self.model) if poison == "forward" else self.model,
                               FussyTokenizer() if poison else ByteTokenizer(), self.config,
                               EngineConfig(max_model_len=MAX_LEN, max_num_seqs=1, block_size=16, num_kv_blocks=8,
                                            async_scheduling=False, kv_cache_dtype=kv_cache_dtype))
            engine.add_request("ref", list(req.prompt), req.params(LP_WIDTH, LP_WIDTH))
            done = None
            while engine.has_unfinished_requests():
                for out in engine.step():
                    if out.finished:
                        c = out.outputs[0]
                        done = (list(c.token_ids), c.finish_reason, c.text)
                        self.outputs[key] = out
            assert engine.scheduler.block_manager.num_used_blocks == 0
            self.cache[key] = done
        return self.cache[key]

    def parts_at_a_tie(self, req: Request, got: list[int], expected: list[int], tie: float = TIE) -> bool:
        """Whether `got` is a greedy run that left `expected` where two tokens tie: at the first difference both
        tokens' logits are within TIE of the best one (a batch of another shape rounds them the other way round),
        and every token of `got` from there is such a greedy choice too (min_tokens' ban respected). fp32 on
        the CPU; a cache-less forward of the whole sequence is the judge. An fp8 KV cache passes tie=FP8_TOL."""
        if req.seed is not None:
            return False
        i = next((j for j, (a, b) in enumerate(zip(got, expected)) if a != b), None)
        if i is None:  # one is a prefix of the other: a stop or a length that is not a tie
            return False
        from minillm.speculative.train_data import record_features
        tokens = list(req.prompt) + got
        with torch.no_grad():
            hidden = record_features(self.model, torch.tensor([tokens]), torch.device("cpu"))[0]
            logits = self.model.compute_logits(self.model.model.norm(hidden)).float()
        start = len(req.prompt) - 1
        banned = list(req.stop_token_ids) + ([] if req.ignore_eos else [self.config.eos_token_id])
        for j in range(i, len(got)):
            row = logits[start + j].clone()
            if j < req.min_tokens:
                row[banned] = -float("inf")
            if float(row.max() - row[got[j]]) > tie or (j == i and float(row.max() - row[expected[j]]) > tie):
                return False
        return True


@pytest.fixture(scope="module")
def reference(model_and_config):
    return Reference(model_and_config)


def draw_scenario(seed: int, reference: Reference) -> Scenario:
    rng = random.Random(seed)
    block_size = rng.choice([4, 8, 16])
    chunked = rng.random() < 0.5
    per_seq = -(-MAX_LEN // block_size)  # blocks one sequence of max_model_len needs
    options = dict(
        max_model_len=MAX_LEN, block_size=block_size, max_num_seqs=rng.randint(1, 6),
        num_kv_blocks=rng.randint(per_seq, 2 * per_seq),  # small: running several long requests preempts
        enable_prefix_caching=rng.random() < 0.5, enable_chunked_prefill=chunked,
        max_num_batched_tokens=rng.choice([2, 4, 7, 16, 33]) if chunked else rng.choice([MAX_LEN, 2 * MAX_LEN]),
        preemption_mode=rng.choice(["recompute", "swap"]), async_scheduling=rng.random() < 0.5)
    if rng.random() < 0.2:  # lower priority value runs first; victims are taken from the other end
        options["extra"] = {"policy": "priority"}
    fp8 = rng.random() < 0.15
    if fp8:
        options["kv_cache_dtype"] = "fp8"
    if options["preemption_mode"] == "swap":  # from a few blocks (then swap falls back to recompute) to plenty
        # layers x (K, V) x kv heads x head dim x bytes (fp32 or fp8) x slots
        bytes_per_block = 2 * 2 * 2 * 8 * (1 if fp8 else 4) * block_size
        options["swap_space"] = bytes_per_block * rng.choice([per_seq // 2 + 1, per_seq, 4 * per_seq])
    spec = rng.choice([None, None, None, None, "ngram", "ngram", "medusa", "eagle", "draft_model", "ngram_tree",
                       "eagle_tree", "lookahead", "self_speculative", "mtp", "medusa_tree"])
    if spec is not None and rng.random() < 0.3:  # speculation switched off and on as the batch grows and shrinks
        options["spec_extra"] = {"disable_by_batch_size": rng.randint(1, 3)}
    # (not with fp8, whose tokens may part from the run alone's: then the tokenizer decodes other windows)
    poison = None if fp8 else rng.choice([None] * 5 + ["text", "forward" if spec is None else "text"] * 2)
    scenario = Scenario(options, spec, poison=poison)
    kv_dtype = options.get("kv_cache_dtype", "auto")

    prefixes = [[rng.randrange(256) for _ in range(rng.randint(8, 40))] for _ in range(2)]
    num_requests = rng.randint(8, 16)
    step = 0
    for i in range(num_requests):
        step += rng.choice([0, 0, 0, 1, 1, 3])
        kind = rng.random()
        if kind < 0.4:  # a shared prefix, sometimes the whole prompt (a full cache hit)
            prefix = rng.choice(prefixes)
            suffix = [rng.randrange(256) for _ in range(rng.choice([0, 1, 3, 9]))]
            prompt = prefix + suffix
        elif kind < 0.45:  # a long prompt: few tokens left to max_model_len
            prompt = [rng.randrange(256) for _ in range(rng.randint(MAX_LEN - 20, MAX_LEN - 1))]
        elif kind < 0.55:  # a repetitive prompt: prompt lookup drafts from it
            unit = [rng.randrange(256) for _ in range(rng.randint(1, 4))]
            prompt = (unit * 20)[:rng.randint(4, 30)]
        else:
            prompt = [rng.randrange(256) for _ in range(rng.randint(1, 30))]
        prompt = prompt[:MAX_LEN - 1]
        req = Request(tuple(prompt), rng.choice([1, 2, 5, 12, 30, MAX_LEN]), ignore_eos=rng.random() < 0.2,
                      priority=rng.randint(0, 2) if "extra" in options else 0)
        if spec is None and not fp8 and rng.random() < 0.15:  # seeded sampling: verify steps draw differently,
            req.seed = rng.randrange(1000)  # so not there; nor where fp8's rounding moves the probabilities
        if rng.random() < 0.3:
            req.logprobs = rng.randint(0, LP_WIDTH)
        if rng.random() < 0.15:  # (such a request never reads the prefix cache)
            req.prompt_logprobs = rng.randint(0, LP_WIDTH)
        if scenario.poison and rng.random() < 0.2:  # a request that fails: its text, or the forward of its prompt
            poisons = [POISON_TEXT, POISON_FORWARD] if scenario.poison == "forward" else [POISON_TEXT]
            req.prompt = req.prompt[:MAX_LEN - 2] + (rng.choice(poisons),)
        r = rng.random()
        if r < 0.3:  # a stop token the plain run really produces (or, rarely, one it never does)
            tokens, _, _ = reference.run(req, kv_dtype, scenario.poison)
            req.stop_token_ids = (rng.choice(tokens) if tokens and rng.random() < 0.9 else 299,)
            if rng.random() < 0.3:
                req.min_tokens = rng.randint(1, req.max_tokens)
        elif r < 0.4:  # a stop string cut out of the plain run's text
            _, _, text = reference.run(req, kv_dtype, scenario.poison)
            if len(text) >= 3:
                start = rng.randrange(len(text) - 2)
                req.stop = (text[start:start + rng.randint(1, 2)],)
        scenario.events.append((step, "add", str(i), req))
        if rng.random() < 0.25:  # abort it later: while waiting, running, swapped, or after it finished
            scenario.events.append((step + rng.randint(0, 12), "abort", str(i), None))
    scenario.events.sort(key=lambda e: e[0])
    return scenario


SPEC_METHODS = {  # method -> its options beyond num_speculative_tokens (a callable of the head directories)
    "ngram": lambda dirs: {"prompt_lookup_max": 3, "prompt_lookup_min": 1},
    "ngram_tree": lambda dirs: {"prompt_lookup_max": 3, "prompt_lookup_min": 1},
    "medusa": lambda dirs: {"model": dirs["medusa"]},
    "eagle": lambda dirs: {"model": dirs["eagle"]},
    "eagle_tree": lambda dirs: {"model": dirs["eagle"], "num_tree_nodes": 7},
    "draft_model": lambda dirs: {"draft_num_layers": 1},  # the target's first layer: its own paged KV pool
    "lookahead": lambda dirs: {},  # Jacobi window + n-gram pool: no weights
    "self_speculative": lambda dirs: {"draft_num_layers": 1},  # the target's first layer, its KV shared
    "mtp": lambda dirs: {"model": dirs["mtp"]},
    "medusa_tree": lambda dirs: {"model": dirs["medusa"], "num_tree_nodes": 7},
}


def build_engine(model_and_config, head_dirs, scenario: Scenario) -> LLMEngine:
    model, config = model_and_config
    options = dict(scenario.options)
    spec = options.pop("spec_extra", {})  # disable_by_batch_size
    if scenario.spec is not None:
        spec = {"method": scenario.spec, "num_speculative_tokens": K, **SPEC_METHODS[scenario.spec](head_dirs), **spec}
    if scenario.poison == "forward":
        model = PoisonedModel(model)
    return LLMEngine(model, FussyTokenizer() if scenario.poison else ByteTokenizer(), config,
                     EngineConfig(speculative_config=spec if scenario.spec else None, **options))


def check_free(engine: LLMEngine, seq) -> None:
    bm = engine.scheduler.block_manager
    assert not seq.block_table and seq.seq_id not in bm._on_device and seq.seq_id not in bm._cpu_tables, \
        f"request {seq.request_id} still holds blocks after it ended"


def run_scenario(engine: LLMEngine, scenario: Scenario, reference: Reference, max_steps: int = 3000) -> None:
    """Drive the engine through the scenario's events, checking the invariants after every step."""
    collateral: set[str] = set()  # requests of a failed step that could not be rerun one at a time (may "error")
    with record_collateral(collateral):
        _run_scenario(engine, scenario, reference, max_steps, collateral)


@contextlib.contextmanager
def record_collateral(collateral: set[str]):
    """Where a failed step may not be rerun one request at a time (step_isolation.can_isolate: block operations
    in it, speculation), every request in it ends in "error": note their ids."""
    from minillm.engine import async_step, llm_engine
    from minillm.engine.step_isolation import can_isolate

    def recording(batch, *args, **kwargs):
        ok = can_isolate(batch, *args, **kwargs)
        if not ok:
            collateral.update(seq.request_id for seq in batch.seqs)
        return ok

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(llm_engine, "can_isolate", recording)
        mp.setattr(async_step, "can_isolate", recording)
        yield


def _run_scenario(engine: LLMEngine, scenario: Scenario, reference: Reference, max_steps: int,
                  collateral: set[str]) -> None:
    scheduler, bm = engine.scheduler, engine.scheduler.block_manager
    events = list(scenario.events)
    requests: dict[str, Request] = {}
    seqs = {}
    finished: dict[str, tuple[list[int], str, str]] = {}
    outputs_of = {}  # request id -> its finished RequestOutput
    aborted: set[str] = set()
    step = 0
    while events or engine.has_unfinished_requests():
        while events and events[0][0] <= step:
            _, kind, rid, req = events.pop(0)
            if kind == "add":
                engine.add_request(rid, list(req.prompt), req.params())
                requests[rid] = req
                seqs[rid] = engine._requests[rid].seq
            else:
                out = engine.abort(rid)
                if out is None:  # finished already (or never added): nothing to abort
                    assert rid in finished or rid not in requests
                    continue
                assert rid not in finished, f"request {rid} aborted after it finished"
                assert out.finished and out.outputs[0].finish_reason == "abort"
                aborted.add(rid)
                check_free(engine, seqs[rid])
                scheduler.check_invariants()
        outputs = engine.step()
        step += 1
        assert step < max_steps, "the engine makes no progress"
        for out in outputs:
            rid = out.request_id
            assert rid in requests, f"output for unknown request {rid}"
            assert rid not in aborted, f"output for request {rid} after its abort"
            assert rid not in finished, f"request {rid} reported after it finished"
            if out.finished:
                c = out.outputs[0]
                assert c.finish_reason in ("stop", "length", "error"), (rid, c.finish_reason, c.error)
                finished[rid] = (list(c.token_ids), c.finish_reason, c.text)
                outputs_of[rid] = out
                check_free(engine, seqs[rid])
        scheduler.check_invariants()
    assert not engine._requests and not scheduler.has_unfinished()
    assert set(finished) | aborted == set(requests) and not set(finished) & aborted
    assert bm.num_used_blocks == 0 and all(r == 0 for r in bm.ref_counts), "device blocks leaked"
    assert bm.num_used_cpu_blocks == 0 and not bm._cpu_tables, "swap space leaked"
    assert not bm._on_device
    kv_dtype = scenario.options.get("kv_cache_dtype", "auto")
    tie, lp_tol = (FP8_TOL, FP8_LP_TOL) if kv_dtype != "auto" else (TIE, LP_TOL)
    for rid, got in finished.items():
        req = requests[rid]
        expected = reference.run(req, kv_dtype, scenario.poison)
        if "error" in (got[1], expected[1]):  # the poisoned request fails alone, and wherever it fails alone
            reason = outputs_of[rid].outputs[0].error
            assert got[1] == expected[1] or rid in collateral, \
                f"request {rid} {req}: {got[1]} ({reason}), alone {expected[1]}"
            continue
        if got != expected and not reference.parts_at_a_tie(req, got[0], expected[0], tie):
            assert got == expected, f"request {rid} {req}"
        check_logprobs(rid, req, outputs_of[rid], reference.outputs[(req.key(), kv_dtype, scenario.poison)], lp_tol)


def check_logprobs(rid: str, req: Request, out, ref, tol: float) -> None:
    """`out`'s sampled and prompt log-probs (top req.logprobs / req.prompt_logprobs) are the reference's within
    `tol`, over the tokens both runs share (past a greedy tie they score other sequences). Speculative or not,
    they are the raw target model's log-softmax."""
    got, want = out.outputs[0], ref.outputs[0]
    if req.logprobs is None:
        assert got.logprobs is None, f"request {rid}: log-probs nobody asked for"
    else:
        assert got.logprobs is not None and len(got.logprobs) == len(got.token_ids), \
            f"request {rid}: {None if got.logprobs is None else len(got.logprobs)} log-prob entries for " \
            f"{len(got.token_ids)} tokens"
        shared = next((i for i, (a, b) in enumerate(zip(got.token_ids, want.token_ids)) if a != b),
                      min(len(got.token_ids), len(want.token_ids)))
        for i in range(shared):
            check_entry(f"request {rid} token {i}", got.token_ids[i], got.logprobs[i], want.logprobs[i],
                        req.logprobs, tol)
    if req.prompt_logprobs is None:
        assert out.prompt_logprobs is None, f"request {rid}: prompt log-probs nobody asked for"
    else:
        assert out.prompt_logprobs is not None and len(out.prompt_logprobs) == len(req.prompt), \
            f"request {rid}: {None if out.prompt_logprobs is None else len(out.prompt_logprobs)} prompt log-prob " \
            f"entries for {len(req.prompt)} prompt tokens"
        assert out.prompt_logprobs[0] is None
        for i in range(1, len(req.prompt)):
            check_entry(f"request {rid} prompt token {i}", req.prompt[i], out.prompt_logprobs[i],
                        ref.prompt_logprobs[i], req.prompt_logprobs, tol)


def check_entry(where: str, token: int, got: dict, want: dict, k: int, tol: float) -> None:
    """One token's {token id: Logprob}: the token itself plus the k most likely (the reference's LP_WIDTH)."""
    assert token in got, f"{where}: the token {token} is not in its entry {got}"
    assert abs(got[token].logprob - want[token].logprob) <= tol, f"{where}: {got[token]} alone {want[token]}"
    top = sorted((v.logprob for t, v in got.items() if v.rank <= k), reverse=True)
    expected_top = sorted((v.logprob for v in want.values()), reverse=True)[:k]
    assert len(top) >= min(k, len(expected_top)) and all(abs(a - b) <= tol for a, b in zip(top, expected_top)), \
        f"{where}: top {k} {got} alone {want}"
    for t, v in got.items():
        assert t not in want or abs(v.logprob - want[t].logprob) <= tol, f"{where}: token {t}: {v} alone {want[t]}"


def describe(scenario: Scenario) -> str:
    lines = [f"options={scenario.options!r}, spec={scenario.spec!r}"]
    lines += [f"  {e!r}" for e in scenario.events]
    return "\n".join(lines)


@pytest.mark.parametrize("seed", range(FIRST, FIRST + NUM_SEEDS))
def test_random_workload_matches_requests_run_alone(model_and_config, head_dirs, reference, seed):
    scenario = draw_scenario(seed, reference)
    engine = build_engine(model_and_config, head_dirs, scenario)
    try:
        run_scenario(engine, scenario, reference)
    except AssertionError as err:
        raise AssertionError(f"seed {seed}: {err}\n{describe(scenario)}") from err
    except Exception as err:
        raise RuntimeError(f"seed {seed}: {type(err).__name__}: {err}\n{describe(scenario)}") from err


# -- regressions the stress test found, replayed by hand -------------------------------------------------------

def test_a_swap_out_in_a_step_that_schedules_nobody_still_copies_the_blocks(model_and_config, reference):
    """Async scheduling, swap preemption, a pool of 5 blocks of 16: request 0 (38 + 12 tokens) holds 4 blocks and
    has its last token in flight, so it is not scheduled (it ends by length when that token is read); request 1
    crosses into its second block, finds none free and swaps itself out. The step schedules no sequence, only
    that swap-out, and the engine skipped empty steps: the CPU blocks were never written, and request 1 came back
    with garbage K/V (its 13th token differed from the request run alone)."""
    prompt0 = [61, 16, 106, 206, 171, 161, 152, 2, 123, 45, 228, 119, 45, 171, 149, 8, 22, 128, 132, 3, 186, 105,
               194, 156, 51, 172, 5, 164, 167, 128, 180, 243, 68, 154, 145, 90, 48, 249]
    scenario = Scenario(dict(max_model_len=MAX_LEN, block_size=16, max_num_seqs=5, num_kv_blocks=5,
                             preemption_mode="swap", swap_space=16384, async_scheduling=True), None,
                        [(0, "add", "0", Request(tuple(prompt0), 12)),
                         (0, "add", "1", Request((84, 222, 85, 175, 44), 13))])
    engine = build_engine(model_and_config, None, scenario)
    run_scenario(engine, scenario, reference)
    assert sum(len(r.swapped_out) for r in engine.scheduler.timeline) == 1
