"""Figures and static reports."""
