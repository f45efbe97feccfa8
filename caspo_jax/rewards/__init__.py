"""Outcome rewards behind one protocol: reward model, LLM judge, Python function."""
