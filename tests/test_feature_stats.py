"""Feature statistics for the browser (issue 17), computed a block at a time in two passes, equal
what a whole-array computation gives: densities, maxima, top rows, histograms, interval samples."""

import pytest
import torch

from cache_server.saes.feature_stats import _priority, feature_statistics


@pytest.mark.parametrize("buffer", [1 << 20, 40])  # merged once at the end, or after every few candidates
def test_blockwise_statistics_equal_the_whole_array_computation(buffer):
    torch.manual_seed(0)
    n, d_in, d_sae = 3000, 16, 40
    rows, ids = torch.randn(n, d_in), torch.randperm(10 * n)[:n]  # row ids as a dataset's, not 0..n
    W = torch.randn(d_in, d_sae) / d_in**0.5
    bias = -torch.linspace(0, 3.5, d_sae)  # from dense features to rare ones
    bias[-3:] = -100  # and three that never fire
    encode = lambda x: torch.relu(x @ W + bias)  # noqa: E731
    chunks = lambda: ((rows[lo:lo + 700], ids[lo:lo + 700]) for lo in range(0, n, 700))  # noqa: E731
    stats = feature_statistics(encode, chunks, d_sae, top_k=7, intervals=4, per_interval=3, bins=9, block=128,
                               buffer=buffer)

    acts = encode(rows)
    assert stats.n_rows == n
    assert torch.equal(stats.fired, (acts > 0).sum(0))
    torch.testing.assert_close(stats.sum_values, acts.double().sum(0))
    torch.testing.assert_close(stats.max_values, acts.amax(0))
    assert (stats.fired == 0).any() and (stats.fired > 7).any()
    for f in range(d_sae):
        a = acts[:, f]
        strongest = a.argsort(descending=True)[:7]
        live = a[strongest] > 0
        assert torch.equal(stats.top_rows[:, f][live], ids[strongest][live]), f
        assert torch.all(stats.top_rows[:, f][~live] == -1)
        m = a.max()
        if m == 0:
            assert stats.histogram[f].sum() == 0 and torch.all(stats.interval_rows[:, :, f] == -1)
            continue
        on = a > 0
        b = ((a[on] / m) * 9).ceil().long().clamp(1, 9) - 1
        assert torch.equal(stats.histogram[f], torch.bincount(b, minlength=9)), f
        q = ((a / m) * 4).ceil().long().clamp(1, 4) - 1
        for i in range(4):
            members = on & (q == i)
            by_priority = _priority(ids[members]).argsort()[:3]
            expected = ids[members][by_priority]
            got = stats.interval_rows[i, : len(expected), f]
            assert torch.equal(got, expected), (f, i)
            assert torch.all(stats.interval_rows[i, len(expected):, f] == -1)
            torch.testing.assert_close(stats.interval_values[i, : len(expected), f], a[members][by_priority])
