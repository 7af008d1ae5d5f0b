import random
import zlib
from collections import Counter

import numpy as np
import pytest
import torch

from models import GeneLayout, get_family
from models.cost import Cost, cost_model
from search.evolution import Budget, Feasibility, SearchState, crossover, init_state, mutate, run, sample_feasible, step

R50_NARROWEST_MACS = cost_model("resnet50")(get_family("resnet50").layout.narrowest()).macs

R50 = get_family("resnet50").layout
MBV2 = get_family("mobilenetv2").layout
R50_COST = cost_model("resnet50")
MBV2_COST = cost_model("mobilenetv2")
STEP = dict(population=16, select_num=6, mutation_num=6, crossover_num=6, mutation_prob=0.1)


def fake_error(gene):
    """Deterministic stand-in for a top-1 error: wider is better, plus a gene-dependent jitter."""
    return 100.0 - sum(gene) / len(gene) + zlib.crc32(bytes(gene)) % 1000 / 1000


def score_all(genes):
    return [fake_error(g) for g in genes]


def r50_feasible(max_mmac=1500):
    return Feasibility(Budget(max_macs=int(max_mmac * 1e6)), R50_COST)


def search(seed, iterations, feasible=None, score_fn=score_all, **kwargs):
    feasible = feasible or r50_feasible()
    rng = random.Random(seed)
    state = init_state(R50, rng, feasible, STEP["population"])
    return run(state, R50, rng, feasible, score_fn, iterations, **{**STEP, **kwargs})


def every_gene(states):
    return {g for s in states for g in [*s.population, *s.scores]}


# --- budgets ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("layout, cost, budget", [
    (R50, R50_COST, Budget(max_macs=1_500_000_000)),
    (MBV2, MBV2_COST, Budget(max_macs=300_000_000, min_macs=200_000_000, max_params=3_000_000)),
])
def test_every_gene_of_a_search_meets_the_budget(layout, cost, budget):
    feasible = Feasibility(budget, cost)
    feasible.check(layout)
    rng = random.Random(0)
    states = [init_state(layout, rng, feasible, STEP["population"])]
    run(states[0], layout, rng, feasible, score_all, 5, on_step=states.append, **STEP)
    genes = every_gene(states)
    assert len(genes) > 5 * STEP["population"]
    for gene in genes:
        c = cost(gene)
        assert c.macs <= budget.max_macs
        assert budget.min_macs is None or c.macs >= budget.min_macs
        assert budget.max_params is None or c.params <= budget.max_params
        assert all(gene[p] == 30 for p in layout.fixed)


def test_tight_budget_is_filled_quickly_by_repair():
    # 5% above the narrowest gene almost no uniform gene is feasible; with one try per gene this
    # only succeeds because over-budget genes are repaired rather than thrown away.
    max_macs = int(R50_COST(R50.narrowest()).macs * 1.05)
    feasible = Feasibility(Budget(max_macs=max_macs), R50_COST)
    feasible.check(R50)
    genes = sample_feasible(R50, random.Random(0), feasible, 20, max_tries=25)
    assert len(set(genes)) == 20
    assert all(R50_COST(g).macs <= max_macs for g in genes)


def test_latency_budget_uses_the_injected_latency():
    latency = lambda gene: R50_COST(gene).macs / 1e9  # noqa: E731  (a stand-in "milliseconds")
    feasible = Feasibility(Budget(max_latency=1.2), R50_COST, latency)
    genes = sample_feasible(R50, random.Random(0), feasible, 30)
    assert all(latency(g) <= 1.2 for g in genes)
    with pytest.raises(ValueError, match="latency function"):
        Feasibility(Budget(max_latency=1.2), R50_COST)


@pytest.mark.parametrize("budget, latency_fn, numbers", [
    (Budget(max_macs=10_000_000), None, ["10.00", "82.88"]),
    (Budget(max_params=1_000_000), None, ["1.000", "2.958"]),
    (Budget(max_latency=0.05), lambda g: R50_COST(g).macs / 1e9, ["0.05", "0.0828"]),
    (Budget(min_macs=5_000_000_000), None, ["5000.00", "4089.18"]),
    (Budget(max_macs=1_000_000_000, min_macs=2_000_000_000), None, ["2000.00", "1000.00"]),
])
def test_unmeetable_budget_is_reported_with_its_numbers(budget, latency_fn, numbers):
    with pytest.raises(ValueError) as info:
        Feasibility(budget, R50_COST, latency_fn).check(R50)
    for number in numbers:
        assert number in str(info.value)


