"""Quantization: schemes, Q/DQ rules (one implementation, shared with the static check), QAT, calibration, PTQ."""
