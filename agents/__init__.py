"""Learners that act in textenv's environments."""