def test_too_narrow_band_gives_fewer_genes_and_an_empty_first_population_is_an_error():
    macs = R50_NARROWEST_MACS + 12345  # no gene costs exactly this
    feasible = Feasibility(Budget(max_macs=macs, min_macs=macs), R50_COST)
    feasible.check(R50)
    assert sample_feasible(R50, random.Random(0), feasible, 3, max_tries=50) == []
    with pytest.raises(ValueError, match="found no gene within the budget in 300 random tries"):
        init_state(R50, random.Random(0), feasible, 3)


def tight(fraction):
    return Feasibility(Budget(max_macs=int(R50_NARROWEST_MACS * fraction)), R50_COST)


def test_repair_reaches_many_distinct_genes_near_the_narrowest():
    # 725 genes cost at most 1.05x the narrowest; repair that dropped positions to random lower
    # ids collapsed onto a few of them (101 distinct genes in 300 tries).
    genes = sample_feasible(R50, random.Random(0), tight(1.05), 150, max_tries=300)
    assert len(genes) == len(set(genes)) == 150
    assert all(tight(1.05)(g) for g in genes)


def test_repair_lowers_to_the_budget_boundary_keeping_the_gene_spread():
    # At 3x the narrowest no uniform gene fits: every gene is a repaired one. Lowering one id at a
    # time stops right at the bound, and every position keeps a similar share of the ids.
    feasible = tight(3)
    genes = sample_feasible(R50, random.Random(0), feasible, 200, max_tries=200)
    assert len(genes) == 200
    assert np.mean([R50_COST(g).macs for g in genes]) > 0.97 * feasible.budget.max_macs
    per_position = np.array(genes)[:, list(R50.free_positions())].mean(axis=0)
    assert per_position.max() < 1.4 * per_position.min()


def test_tight_budget_search_goes_on_with_fewer_candidates_and_stays_deterministic():
    # Only 104 genes cost at most 1.03x the narrowest ResNet50 gene: the second iteration cannot
    # fill a population of 40 with genes not scored yet. It must go on with fewer, not raise.
    feasible = tight(1.03)
    kwargs = dict(population=40, select_num=10, mutation_num=10, crossover_num=10, mutation_prob=0.1)

    def tight_search():
        states = []
        rng = random.Random(0)
        run(init_state(R50, rng, feasible, 40), R50, rng, feasible, score_all, 4, on_step=states.append, **kwargs)
        return states

    states = tight_search()
    assert [s.iteration for s in states] == [1, 2, 3, 4]
    assert min(len(s.population) for s in states) < 40
    scored = states[-1].scores
    assert 40 < len(scored) <= 104 and all(feasible(g) for g in scored)
    assert tight_search() == states


def test_budget_rejects_non_positive_bounds():
    with pytest.raises(ValueError, match="max_macs must be positive, got 0"):
        Budget(max_macs=0)


# --- sampling ---------------------------------------------------------------------------------------

def test_uniform_sampler_reaches_every_id_at_every_free_position():
    rng = random.Random(0)
    genes = np.array([MBV2.sample(rng) for _ in range(3000)])
    for pos in range(len(MBV2)):
        expected = {30} if pos in MBV2.fixed else set(range(31))
        assert set(genes[:, pos]) == expected


def test_feasible_sampler_reaches_every_id_under_a_budget():
    genes = np.array(sample_feasible(R50, random.Random(0), r50_feasible(), 2000))
    for pos in range(len(R50)):
        assert set(genes[:, pos]) == ({30} if pos in R50.fixed else set(range(31)))


def test_feasible_sampler_returns_distinct_genes_outside_exclude():
    feasible = r50_feasible()
    exclude = set(sample_feasible(R50, random.Random(0), feasible, 50))
    genes = sample_feasible(R50, random.Random(0), feasible, 60, exclude=exclude)
    assert len(set(genes)) == 60
    assert not exclude & set(genes)


# --- mutation and crossover -------------------------------------------------------------------------

@pytest.fixture
def parents():
    return sample_feasible(R50, random.Random(7), r50_feasible(), 8)


