"""Segments: the rule language, batch evaluation, membership history and the catalog."""
