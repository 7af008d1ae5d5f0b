"""The reproduction benchmark's own pieces: the proxy-quality genes and Kendall's tau."""
import sys

from conftest import ROOT
from pipeline import QUICK, Pipeline

sys.path.insert(0, str(ROOT / "benchmarks"))
from reproduce import kendall_tau, spread_genes  # noqa: E402


def test_tau_genes_are_distinct_and_cover_the_range(tmp_path):
    p = Pipeline("resnet50", 0, QUICK, tmp_path)
    genes = spread_genes(p, 12, 0.15, 0.9, seed=1)
    assert len(set(genes)) == 12
    full = p.costs(p.layout.full()).macs
    for k, g in enumerate(genes):
        target = 0.15 + 0.75 * (k + 0.5) / 12
        assert abs(p.costs(g).macs / full - target) < 0.02, (k, p.costs(g).macs / full)


def test_kendall_tau_b():
    assert kendall_tau([1, 2, 3, 4], [10, 20, 30, 40]) == 1
    assert kendall_tau([1, 2, 3, 4], [40, 30, 20, 10]) == -1
    # 5 concordant, 1 discordant pair of 6: (5 - 1) / 6
    assert abs(kendall_tau([1, 2, 3, 4], [1, 3, 2, 4]) - 4 / 6) < 1e-12
