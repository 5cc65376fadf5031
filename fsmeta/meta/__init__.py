"""Reptile meta-training: the pure inner loop and meta-update (``reptile``), and the
backends that run it (in-process here; Ray actors in the execution layer)."""