def test_mutation_keeps_fixed_positions_and_only_returns_new_feasible_genes(rng, parents):
    feasible = r50_feasible()
    exclude = set(sample_feasible(R50, random.Random(8), feasible, 20))
    children = mutate(parents, R50, rng, 20, 0.3, feasible, exclude)
    assert len(children) == 20 == len(set(children))
    for child in children:
        assert feasible(child) and child not in exclude and child not in parents
        assert all(child[p] == 30 for p in R50.fixed)


def test_mutation_probability_zero_changes_nothing_and_one_changes_positions(rng, parents):
    feasible = Feasibility(Budget(), R50_COST)
    assert mutate(parents, R50, rng, 10, 0.0, feasible, set()) == []
    children = mutate(parents, R50, rng, 10, 1.0, feasible, set())
    assert len(children) == 10
    # Redrawn uniformly, a position keeps its parent's id with probability 1/31: most must change.
    changed = min(sum(c != p for c, p in zip(child, parent)) for child in children for parent in parents)
    assert changed > len(R50.free_positions()) // 2


def test_mutation_redraws_each_position_independently_with_the_given_probability():
    # Per position, not per gene: with p = 0.3 a free position changes with probability
    # p * 30/31 (a redraw may give the same id back), independently of the others, so the number
    # of changed positions per child is binomial. Mutating whole genes with probability p would
    # give the same mean but a far larger spread (mostly 0 or almost all positions changed).
    parent = tuple(30 if i in R50.fixed else 15 for i in range(len(R50)))
    children = mutate([parent], R50, random.Random(0), 2000, 0.3, Feasibility(Budget(), R50_COST), set(),
                      max_tries=4000)
    assert len(children) == 2000
    changed = np.array([[c[i] != parent[i] for i in range(len(R50))] for c in children])
    free = list(R50.free_positions())
    assert not changed[:, list(R50.fixed)].any()
    q = 0.3 * 30 / 31
    assert np.all(np.abs(changed[:, free].mean(axis=0) - q) < 0.05)
    per_child = changed[:, free].sum(axis=1)
    n = len(free)
    assert per_child.mean() == pytest.approx(n * q, rel=0.05)
    assert per_child.var() == pytest.approx(n * q * (1 - q), rel=0.2)


def test_crossover_takes_every_position_from_one_parent(rng, parents):
    feasible = r50_feasible()
    children = crossover(parents, rng, 20, feasible, set())
    assert len(children) == 20 == len(set(children))
    for child in children:
        assert feasible(child) and child not in parents
        assert any(all(c in (a[i], b[i]) for i, c in enumerate(child)) for a in parents for b in parents)
        assert all(child[p] == 30 for p in R50.fixed)


def test_crossover_of_a_single_parent_gives_nothing(rng, parents):
    assert crossover(parents[:1] * 3, rng, 5, r50_feasible(), set()) == []


def test_children_are_filtered_by_feasibility(rng, parents):
    strict = Feasibility(Budget(max_macs=max(R50_COST(p).macs for p in parents)), R50_COST)
    for child in mutate(parents, R50, rng, 20, 0.5, strict, set()) + crossover(parents, rng, 20, strict, set()):
        assert strict(child)


# --- search -----------------------------------------------------------------------------------------

def test_no_gene_is_scored_twice_and_score_fn_is_called_once_per_iteration():
    # Two free positions (961 genes): children and random fill collide with scored genes often.
    toy = GeneLayout("toy", ("a", "b", "head"), fixed=(2,))
    feasible = Feasibility(Budget(), lambda g: Cost(sum(g), sum(g)))
    seen, calls, states = Counter(), [], []

    def counting(genes):
        calls.append(len(genes))
        seen.update(genes)
        return score_all(genes)

    rng = random.Random(0)
    state = run(init_state(toy, rng, feasible, 16), toy, rng, feasible, counting, 12, on_step=states.append,
                **{**STEP, "mutation_prob": 0.5})
    assert len(calls) == 12
    assert max(seen.values()) == 1
    assert set(seen) == set(state.scores) and sum(calls) == len(state.scores) == 12 * 16
    for s in states:
        assert len(set(s.population)) == len(s.population) == 16
        assert not set(s.population) & set(s.scores)


def test_step_scores_only_new_genes_of_the_population():
    feasible = r50_feasible()
    old, new = sample_feasible(R50, random.Random(0), feasible, 3), sample_feasible(R50, random.Random(1), feasible, 2)
    state = SearchState(0, [old[0], new[0], new[0], old[1], new[1]], {g: 50.0 for g in old}, [], None)
    batches = []
    step(state, R50, random.Random(0), feasible, lambda genes: batches.append(genes) or score_all(genes), **STEP)
    assert batches == [new]


