"""Searching over merges: greedy soups (Evolver, CMA-ES and kinship-guided search to come)."""

from merganser.search.soup import SoupResult, greedy_soup

__all__ = ["SoupResult", "greedy_soup"]
