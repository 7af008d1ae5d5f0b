"""The search driver: the evolution of ``search.evolution`` run with real scores, checkpoints and logs."""
from __future__ import annotations

import argparse
import random
import signal

import torch

from app import checkpoint
from app.distributed import Dist, all_gather, any_process
from app.engine import StopRequests
from models import Gene
from models.cost import CostModel, channel_table, format_table
from utils.logger import RunLogger

from . import evolution, record
from .evaluator import CandidateEvaluator


class _Interrupted(Exception):
    """A stop signal reached some process: the iteration under way is abandoned."""


class SearchRun:
    """Run (or continue) one search, saving its checkpoint and logging after every iteration.

    Every process runs the same evolution (same seed, same RNG); the candidates of an iteration are
    scored in shards, one per process, and the errors gathered, so the result does not depend on
    the number of processes. SIGINT/SIGTERM abandon the iteration under way (at the next candidate)
    and exit with 128 + the signal; the checkpoint of the last finished iteration resumes it.
    """

    def __init__(self, cfg: argparse.Namespace, settings: dict, costs: CostModel, feasible: evolution.Feasibility,
                 evaluator: CandidateEvaluator, files: record.SearchFiles, logger: RunLogger, dist_info: Dist,
                 device: torch.device, stop: StopRequests) -> None:
        self.cfg, self.settings, self.costs, self.feasible, self.evaluator = cfg, settings, costs, feasible, evaluator
        self.files, self.logger, self.dist, self.device, self.stop = files, logger, dist_info, device, stop
        self.layout = costs.spec.layout
        self.recorded = 0  # scores already in the log
        self.last_saved = cfg.search_resume  # the checkpoint a stopped search resumes from

    def run(self, state: evolution.SearchState) -> evolution.SearchState:
        cfg = self.cfg
        if cfg.search_resume:
            self.logger.info(f"resumed {cfg.search_resume} after iteration {state.iteration}")
        elif len(state.population) < cfg.population:
            self.logger.info(f"only {len(state.population)} distinct genes within the budget found for the first "
                             f"population of {cfg.population}; the search goes on with them")
        rng = random.Random()
        rng.setstate(state.rng_state)
        self.recorded = len(state.scores)
        try:
            return evolution.run(state, self.layout, rng, self.feasible, self.score, cfg.epochs, on_step=self.save,
                                 population=cfg.population, select_num=cfg.select_num, mutation_num=cfg.mutation_num,
                                 crossover_num=cfg.crossover_num, mutation_prob=cfg.mutation_prob)
        except _Interrupted:
            signum = self.stop.signal or signal.SIGTERM  # another process was signalled
            how = (f"resume with the same flags plus --search-resume {self.last_saved}" if self.last_saved else
                   "no iteration had finished, so there is nothing to resume: run the same command again")
            self.logger.info(f"stopped by signal {signum}; {how}")
            raise SystemExit(128 + signum) from None

    def check_stop(self) -> None:
        """One exchange decides for every process, so all of them stop at the same candidate."""
        if any_process([self.stop.signal is not None], self.device)[0]:
            raise _Interrupted

    def score(self, genes: list[Gene]) -> list[float]:
        """Top-1 errors of ``genes``, each process scoring every ``world``-th one."""
        rank, world, mine = self.dist.rank, self.dist.world_size, []
        for start in range(0, len(genes), world):  # the same number of rounds on every process
            self.check_stop()
            if start + rank < len(genes):
                mine.append(100.0 - self.evaluator.top1(genes[start + rank]))
        shards = all_gather(mine)
        return [shards[i % world][i // world] for i in range(len(genes))]

    def save(self, s: evolution.SearchState) -> None:
        """The checkpoint (rank 0) and the log of a finished iteration."""
        cfg, costs, net = self.cfg, self.costs, self.evaluator.net
        if self.dist.main:
            checkpoint.save(record.search_state(cfg, s, self.settings, costs, net.num_classes), self.files.checkpoint)
        self.last_saved = str(self.files.checkpoint)
        new, self.recorded = list(s.scores.items())[self.recorded:], len(s.scores)
        gene, err = s.best(1)[0]
        cost = costs(gene)
        self.logger.info(f"iteration {s.iteration}/{cfg.epochs}: {len(s.scores)} scored; best top-1 error {err:.2f} "
                         f"{cost.macs / 1e6:.2f} MMac {cost.params / 1e6:.3f} M {self.layout.format(gene)}")
        if len(s.population) < cfg.population and s.iteration < cfg.epochs:
            self.logger.info(f"only {len(s.population)} new genes within the budget for the next population of "
                             f"{cfg.population}: the budget admits few genes not scored yet")
        self.logger.record("search", iteration=s.iteration, scored=len(s.scores), best_error=err,
                           best_gene=self.layout.format(gene), best_macs=cost.macs,
                           budget_macs=self.feasible.budget.max_macs,
                           best_table=format_table(channel_table(net.spec, gene, net.num_classes)),
                           candidates=[{"gene": self.layout.format(g), "error": e, "macs": costs(g).macs}
                                       for g, e in new])
        self.check_stop()
