"""Training the capacity-limited bit-width gate (dual routing)."""
