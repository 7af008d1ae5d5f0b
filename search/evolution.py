"""Evolutionary search over genes under a compute budget, as pure functions with an explicit RNG.

Follows MetaPruning's search (taken from Single-Path-One-Shot): each iteration scores the genes
not seen before, keeps the ``select_num`` lowest-error genes of everything scored so far, breeds
``mutation_num`` children by mutation and ``crossover_num`` by crossover from them, and fills the
population with random feasible genes. All randomness comes from the ``random.Random`` passed in,
and the whole search state is a plain value, so a search can be checkpointed and resumed exactly.
"""
from __future__ import annotations

import math
import random
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable, Iterable, Sequence

from models.gene import FULL_ID, Gene, GeneLayout

if TYPE_CHECKING:
    from models.cost import Cost

ScoreFn = Callable[[list[Gene]], Sequence[float]]
Feasible = Callable[[Gene], bool]


@dataclass(frozen=True)
class Budget:
    """Bounds a gene's cost must meet; ``None`` means no bound."""

    max_macs: int | None = None
    min_macs: int | None = None
    max_params: int | None = None
    max_latency: float | None = None  # any unit; measured by the latency function given to Feasibility

    def __post_init__(self) -> None:
        for name in ("max_macs", "min_macs", "max_params", "max_latency"):
            value = getattr(self, name)
            if value is not None and not value > 0:
                raise ValueError(f"budget {name} must be positive, got {value}")

    def exceeds(self, cost: Cost, latency: float | None = None) -> bool:
        """True when an upper bound is broken (lowering gene ids can fix that, never a lower bound)."""
        if self.max_latency is not None and latency is None:
            raise ValueError(f"budget max_latency {self.max_latency} needs a latency to check against")
        return ((self.max_macs is not None and cost.macs > self.max_macs)
                or (self.max_params is not None and cost.params > self.max_params)
                or (self.max_latency is not None and latency > self.max_latency))

    def admits(self, cost: Cost, latency: float | None = None) -> bool:
        """True when ``cost`` (and ``latency``, if bounded) meets every bound."""
        return not self.exceeds(cost, latency) and (self.min_macs is None or cost.macs >= self.min_macs)


class Feasibility:
    """Whether a gene meets a budget; costs from ``cost_fn``, latency from ``latency_fn`` if bounded."""

    def __init__(self, budget: Budget, cost_fn: Callable[[Gene], Cost],
                 latency_fn: Callable[[Gene], float] | None = None) -> None:
        if budget.max_latency is not None and latency_fn is None:
            raise ValueError(f"budget max_latency {budget.max_latency} needs a latency function")
        self.budget, self.cost_fn, self.latency_fn = budget, cost_fn, latency_fn

    def _measure(self, gene: Gene) -> tuple[Cost, float | None]:
        # Latency may be expensive (a lookup table or a measurement): only ask when it is bounded.
        latency = self.latency_fn(gene) if self.budget.max_latency is not None else None
        return self.cost_fn(gene), latency

    def __call__(self, gene: Gene) -> bool:
        return self.budget.admits(*self._measure(gene))

    def exceeds(self, gene: Gene) -> bool:
        """True when ``gene`` breaks an upper bound."""
        return self.budget.exceeds(*self._measure(gene))

    def check(self, layout: GeneLayout) -> None:
        """Raise ``ValueError`` when no gene of ``layout`` can meet the budget.

        Costs are monotone in every id, so the narrowest gene bounds what upper bounds can reach
        and the full gene what ``min_macs`` can reach.
        """
        b = self.budget
        if b.min_macs is not None and b.max_macs is not None and b.min_macs > b.max_macs:
            raise ValueError(f"min_macs {b.min_macs / 1e6:.2f} MMac is above max_macs {b.max_macs / 1e6:.2f} MMac")
        narrow = layout.narrowest()
        cost = self.cost_fn(narrow)
        if b.max_macs is not None and cost.macs > b.max_macs:
            raise ValueError(f"max_macs {b.max_macs / 1e6:.2f} MMac is below the narrowest gene's "
                             f"{cost.mmac:.2f} MMac")
        if b.max_params is not None and cost.params > b.max_params:
            raise ValueError(f"max_params {b.max_params / 1e6:.3f} M is below the narrowest gene's "
                             f"{cost.params / 1e6:.3f} M params")
        if b.max_latency is not None:
            latency = self.latency_fn(narrow)
            if latency > b.max_latency:
                raise ValueError(f"max_latency {b.max_latency:g} is below the narrowest gene's latency {latency:g}")
        if b.min_macs is not None:
            full = self.cost_fn(layout.full())
            if b.min_macs > full.macs:
                raise ValueError(f"min_macs {b.min_macs / 1e6:.2f} MMac is above the full gene's "
                                 f"{full.mmac:.2f} MMac")


