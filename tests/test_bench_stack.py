"""`minillm bench stack` (chapter 1): the course's optimizations stacked row by row on one workload, on the CPU."""
from __future__ import annotations


def test_stack_table_runs_every_cpu_row_on_one_workload(capsys):
    """`minillm bench stack` on the bundled model, tiny: the rows a CPU can run are measured on the same workload
    (the same greedy tokens row after row: nothing above changes the weights), the GPU-only ones say why not."""
    from minillm.bench import cli
    from minillm.bench.stack import LAYERS, run_stack

    rows = run_stack(num_prompts=3, batch=2, prefix_len=8, suffix_len=4, output_len=4, verbose=False)
    assert [r.name for r in rows] == [layer.name for layer in LAYERS]
    ran = [r for r in rows if not r.skipped]
    assert [r.name for r in ran] == ["no KV cache", "+ KV cache", "+ static batching",
                                     "+ paged KV, continuous batching", "+ prefix caching", "+ speculative decoding"]
    assert all("a CPU" in r.skipped or "CUDA" in r.skipped for r in rows if r.skipped)
    tokens = ran[0].tokens
    assert len(tokens) == 3 and all(1 <= len(t) <= 4 for t in tokens)
    for row in ran:
        assert row.tokens == tokens and row.output_tokens == sum(map(len, tokens))
        assert row.seconds > 0 and row.ttft is not None and 0 < row.ttft <= row.seconds
    assert [r.same_as_above for r in ran] == ["-"] + ["3/3"] * 5
    from matplotlib.figure import Figure

    from minillm.bench.plots import plot_stack
    ax = Figure().subplots()
    plot_stack(rows, ax)
    assert len(ax.patches) == len(ran) and sum("skipped" in t.get_text() for t in ax.texts) == 4
    assert cli.main(["bench", "stack", "--output-len", "0"]) == 2
    assert "output_len must be an integer >= 1, got 0" in capsys.readouterr().err


def test_stack_workload_shares_a_prefix_and_varies_lengths():
    from minillm.bench.stack import stack_workload

    class Words:
        def encode(self, text, add_special_tokens=False):
            return [hash(w) % 1000 for w in text.split()]

    prompts, lengths = stack_workload(Words(), 6, prefix_len=10, suffix_len=5, output_len=40, seed=3)
    assert len(prompts) == 6 and all(len(p) == 15 and p[:10] == prompts[0][:10] for p in prompts)
    assert len({tuple(p[10:]) for p in prompts}) == 6  # each its own part
    assert all(10 <= n <= 40 for n in lengths) and len(set(lengths)) > 1
    assert stack_workload(Words(), 6, 10, 5, 40, seed=3) == (prompts, lengths)


def test_stack_row_that_fails_is_reported_and_switches_nothing_on():
    from minillm.bench.stack import LAYERS, Layer, run_stack

    broken = Layer("+ a broken option", "-", dict(block_size=0))
    rows = run_stack(num_prompts=2, batch=2, prefix_len=4, suffix_len=2, output_len=2, verbose=False,
                     layers=(LAYERS[0], broken, LAYERS[1]))
    assert rows[1].skipped.startswith("failed: ValueError: EngineConfig.block_size must be an integer >= 1")
    assert rows[2].skipped is None and rows[2].same_as_above == "2/2"
