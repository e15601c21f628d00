"""Merge recipes: the YAML that says what to merge and how, in our format or mergekit's."""

from .schema import Recipe, Rule, SftModel, Sparsify

__all__ = ["Recipe", "Rule", "SftModel", "Sparsify"]