def _repair(gene: Gene, layout: GeneLayout, rng: random.Random, feasible: Feasibility) -> Gene:
    """Lower ``gene`` one id at a time, in a random order, until it meets the upper bounds.

    The gene's ids are taken as units (position ``p`` holds ``gene[p]`` of them); a random order of
    all units is drawn and they are removed one by one, so every step lowers one position by one
    id, a position chosen with probability proportional to its current id. The walk stops at the
    first gene within the upper bounds: a gene at the budget's boundary that keeps the random
    gene's shape, instead of one collapsed towards the narrowest gene. MACs and params only fall
    along the walk, so that first gene is found by bisection over the order (about
    ``log2(sum(ids))`` cost evaluations; a latency estimate that does not fall strictly may stop
    the bisection a little further down, still within the bounds). The result may still be
    infeasible (below ``min_macs``) and is then discarded by the caller.
    """
    if not feasible.exceeds(gene):
        return gene
    units = [p for p in layout.free_positions() for _ in range(gene[p])]
    rng.shuffle(units)

    def lowered(k: int) -> Gene:
        ids = list(gene)
        for p in units[:k]:
            ids[p] -= 1
        return tuple(ids)

    low, high = 0, len(units)  # lowered(low) breaks an upper bound; lowered(high) is the narrowest
    if feasible.exceeds(lowered(high)):
        return lowered(high)
    while high - low > 1:
        mid = (low + high) // 2
        if feasible.exceeds(lowered(mid)):
            low = mid
        else:
            high = mid
    return lowered(high)


def sample_feasible(layout: GeneLayout, rng: random.Random, feasible: Feasibility, n: int,
                    exclude: Iterable[Gene] = frozenset(), max_tries: int | None = None) -> list[Gene]:
    """Up to ``n`` distinct feasible genes not in ``exclude``.

    Each try draws a uniform gene and repairs it if over an upper bound, so tight budgets, where
    uniform genes are almost never feasible, still fill quickly. ``max_tries`` (default ``100 * n``)
    bounds the tries: where the budget admits few genes, or nearly all of them were already
    scored, fewer than ``n`` come back (possibly none) and the caller decides.
    """
    if n < 0:
        raise ValueError(f"number of genes to sample must be >= 0, got {n}")
    max_tries = 100 * n if max_tries is None else max_tries
    seen = set(exclude)
    out: list[Gene] = []
    for _ in range(max_tries):
        if len(out) == n:
            break
        gene = _repair(layout.sample(rng), layout, rng, feasible)
        if gene not in seen and feasible(gene):
            seen.add(gene)
            out.append(gene)
    return out


def _breed(make_child: Callable[[], Gene], n: int, feasible: Feasible, exclude: Iterable[Gene],
           parents: Sequence[Gene], max_tries: int | None) -> list[Gene]:
    """Up to ``n`` new feasible children from ``make_child`` in at most ``max_tries`` (default ``10 * n``) tries."""
    if n < 0:
        raise ValueError(f"number of children must be >= 0, got {n}")
    max_tries = 10 * n if max_tries is None else max_tries
    seen = set(exclude) | set(parents)  # a child equal to a parent is no new candidate
    out: list[Gene] = []
    for _ in range(max_tries):
        if len(out) == n:
            break
        child = make_child()
        if child not in seen and feasible(child):
            seen.add(child)
            out.append(child)
    return out


