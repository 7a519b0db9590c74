"""Searching over merges against a dev set: Evolver, CMA-ES, greedy soups, kinship-guided greedy."""

from merganser.search.cmaes import CMAConfig, cma_search
from merganser.search.common import SearchResult
from merganser.search.evolver import EvolverConfig, evolve
from merganser.search.kinship_greedy import greedy_merge_search, slerp_merger
from merganser.search.soup import SoupResult, greedy_soup

__all__ = [
    "CMAConfig",
    "EvolverConfig",
    "SearchResult",
    "SoupResult",
    "cma_search",
    "evolve",
    "greedy_merge_search",
    "greedy_soup",
    "slerp_merger",
]
