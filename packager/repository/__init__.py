"""Stage 4: the Triton model repository rendered from templates/ (`yqpack render`)."""