def mutate(parents: Sequence[Gene], layout: GeneLayout, rng: random.Random, n: int, prob: float,
           feasible: Feasible, exclude: Iterable[Gene] = frozenset(), max_tries: int | None = None) -> list[Gene]:
    """Up to ``n`` children, each a random parent with every free position redrawn with probability ``prob``."""
    if not 0 <= prob <= 1:
        raise ValueError(f"mutation probability must be in [0, 1], got {prob}")
    parents = list(parents)
    free = set(layout.free_positions())

    def child() -> Gene:
        parent = rng.choice(parents)
        return tuple(rng.randrange(FULL_ID + 1) if i in free and rng.random() < prob else g
                     for i, g in enumerate(parent))

    return _breed(child, n if parents else 0, feasible, exclude, parents, max_tries)


def crossover(parents: Sequence[Gene], rng: random.Random, n: int, feasible: Feasible,
              exclude: Iterable[Gene] = frozenset(), max_tries: int | None = None) -> list[Gene]:
    """Up to ``n`` children, each taking every position from one of two distinct random parents."""
    parents = list(dict.fromkeys(parents))  # crossing a gene with itself only gives that gene back

    def child() -> Gene:
        a, b = rng.sample(parents, 2)
        return tuple(x if rng.random() < 0.5 else y for x, y in zip(a, b))

    return _breed(child, n if len(parents) >= 2 else 0, feasible, exclude, parents, max_tries)


@dataclass
class SearchState:
    """Everything a search needs to continue: iterations done, the next candidates, all scores, the RNG."""

    iteration: int
    population: list[Gene]
    scores: dict[Gene, float]  # every gene ever scored -> top-1 error (%), in scoring order
    top: list[Gene]  # best first
    rng_state: object  # random.Random.getstate() after the last step

    def to_dict(self) -> dict:
        """Plain lists, ints, floats and str-keyed dicts only, so ``torch.load(weights_only=True)`` reads it."""
        version, internal, gauss_next = self.rng_state
        return {
            "iteration": self.iteration,
            "population": [list(g) for g in self.population],
            "scored_genes": [list(g) for g in self.scores],
            "scored_errors": [float(e) for e in self.scores.values()],
            "top": [list(g) for g in self.top],
            "rng_state": {"version": version, "internal": list(internal), "gauss_next": gauss_next},
        }

    @classmethod
    def from_dict(cls, d: dict) -> SearchState:
        """Inverse of :meth:`to_dict`; a ``ValueError`` naming the problem when ``d`` is not one."""
        try:
            rng = d["rng_state"]
            state = cls(
                iteration=int(d["iteration"]),
                population=[tuple(g) for g in d["population"]],
                scores={tuple(g): float(e) for g, e in zip(d["scored_genes"], d["scored_errors"], strict=True)},
                top=[tuple(g) for g in d["top"]],
                rng_state=(rng["version"], tuple(rng["internal"]), rng["gauss_next"]),
            )
            random.Random().setstate(state.rng_state)
        except (KeyError, TypeError, ValueError, IndexError) as e:
            raise ValueError(f"not a search state ({type(e).__name__}: {str(e)[:80]})") from None
        return state

    def best(self, k: int | None = None) -> list[tuple[Gene, float]]:
        """The ``k`` (default all) lowest-error scored genes, ties broken by gene."""
        return sorted(self.scores.items(), key=lambda item: (item[1], item[0]))[:k]