def test_top_is_the_best_of_everything_scored_with_ties_broken_by_gene():
    states = []
    search(0, 4, score_fn=lambda genes: [1.0 if sum(g) % 2 else 2.0 for g in genes], on_step=states.append)
    for s in states:
        expected = sorted(s.scores, key=lambda g: (1.0 if sum(g) % 2 else 2.0, g))[:STEP["select_num"]]
        assert s.top == expected
        assert s.best(3) == [(g, s.scores[g]) for g in expected[:3]]


def test_step_returns_a_new_state_and_leaves_the_input_alone():
    feasible = r50_feasible()
    rng = random.Random(0)
    state = init_state(R50, rng, feasible, STEP["population"])
    before = SearchState.from_dict(state.to_dict())
    after = step(state, R50, rng, feasible, score_all, **STEP)
    assert state == before
    assert after.iteration == 1 and len(after.population) == STEP["population"]
    assert after.rng_state == rng.getstate()


def _plain(value):
    if isinstance(value, dict):
        return all(isinstance(k, str) and _plain(v) for k, v in value.items())
    if isinstance(value, list):
        return all(_plain(v) for v in value)
    return value is None or type(value) in (int, float, str)


def test_state_dict_holds_only_plain_types():
    assert _plain(search(3, 2).to_dict())


def test_resume_from_a_checkpoint_equals_an_uninterrupted_search(tmp_path):
    straight = search(3, 6)
    half = search(3, 3)
    torch.save(half.to_dict(), tmp_path / "search.pt")
    loaded = SearchState.from_dict(torch.load(tmp_path / "search.pt", weights_only=True))
    assert loaded == half
    rng = random.Random()
    rng.setstate(loaded.rng_state)
    resumed = run(loaded, R50, rng, r50_feasible(), score_all, 6, **STEP)
    assert resumed.best() == straight.best()
    assert resumed.scores == straight.scores and resumed.population == straight.population


def test_resuming_without_restoring_the_rng_is_refused():
    state = search(3, 2)
    with pytest.raises(ValueError, match="setstate"):
        run(state, R50, random.Random(3), r50_feasible(), score_all, 4, **STEP)


def test_same_seed_same_search_and_different_seed_different_population():
    assert search(5, 3) == search(5, 3)
    assert set(search(5, 0).population) != set(search(6, 0).population)


@pytest.mark.parametrize("kwargs, message", [
    (dict(population=0), "population must be >= 1, got 0"),
    (dict(select_num=0), "select_num .* got 0"),
    (dict(select_num=17), "select_num .* got 17"),
    (dict(mutation_prob=1.5), "mutation_prob .* got 1.5"),
    (dict(mutation_prob=-0.1), "mutation_prob .* got -0.1"),
    (dict(mutation_num=-1), "got -1 and 6"),
    (dict(crossover_num=-2), "got 6 and -2"),
    (dict(mutation_num=10, crossover_num=7), r"\(10 \+ 7\) exceeds population \(16\)"),
])
def test_step_parameters_are_validated(kwargs, message):
    feasible = r50_feasible()
    rng = random.Random(0)
    state = init_state(R50, rng, feasible, 4)
    with pytest.raises(ValueError, match=message):
        step(state, R50, rng, feasible, score_all, **{**STEP, **kwargs})


def test_other_bad_arguments_are_refused(rng, parents):
    feasible = r50_feasible()
    with pytest.raises(ValueError, match="population must be >= 1, got 0"):
        init_state(R50, rng, feasible, 0)
    with pytest.raises(ValueError, match="got 1.1"):
        mutate(parents, R50, rng, 3, 1.1, feasible, set())
    with pytest.raises(ValueError, match="got -1"):
        crossover(parents, rng, -1, feasible, set())
    with pytest.raises(ValueError, match="got -2"):
        sample_feasible(R50, rng, feasible, -2)
    with pytest.raises(ValueError, match="returned 1 errors for 16 genes"):
        search(0, 1, score_fn=lambda genes: [1.0])
    with pytest.raises(ValueError, match="non-finite"):
        search(0, 1, score_fn=lambda genes: [float("nan")] * len(genes))
    state = search(0, 3)
    with pytest.raises(ValueError, match="below the 3 iterations"):
        run(state, R50, random.Random(), feasible, score_all, 2, **STEP)
