"""d2moe: run Mixture-of-Experts LLMs under a memory budget.

Kept import-light on purpose: `d2moe.errors` is imported by every stage, and the CLI imports
torch/transformers only inside the command that needs them.
"""

__version__ = "0.1.0"