def init_state(layout: GeneLayout, rng: random.Random, feasible: Feasibility, population: int) -> SearchState:
    """A fresh search whose first population is up to ``population`` random feasible genes.

    Fewer come back when the budget admits fewer distinct genes than ``population`` (or the
    sampler cannot find them in its tries); none at all raises ``ValueError``.
    """
    if population < 1:
        raise ValueError(f"population must be >= 1, got {population}")
    tries = 100 * population
    genes = sample_feasible(layout, rng, feasible, population, max_tries=tries)
    if not genes:
        raise ValueError(f"found no gene within the budget in {tries} random tries: the band between the lower "
                         f"and upper bounds is too narrow")
    return SearchState(iteration=0, population=genes, scores={}, top=[], rng_state=rng.getstate())


def check_step_args(population: int, select_num: int, mutation_num: int, crossover_num: int,
                     mutation_prob: float) -> None:
    if population < 1:
        raise ValueError(f"population must be >= 1, got {population}")
    if not 1 <= select_num <= population:
        raise ValueError(f"select_num must be in 1..population ({population}), got {select_num}")
    if mutation_num < 0 or crossover_num < 0:
        raise ValueError(f"mutation_num and crossover_num must be >= 0, got {mutation_num} and {crossover_num}")
    if mutation_num + crossover_num > population:
        raise ValueError(f"mutation_num + crossover_num ({mutation_num} + {crossover_num}) exceeds "
                         f"population ({population})")
    if not 0 <= mutation_prob <= 1:
        raise ValueError(f"mutation_prob must be in [0, 1], got {mutation_prob}")


def step(state: SearchState, layout: GeneLayout, rng: random.Random, feasible: Feasibility, score_fn: ScoreFn, *,
         population: int, select_num: int, mutation_num: int, crossover_num: int,
         mutation_prob: float) -> SearchState:
    """One iteration: score the new genes of ``state.population``, select, breed and refill.

    ``score_fn`` gets one batch (so the caller can shard it) of genes never scored before and is
    skipped when there are none. Where the budget admits few genes not scored yet, the next
    population is smaller than ``population`` (empty once every reachable gene was scored): the
    search goes on with what is left rather than failing. Returns a new state; ``state`` is left
    unchanged.
    """
    check_step_args(population, select_num, mutation_num, crossover_num, mutation_prob)
    new = [g for g in dict.fromkeys(state.population) if g not in state.scores]
    scores = dict(state.scores)
    if new:
        errors = list(score_fn(new))
        if len(errors) != len(new):
            raise ValueError(f"score_fn returned {len(errors)} errors for {len(new)} genes")
        for gene, error in zip(new, errors):
            if not math.isfinite(error):
                raise ValueError(f"score_fn returned a non-finite error {error} for gene {list(gene)}")
            scores[gene] = float(error)
    top = [g for g, _ in sorted(scores.items(), key=lambda item: (item[1], item[0]))[:select_num]]
    taken = set(scores)
    children = mutate(top, layout, rng, mutation_num, mutation_prob, feasible, taken)
    taken.update(children)
    children += crossover(top, rng, crossover_num, feasible, taken)
    taken.update(children)
    children += sample_feasible(layout, rng, feasible, population - len(children), exclude=taken)
    return SearchState(iteration=state.iteration + 1, population=children, scores=scores, top=top,
                       rng_state=rng.getstate())


def run(state: SearchState, layout: GeneLayout, rng: random.Random, feasible: Feasibility, score_fn: ScoreFn,
        iterations: int, on_step: Callable[[SearchState], None] | None = None, **step_kwargs) -> SearchState:
    """Step until ``iterations`` iterations are done, calling ``on_step(state)`` after each (to checkpoint).

    To resume, rebuild the RNG with ``rng.setstate(state.rng_state)``; a different RNG state is
    refused because the continued search would silently differ from an uninterrupted one.
    """
    if iterations < state.iteration:
        raise ValueError(f"iterations ({iterations}) is below the {state.iteration} iterations already done")
    if rng.getstate() != state.rng_state:
        raise ValueError("rng state differs from state.rng_state; call rng.setstate(state.rng_state) to resume")
    while state.iteration < iterations:
        state = step(state, layout, rng, feasible, score_fn, **step_kwargs)
        if on_step is not None:
            on_step(state)
    return state
