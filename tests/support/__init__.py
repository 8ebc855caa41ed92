"""Helpers the tests share: engine runners, float64 references, hostile inputs, memory gauges.

Imported one way only, ``from tests.support.NAME import ...`` (the repository
root is on pytest's ``pythonpath``).
"""
