"""CASPO maths: pure, jit-compatible functions of arrays."""
