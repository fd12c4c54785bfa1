"""Dataset labeling: label sets and JSON schemas, parsing and repair, re-asks, votes. Pure functions."""
